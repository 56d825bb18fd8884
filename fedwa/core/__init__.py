"""The methods' math over tensors, modules and state dicts: averaging, BatchNorm recomputation,
TWA, WSA, partial averaging, late-phase and shadow weights, alignment, topologies, metrics and
local training. Usable, and tested, without Flower: nothing here imports ``flwr``
(``tests/test_layers.py``)."""
