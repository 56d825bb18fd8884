"""Permutation alignment of hidden units across models: the merge step of DIMAT.

Hidden units of a network can be reordered without changing the function it computes, as
long as every weight that produces a unit and every weight that consumes it are reordered
together. Two models trained apart therefore need not agree on which unit is which, and
averaging them unit by unit mixes unrelated features. DIMAT (Saadati et al., CVPR 2024,
"DIMAT: Decentralized Iterative Merging-And-Training for Deep Learning Models") aligns each
neighbour's model to the agent's own model before the weighted average of a gossip round.
The alignment is the activation matching of Git Re-Basin (Ainsworth, Hayase and Srinivasa,
ICLR 2023, "Git Re-Basin: Merging Models modulo Permutation Symmetries"): run the same data
through both models, correlate every unit of one with every unit of the other, and pick the
one-to-one matching with the largest total correlation (a linear assignment problem).

Building blocks
---------------
* A :class:`PermutationSpec` names the permutation groups of a model. A group is a set of
  units that must be permuted together, and lists every ``(state_dict key, axis)`` its
  permutation acts on, plus the places (:class:`Probe`) where its units' activations are
  measured. :func:`permutation_spec` returns the spec of a model; :func:`validate_spec` checks
  one against a model.
* :func:`permute_state` applies permutations to a state dict; :func:`random_permutations` draws
  some; :func:`align_to` computes the permutations that align one model to another;
  :func:`merge_aligned` averages aligned state dicts.

Conventions
-----------
* A permutation ``perm`` of a group of size ``n`` is a 1-D ``int64`` tensor holding
  ``0 .. n-1`` once each. Applying it puts the old unit ``perm[i]`` at position ``i`` (along
  every listed axis: ``new = old.index_select(axis, perm)``).
* The network's input channels and the classifier's outputs are never permuted; they are
  listed in ``PermutationSpec.fixed``.
* BatchNorm: ``weight``, ``bias``, ``running_mean`` and ``running_var`` move with their
  channel; ``num_batches_tracked`` is a scalar and is left alone.
* A Linear layer after ``Flatten`` of a ``(C, H, W)`` feature map sees channel-major features
  (``c * H * W + position``), so its input axis permutes in blocks of ``H * W`` entries
  (``AxisRef.block``).
* Units joined by a residual sum share one group. In a ResNet stage whose blocks have identity
  shortcuts, the stage's input channels, every block's ``conv2``/``bn2`` outputs and the
  outputs of a projection shortcut that starts the stage are one group (a *residual stream*);
  each block's inner ``conv1``/``bn1`` units form a group of their own.

Where activations are measured
------------------------------
Every probe reads *pre-ReLU* activations: the BatchNorm output of a conv-BN layer, the output
of a Linear layer, and for a residual stream the input of the block's final ReLU (the sum of
the residual branch and the shortcut) plus the stem's BatchNorm output. ReLU is monotone, so
the pre-activation carries all the information of the post-activation, and unlike the
post-activation it is never identically zero: a unit that is dead on the alignment data has
no defined correlation, and the matching would be arbitrary for it. Spatial positions of conv
features count as extra samples. A group measured at several probes (a residual stream) sums
the correlation matrices of its probes before solving the assignment, as Git Re-Basin does for
weight matching of residual groups.

Group counts
------------
``mlp``: 2 (``fc1``, ``fc2``). ``cnn``: 3 (``conv1``, ``conv2``, ``fc1``). ResNet-(6n+2): 3
residual streams (one per stage) plus one inner group per block, ``3 + 3n``: 12 for
``resnet20``, 18 for ``resnet32``.

Adding a model
--------------
A plain chain of Conv/Linear/BatchNorm layers with unit-wise activations, pooling and a
flatten needs nothing: :func:`derive_spec` traces it with torch.fx and derives its spec (for
``mlp`` and ``cnn`` it gives exactly the hand-written specs below). Anything else (residual
sums, concatenations, shared layers) needs a spec written by hand: a function
``model -> PermutationSpec`` (the :class:`SpecBuilder` helper makes it short), either
registered for the model class with :func:`register_spec`, from anywhere (for instance next to
the model), or, for a user's factory ``model = "module:make_net"``, put beside the factory as
``make_net.permutation_spec`` or a module-level function ``permutation_spec``. The aligner
itself never changes: it only reads the spec. Subclasses inherit their parent's registration.
:func:`permutation_spec` validates every spec it returns, so a spec that misses a layer fails
loudly instead of silently breaking the function.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm

from fedwa.models import FEDWA_LOOKUP_ATTR, MLP, ResNet, SmallCNN

# Added to the product of standard deviations: keeps a constant (dead) unit's correlations at
# 0 instead of 0/0.
_CORR_EPS = 1e-8


@dataclass(frozen=True)
class AxisRef:
    """One axis of one state-dict entry that a permutation group acts on.

    Attributes
    ----------
    key : str
        State-dict key, e.g. ``"fc1.weight"``.
    axis : int
        Axis of that tensor.
    block : int
        Consecutive entries per unit along the axis: 1 normally, ``H * W`` for the input axis
        of a Linear layer that reads a flattened ``(C, H, W)`` feature map.
    """

    key: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Probe:
    """A point where a group's unit activations are read: a submodule's input or output.

    Attributes
    ----------
    module : str
        Name of the submodule in ``model.named_modules()``.
    where : str
        ``"output"`` or ``"input"`` (the first positional input) of that submodule.
    """

    module: str
    where: str = "output"


@dataclass(frozen=True)
class PermGroup:
    """Units permuted together.

    Attributes
    ----------
    size : int
        Number of units.
    axes : tuple of AxisRef
        Every tensor axis the permutation acts on.
    probes : tuple of Probe
        Where the units' activations are measured for :func:`align_to`; the activation's
        axis 1 (axis -1 for 2-D activations) indexes the units.
    """

    size: int
    axes: tuple[AxisRef, ...]
    probes: tuple[Probe, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation groups of a model.

    Attributes
    ----------
    groups : dict of str to PermGroup
        Named groups, in the model's forward order.
    fixed : tuple of (str, int)
        ``(key, axis)`` pairs that are unit axes but must never be permuted: the network's
        input channels and the classifier's outputs.
    """

    groups: dict[str, PermGroup] = field(default_factory=dict)
    fixed: tuple[tuple[str, int], ...] = ()


class SpecBuilder:
    """Declare a :class:`PermutationSpec` from a model's named submodules.

    Parameters
    ----------
    model : torch.nn.Module
        The model the spec is for; only its module names and layer types are read.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> b = SpecBuilder(net)
    >>> b.group("hidden", 3)
    >>> b.produces("hidden", "0"); b.consumes("hidden", "2"); b.probe("hidden", "0")
    >>> b.fix("0.weight", 1); b.fix("2.weight", 0); b.fix("2.bias", 0)
    >>> sorted(b.build().groups["hidden"].axes, key=lambda a: a.key)[0]
    AxisRef(key='0.bias', axis=0, block=1)
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = dict(model.named_modules())
        self._groups: dict[str, tuple[int, list[AxisRef], list[Probe]]] = {}
        self._fixed: list[tuple[str, int]] = []

    def _module(self, name: str) -> nn.Module:
        if name not in self._modules:
            raise KeyError(f"model has no submodule {name!r}")
        return self._modules[name]

    def group(self, name: str, size: int) -> None:
        """Start a new group of ``size`` units."""
        if name in self._groups:
            raise ValueError(f"group {name!r} declared twice")
        self._groups[name] = (int(size), [], [])

    def produces(self, group: str, module: str) -> None:
        """``module``'s output units belong to ``group`` (Conv, Linear or BatchNorm)."""
        mod, axes = self._module(module), self._groups[group][1]
        if isinstance(mod, _BatchNorm):
            names = (["weight", "bias"] if mod.affine else []) + (
                ["running_mean", "running_var"] if mod.track_running_stats else []
            )
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if getattr(mod, "groups", 1) != 1:
                raise TypeError(f"grouped convolution {module!r} is not supported")
            names = ["weight"] + (["bias"] if mod.bias is not None else [])
        else:
            raise TypeError(f"cannot permute the outputs of {type(mod).__name__} {module!r}")
        axes.extend(AxisRef(f"{module}.{n}", 0) for n in names)

    def consumes(self, group: str, module: str, block: int = 1) -> None:
        """``module`` (Conv or Linear) reads ``group``'s units on its input axis."""
        mod = self._module(module)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"cannot permute the inputs of {type(mod).__name__} {module!r}")
        if getattr(mod, "groups", 1) != 1:
            raise TypeError(f"grouped convolution {module!r} is not supported")
        self._groups[group][1].append(AxisRef(f"{module}.weight", 1, int(block)))

    def probe(self, group: str, module: str, where: str = "output") -> None:
        """Measure ``group``'s activations at ``module``'s output (or input)."""
        self._module(module)
        self._groups[group][2].append(Probe(module, where))

    def fix(self, key: str, axis: int) -> None:
        """Declare ``(key, axis)`` a unit axis that is never permuted."""
        self._fixed.append((key, int(axis)))

    def build(self) -> PermutationSpec:
        """The declared spec."""
        groups = {
            name: PermGroup(size, tuple(axes), tuple(probes))
            for name, (size, axes, probes) in self._groups.items()
        }
        return PermutationSpec(groups, tuple(self._fixed))


SpecFn = Callable[[nn.Module], PermutationSpec]

#: Spec builders by model class; extend with :func:`register_spec`.
SPEC_BUILDERS: dict[type, SpecFn] = {}


def register_spec(cls: type) -> Callable[[SpecFn], SpecFn]:
    """Register a spec builder for a model class (decorator).

    Parameters
    ----------
    cls : type
        An ``nn.Module`` subclass; its subclasses use the same builder unless they register
        their own.

    Returns
    -------
    callable
        A decorator that registers ``fn(model) -> PermutationSpec`` and returns it unchanged.
    """

    def decorator(fn: SpecFn) -> SpecFn:
        SPEC_BUILDERS[cls] = fn
        return fn

    return decorator


@register_spec(MLP)
def _mlp_spec(model: nn.Module) -> PermutationSpec:
    b = SpecBuilder(model)
    for name, consumer in (("fc1", "fc2"), ("fc2", "classifier")):
        b.group(name, getattr(model, name).out_features)
        b.produces(name, name)
        b.consumes(name, consumer)
        b.probe(name, name)
    b.fix("fc1.weight", 1)
    b.fix("classifier.weight", 0)
    b.fix("classifier.bias", 0)
    return b.build()


@register_spec(SmallCNN)
def _cnn_spec(model: nn.Module) -> PermutationSpec:
    b = SpecBuilder(model)
    channels = model.conv2.out_channels
    if model.fc1.in_features % channels:
        raise ValueError("fc1 input is not a whole number of conv2 feature maps")
    for conv, bn, consumer, block in (
        ("conv1", "bn1", "conv2", 1),
        # Flatten is channel-major, so each conv2 channel owns H*W consecutive fc1 inputs.
        ("conv2", "bn2", "fc1", model.fc1.in_features // channels),
    ):
        b.group(conv, getattr(model, conv).out_channels)
        b.produces(conv, conv)
        b.produces(conv, bn)
        b.consumes(conv, consumer, block)
        b.probe(conv, bn)
    b.group("fc1", model.fc1.out_features)
    b.produces("fc1", "fc1")
    b.consumes("fc1", "classifier")
    b.probe("fc1", "fc1")
    b.fix("conv1.weight", 1)
    b.fix("classifier.weight", 0)
    b.fix("classifier.bias", 0)
    return b.build()


@register_spec(ResNet)
def _resnet_spec(model: nn.Module) -> PermutationSpec:
    b = SpecBuilder(model)
    streams = 0
    stream = f"residual{streams}"
    b.group(stream, model.bn1.num_features)
    b.produces(stream, "conv1")
    b.produces(stream, "bn1")
    b.probe(stream, "bn1")
    for stage_name in ("layer1", "layer2", "layer3"):
        for index, block in enumerate(getattr(model, stage_name)):
            p = f"{stage_name}.{index}"
            b.consumes(stream, f"{p}.conv1")
            if not isinstance(block.shortcut, nn.Identity):
                # A projection shortcut decouples the block's output channels from its input
                # channels, so a new residual stream starts here.
                if not (
                    isinstance(block.shortcut, nn.Sequential)
                    and len(block.shortcut) == 2
                    and isinstance(block.shortcut[0], nn.Conv2d)
                    and isinstance(block.shortcut[1], _BatchNorm)
                ):
                    raise TypeError(f"{p}.shortcut must be Identity or Sequential(Conv2d, BN)")
                b.consumes(stream, f"{p}.shortcut.0")
                streams += 1
                stream = f"residual{streams}"
                b.group(stream, block.conv2.out_channels)
                b.produces(stream, f"{p}.shortcut.0")
                b.produces(stream, f"{p}.shortcut.1")
            inner = f"{p}.conv1"
            b.group(inner, block.conv1.out_channels)
            b.produces(inner, f"{p}.conv1")
            b.produces(inner, f"{p}.bn1")
            b.consumes(inner, f"{p}.conv2")
            b.probe(inner, f"{p}.bn1")
            b.produces(stream, f"{p}.conv2")
            b.produces(stream, f"{p}.bn2")
            b.probe(stream, f"{p}.relu2", "input")
    b.consumes(stream, "classifier")
    b.fix("conv1.weight", 1)
    b.fix("classifier.weight", 0)
    b.fix("classifier.bias", 0)
    return b.build()


# --- automatic specs for plain chains ---------------------------------------------------------

# The network's input: its channels are never permuted.
_INPUT = "<input>"

# Layers that act on every unit alike (or per unit, without mixing units): a unit keeps its
# index through them, so they pass a group on unchanged.
_UNIT_WISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    # Softmax over the units reorders with them (only the shape check below applies).
    nn.Softmax, nn.LogSoftmax,
)
_UNIT_WISE_FUNCTIONS: tuple[Callable[..., object], ...] = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.tanh,
    F.sigmoid, F.hardtanh, F.hardsigmoid, F.hardswish, F.softplus, F.dropout, F.dropout1d,
    F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    torch.relu, torch.tanh, torch.sigmoid, F.softmax, F.log_softmax, torch.softmax,
    torch.log_softmax,
)
_UNIT_WISE_METHODS = ("relu", "relu_", "tanh", "sigmoid", "contiguous", "clone")
_FLATTENS_FUNCTIONS: tuple[Callable[..., object], ...] = (torch.flatten, torch.reshape)
_FLATTENS_METHODS = ("flatten", "view", "reshape")
# Arithmetic with a number (x * 2, x / 255) scales every unit alike; with two tensors it joins
# two paths (a residual sum), which a chain has not.
_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
               torch.add, torch.sub, torch.mul, torch.div)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class UnsupportedModel(TypeError):
    """:func:`derive_spec` cannot derive a spec: the model is not a plain layer chain."""


@dataclass
class _Pending:
    """A group while the graph is walked: its producers, consumers and probe point."""

    size: int
    producers: list[str]
    consumers: list[tuple[str, int]] = field(default_factory=list)
    probe: str = ""


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"{name} (node {node.name!r})"


def _shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def derive_spec(model: nn.Module, input_shape: Sequence[int]) -> PermutationSpec:
    """Derive the permutation spec of a plain Conv/Linear/BatchNorm chain with torch.fx.

    The model is traced (``torch.fx.symbolic_trace``) and run once, in eval mode and without
    gradients, on zeros of ``[2, *input_shape]`` to learn every intermediate shape. Walking
    the graph in order, every Conv or Linear layer starts a group of its output units,
    named after the layer; a BatchNorm right after joins its producer's group and becomes
    the probe (pre-ReLU, as in the hand-written specs); unit-wise layers and functions
    (ReLU-like activations, dropout, max/average pooling, scaling by a number) pass a
    group on; a flatten of a ``(C, H, W)`` map (``nn.Flatten``, ``torch.flatten(x, 1)``,
    ``x.view(n, -1)``...) makes the next Linear read each unit in blocks of ``H * W``. The
    network input's channels and the last group's units (the outputs) are fixed. For fedwa's
    ``mlp`` and ``cnn`` the result equals their hand-written specs.

    Parameters
    ----------
    model : torch.nn.Module
        The model; left as it was (its training flags are restored, nothing is updated).
    input_shape : sequence of int
        Shape of one example, e.g. ``(C, H, W)``.

    Returns
    -------
    PermutationSpec
        Checked with :func:`validate_spec`.

    Raises
    ------
    UnsupportedModel
        Naming the first thing that is not a plain chain: a node joining two tensors (a
        residual sum, a concatenation), a layer or function the walk does not know, a layer
        called twice (shared weights), a parameter used directly, or a trace failure.
    """
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any trace failure means "not derivable"
        raise UnsupportedModel(f"torch.fx cannot trace it ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]})") from None
    modules = dict(model.named_modules())
    flags = {name: m.training for name, m in modules.items()}
    param = next(model.parameters(), None)
    example = torch.zeros(2, *input_shape, device=param.device if param is not None else None,
                          dtype=param.dtype if param is not None and param.is_floating_point()
                          else None)
    try:
        graph_module.eval()
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    except Exception as err:  # noqa: BLE001
        raise UnsupportedModel(f"its forward fails on an input of shape {tuple(example.shape)} "
                               f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                               ) from None
    finally:
        # The traced module shares its layers with the model: put every flag back.
        for name, m in modules.items():
            m.training = flags[name]

    state: dict[fx.Node, tuple[str, int]] = {}
    groups: dict[str, _Pending] = {}
    fixed: list[tuple[str, int]] = []
    called: set[str] = set()
    output_state: tuple[str, int] | None = None

    def consume(source: tuple[str, int], module: str) -> None:
        group, block = source
        if group == _INPUT:
            fixed.append((f"{module}.weight", 1))
        else:
            groups[group].consumers.append((module, block))

    def produce_fixed(module: str) -> list[str]:
        mod = modules[module]
        if isinstance(mod, _BatchNorm):
            return (["weight", "bias"] if mod.affine else []) + (
                ["running_mean", "running_var"] if mod.track_running_stats else [])
        return ["weight"] + (["bias"] if getattr(mod, "bias", None) is not None else [])

    for node in graph_module.graph.nodes:
        inputs = [a for a in node.all_input_nodes if a in state]
        shape = _shape(node)
        if node.op == "placeholder":
            if state:
                raise UnsupportedModel(f"its forward takes more than one input ({node.name})")
            state[node] = (_INPUT, 1)
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or result not in state:
                raise UnsupportedModel("its forward does not return a single tensor")
            output_state = state[result]
            continue
        if shape is None:
            continue  # sizes and shapes (x.size(0)) carry no units
        if node.op == "get_attr":
            raise UnsupportedModel(f"its forward uses the tensor {node.target!r} directly, not "
                                   "through a layer")
        # Every tensor node either gets a state or stops the walk, so the inputs not in
        # `state` are sizes; a tensor built from none of the traced ones (a constant, a piece
        # of a split) has no units the walk can follow.
        if len(inputs) > 1:
            raise UnsupportedModel(f"{_op_name(node)} joins {len(inputs)} tensors "
                                   f"({', '.join(a.name for a in inputs)}: a residual sum or a "
                                   "concatenation)")
        if not inputs:
            raise UnsupportedModel(f"{_op_name(node)} makes a tensor the walk cannot follow")
        source = state[inputs[0]]
        in_shape = _shape(inputs[0]) or ()
        if node.op == "call_module":
            name = str(node.target)
            mod = modules[name]
            # A parameter-free layer (one ReLU object used after every conv) may be reused;
            # a layer with weights or statistics called twice ties two groups together.
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                if name in called:
                    raise UnsupportedModel(f"layer {name!r} is called twice (shared weights)")
                called.add(name)
            if isinstance(mod, _WEIGHTED):
                rank = 2 if isinstance(mod, nn.Linear) else 2 + {nn.Conv1d: 1, nn.Conv2d: 2,
                                                                   nn.Conv3d: 3}[type(mod)]
                if len(in_shape) != rank or getattr(mod, "groups", 1) != 1:
                    raise UnsupportedModel(f"{type(mod).__name__} {name!r} gets an input of "
                                           f"shape {in_shape} (or is grouped); a chain feeds a "
                                           f"Linear [n, features] and a Conv [n, C, ...]")
                consume(source, name)
                size = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
                groups[name] = _Pending(int(size), [name], probe=name)
                state[node] = (name, 1)
            elif isinstance(mod, _BatchNorm):
                group, block = source
                if block != 1:
                    raise UnsupportedModel(f"BatchNorm {name!r} normalises a flattened "
                                           "feature map (per position, not per channel)")
                if group == _INPUT:
                    fixed.extend((f"{name}.{key}", 0) for key in produce_fixed(name))
                else:
                    groups[group].producers.append(name)
                    groups[group].probe = name
                state[node] = source
            elif isinstance(mod, nn.Flatten):
                state[node] = _flattened(node, source, in_shape, shape)
            elif isinstance(mod, _UNIT_WISE_MODULES):
                state[node] = source
            else:
                raise UnsupportedModel(f"it has a {type(mod).__name__} layer ({name!r}) the "
                                       "automatic derivation does not know")
        elif node.op == "call_function" and node.target in _FLATTENS_FUNCTIONS or (
                node.op == "call_method" and node.target in _FLATTENS_METHODS):
            state[node] = _flattened(node, source, in_shape, shape)
        elif (node.op == "call_function" and node.target in _UNIT_WISE_FUNCTIONS + _ARITHMETIC
              or node.op == "call_method" and node.target in _UNIT_WISE_METHODS):
            # Pooling may shrink the spatial axes; the batch and unit axes must stay.
            if len(shape) != len(in_shape) or shape[:2] != in_shape[:2]:
                raise UnsupportedModel(f"{_op_name(node)} changes the shape {in_shape} to "
                                       f"{shape}")
            state[node] = source
        else:
            raise UnsupportedModel(f"it calls {_op_name(node)}, which the automatic "
                                   "derivation does not know")

    b = SpecBuilder(model)
    out_group = output_state[0] if output_state is not None else _INPUT
    for name, pending in groups.items():
        if name == out_group:
            continue
        b.group(name, pending.size)
        for module in pending.producers:
            b.produces(name, module)
        for module, block in pending.consumers:
            b.consumes(name, module, block)
        b.probe(name, pending.probe)
    for key, axis in fixed:
        b.fix(key, axis)
    if out_group != _INPUT:
        # The last group's units are the model's outputs (the classes): never permuted.
        for module in groups[out_group].producers:
            for key in produce_fixed(module):
                b.fix(f"{module}.{key}", 0)
        for module, _ in groups[out_group].consumers:
            b.fix(f"{module}.weight", 1)
    spec = b.build()
    try:
        validate_spec(spec, model)
    except ValueError as err:
        raise UnsupportedModel(f"the derived spec does not cover it ({err})") from None
    return spec


def _flattened(node: fx.Node, source: tuple[str, int], in_shape: tuple[int, ...],
               shape: tuple[int, ...]) -> tuple[str, int]:
    """The group and block after a reshape that must be a flatten ``[n, C, ...] -> [n, -1]``."""
    if shape == in_shape:
        return source
    if (len(shape) == 2 and len(in_shape) >= 2 and shape[0] == in_shape[0]
            and shape[1] == math.prod(in_shape[1:])):
        # Flatten is channel-major: each unit owns prod(spatial) consecutive features.
        return source[0], source[1] * math.prod(in_shape[2:])
    raise UnsupportedModel(f"{_op_name(node)} reshapes {in_shape} to {shape}, which is not a "
                           "flatten [n, C, ...] -> [n, C * ...]")


def permutation_spec(model: nn.Module,
                     input_shape: Sequence[int] | None = None) -> PermutationSpec:
    """The permutation spec of ``model``: the user's, a registered builder's, or derived.

    Looked up in this order:

    1. a spec function supplied beside the user's model factory (``model =
       "module:make_net"``): ``make_net.permutation_spec``, else a module-level
       ``permutation_spec(model) -> PermutationSpec`` in ``module``;
    2. the builder registered for the model's class or a base class
       (:func:`register_spec`; fedwa's ``MLP``, ``SmallCNN`` and ``ResNet`` have one);
    3. :func:`derive_spec`, for a plain Conv/Linear/BatchNorm chain, traced on an input of
       ``input_shape`` (default: the shape the user's factory was built for).

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    input_shape : sequence of int, optional
        Shape of one example, for step 3 when the model was not built by
        :func:`fedwa.models.build_model`.

    Returns
    -------
    PermutationSpec
        The spec, already checked with :func:`validate_spec`.

    Raises
    ------
    TypeError
        If no spec is supplied or registered and none can be derived; the message says why.
    ValueError
        If a supplied or registered spec does not fit the model.
    """
    from fedwa.models import model_origin

    origin = model_origin(model)
    if origin is not None and origin.spec_fn is not None:
        spec = origin.spec_fn(model)
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"the permutation_spec beside {origin.name} returned a "
                            f"{type(spec).__name__}, not a fedwa.core.alignment.PermutationSpec")
        validate_spec(spec, model)
        return spec
    for cls in type(model).__mro__:
        if cls in SPEC_BUILDERS:
            spec = SPEC_BUILDERS[cls](model)
            validate_spec(spec, model)
            return spec
    how = ("register one with fedwa.core.alignment.register_spec or put a permutation_spec(model) "
           "function beside the model factory")
    shape = input_shape if input_shape is not None else (
        origin.input_shape if origin is not None else None)
    if shape is None:
        raise TypeError(f"no permutation spec registered for {type(model).__name__}; {how}, "
                        "or pass input_shape to derive one")
    key = (type(model), tuple(shape),
           tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    if key not in _DERIVED:
        try:
            _DERIVED[key] = derive_spec(model, shape)
        except UnsupportedModel as err:
            raise TypeError(f"no permutation spec for {type(model).__name__}: it is not a plain "
                            f"Conv/Linear/BatchNorm chain, as {err}; {how}") from None
    return _DERIVED[key]


setattr(permutation_spec, FEDWA_LOOKUP_ATTR, True)  # see fedwa.models._user_spec_fn


# Derived specs by (class, input shape, state-dict shapes): DIMAT asks for the spec in every
# merge, and tracing costs milliseconds that add up.
_DERIVED: dict[tuple[object, ...], PermutationSpec] = {}


def validate_spec(spec: PermutationSpec, model: nn.Module | Mapping[str, Tensor]) -> None:
    """Check that a spec fits a model (or a state dict).

    Checks that every listed key exists and is floating point, that every listed axis has
    ``size * block`` entries, that no ``(key, axis)`` is listed twice, and coverage: axis 0 and,
    for tensors of 2 or more dimensions, axis 1 (the output and input units; later axes are
    kernel positions) of every floating-point entry are either permuted by some group or
    declared in ``spec.fixed``. With a model it also checks that every group has at least one
    probe and that the probed submodules exist.

    Parameters
    ----------
    spec : PermutationSpec
        The spec to check.
    model : torch.nn.Module or mapping of str to Tensor
        A model, or its state dict (then probes are not checked).

    Raises
    ------
    ValueError
        Listing every problem found.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else None
    problems: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for name, group in spec.groups.items():
        if group.size < 1:
            problems.append(f"group {name!r} has size {group.size}")
        for ref in group.axes:
            where = f"group {name!r}: {ref.key} axis {ref.axis}"
            if (ref.key, ref.axis) in seen:
                problems.append(f"{where} is also in {seen[ref.key, ref.axis]}")
            seen[ref.key, ref.axis] = f"group {name!r}"
            if ref.key not in state:
                problems.append(f"{where}: no such key")
                continue
            t = state[ref.key]
            if not t.is_floating_point():
                problems.append(f"{where}: not a floating-point entry")
            elif not 0 <= ref.axis < t.ndim:
                problems.append(f"{where}: tensor has {t.ndim} dimensions")
            elif ref.block < 1 or t.shape[ref.axis] != group.size * ref.block:
                problems.append(
                    f"{where}: has {t.shape[ref.axis]} entries, expected "
                    f"{group.size} units x {ref.block}"
                )
        if modules is not None:
            if not group.probes:
                problems.append(f"group {name!r} has no probe")
            for probe in group.probes:
                if probe.module not in modules:
                    problems.append(f"group {name!r}: no submodule {probe.module!r} to probe")
                if probe.where not in ("input", "output"):
                    problems.append(f"group {name!r}: probe where={probe.where!r}")
    for key, axis in spec.fixed:
        if (key, axis) in seen:
            problems.append(f"fixed {key} axis {axis} is also in {seen[key, axis]}")
        if key not in state:
            problems.append(f"fixed {key}: no such key")
        elif not 0 <= axis < state[key].ndim:
            problems.append(f"fixed {key} axis {axis}: tensor has {state[key].ndim} dimensions")
        seen[key, axis] = "fixed"
    for key, t in state.items():
        if not t.is_floating_point():
            continue
        for axis in range(min(t.ndim, 2)):
            if (key, axis) not in seen:
                problems.append(f"{key} axis {axis} is neither permuted nor declared fixed")
    if problems:
        raise ValueError("permutation spec does not fit the model: " + "; ".join(problems))


def _check_perms(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> None:
    missing, unknown = set(spec.groups) - set(perms), set(perms) - set(spec.groups)
    if missing or unknown:
        raise ValueError(
            f"perms must name exactly the spec's groups; missing {sorted(missing)}, "
            f"unknown {sorted(unknown)}"
        )
    for name, group in spec.groups.items():
        perm = perms[name]
        if perm.ndim != 1 or len(perm) != group.size or not torch.equal(
            torch.sort(perm.detach().cpu().long()).values, torch.arange(group.size)
        ):
            raise ValueError(f"perms[{name!r}] is not a permutation of 0..{group.size - 1}")


def _expand(perm: Tensor, block: int) -> Tensor:
    """Index of a unit permutation on an axis where each unit owns ``block`` entries."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def permute_state(
    state: Mapping[str, Tensor], spec: PermutationSpec, perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Apply unit permutations to a state dict.

    Parameters
    ----------
    state : mapping of str to Tensor
        A state dict of a model that ``spec`` fits; it is not modified.
    spec : PermutationSpec
        The model's permutation spec.
    perms : mapping of str to Tensor
        One permutation per group of ``spec`` (all of them): along every axis of the group,
        the new unit ``i`` is the old unit ``perms[group][i]``.

    Returns
    -------
    dict of str to Tensor
        A new state dict with the same keys in the same order; every tensor is a new tensor
        (entries no group touches are cloned), so the result shares no memory with ``state``.

    Raises
    ------
    ValueError
        If ``perms`` does not hold exactly one valid permutation per group, or a key of the
        spec is missing from ``state``.
    """
    _check_perms(spec, perms)
    ops: dict[str, list[tuple[int, Tensor]]] = {}
    for name, group in spec.groups.items():
        perm = perms[name].detach().cpu().long()
        for ref in group.axes:
            if ref.key not in state:
                raise ValueError(f"state has no entry {ref.key!r} listed in group {name!r}")
            ops.setdefault(ref.key, []).append((ref.axis, _expand(perm, ref.block)))
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key not in ops:
            out[key] = t.detach().clone()
            continue
        for axis, index in ops[key]:
            t = t.detach().index_select(axis, index.to(t.device))
        out[key] = t
    return out


def random_permutations(
    spec: PermutationSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Draw a uniformly random permutation for every group.

    Parameters
    ----------
    spec : PermutationSpec
        The groups to draw for.
    generator : torch.Generator, optional
        Source of randomness; groups are drawn in the spec's order, so a seeded generator
        gives reproducible permutations.

    Returns
    -------
    dict of str to Tensor
        ``int64`` permutations, keyed by group name.
    """
    return {
        name: torch.randperm(group.size, generator=generator)
        for name, group in spec.groups.items()
    }


def _units(t: Tensor) -> Tensor:
    """Activations as a ``(samples, units)`` matrix; spatial positions count as samples."""
    if t.ndim < 2:
        raise ValueError(f"cannot read units from an activation of shape {tuple(t.shape)}")
    if t.ndim > 2:
        t = t.movedim(1, -1).reshape(-1, t.shape[1])
    # float32 is accurate enough within one batch once centred (below); float64 inputs stay.
    return t if t.dtype == torch.float64 else t.float()


class _CorrStats:
    """Running moments from which the Pearson correlation of two unit sets follows.

    Each batch is centred on its own mean before its products are taken, and batches are
    combined in float64 with the pairwise update of Chan, Golub and LeVeque (1979). This is
    the sums-of-x, x^2, xy approach without its cancellation (``E[x^2] - E[x]^2`` loses
    precision when means are large), and it lets the large per-batch products run in float32.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean_a = self.mean_b = self.m2_a = self.m2_b = self.m2_ab = None

    def update(self, a: Tensor, b: Tensor) -> None:
        a, b = _units(a), _units(b)
        if a.shape != b.shape:
            raise ValueError(f"activation shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        k = a.shape[0]
        mean_a, mean_b = a.mean(0), b.mean(0)
        a, b = a - mean_a, b - mean_b
        batch = (
            mean_a.double(),
            mean_b.double(),
            (a * a).sum(0).double(),
            (b * b).sum(0).double(),
            (a.T @ b).double(),
        )
        if self.n == 0:
            self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.m2_ab = batch
            self.n = k
            return
        n = self.n + k
        delta_a, delta_b = batch[0] - self.mean_a, batch[1] - self.mean_b
        scale = self.n * k / n
        self.m2_a += batch[2] + scale * delta_a**2
        self.m2_b += batch[3] + scale * delta_b**2
        self.m2_ab += batch[4] + scale * torch.outer(delta_a, delta_b)
        self.mean_a += delta_a * (k / n)
        self.mean_b += delta_b * (k / n)
        self.n = n

    def correlation(self) -> np.ndarray:
        std_a, std_b = self.m2_a.clamp_min(0).sqrt(), self.m2_b.clamp_min(0).sqrt()
        # The 1/n factors of covariance and standard deviations cancel.
        corr = self.m2_ab / (torch.outer(std_a, std_b) + _CORR_EPS * self.n)
        return np.nan_to_num(corr.cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def align_to(
    reference: nn.Module,
    other: nn.Module,
    x: Tensor,
    spec: PermutationSpec,
    *,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Permutations that align ``other``'s hidden units to ``reference``'s (activation matching).

    Both models see the same inputs in eval mode without gradients. For every group, at each
    of its probes, the Pearson correlation between every reference unit and every unit of
    ``other`` is accumulated over all inputs (and spatial positions); a group with several
    probes sums their correlation matrices. The matching maximising the total correlation is
    then found with :func:`scipy.optimize.linear_sum_assignment`, as in Git Re-Basin's
    activation matching (Ainsworth et al. 2023) used by DIMAT (Saadati et al. 2024). Groups
    are matched independently of each other, from the unpermuted activations, which is exact
    because a group's activations do not depend on how other groups are ordered.

    Parameters
    ----------
    reference : torch.nn.Module
        The model to align to.
    other : torch.nn.Module
        A model of the same architecture.
    x : torch.Tensor
        Inputs, ``(N, ...)``; moved batch by batch to each model's device.
    spec : PermutationSpec
        The architecture's spec (:func:`permutation_spec`).
    batch_size : int, optional
        Inputs per forward pass; memory is bounded by one batch's activations of the probed
        layers plus ``units x units`` sums per probe, whatever ``N``.

    Returns
    -------
    dict of str to Tensor
        One ``int64`` CPU permutation per group, such that
        ``permute_state(other.state_dict(), spec, perms)`` is aligned to ``reference``: its
        unit ``i`` is the unit of ``other`` matched to the reference's unit ``i``.

    Raises
    ------
    ValueError
        If ``x`` is empty, ``batch_size < 1``, the spec does not fit a model, or the models'
        state dicts differ in keys or shapes.

    Notes
    -----
    Both models are put in eval mode for the passes and restored to their previous mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("x holds no inputs to align on")
    validate_spec(spec, reference)
    validate_spec(spec, other)
    ref_state, other_state = reference.state_dict(), other.state_dict()
    if set(ref_state) != set(other_state) or any(
        ref_state[k].shape != other_state[k].shape for k in ref_state
    ):
        raise ValueError("reference and other must have the same state-dict keys and shapes")

    points = [(name, probe) for name, g in spec.groups.items() for probe in g.probes]
    stats = [_CorrStats() for _ in points]
    pending: dict[int, Tensor] = {}

    def grab(probe: Probe, inputs: tuple, output: Tensor) -> Tensor:
        return inputs[0] if probe.where == "input" else output

    def ref_hook(i: int, probe: Probe) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if i in pending:
                raise RuntimeError(f"{probe.module!r} ran twice in one forward pass")
            pending[i] = grab(probe, inputs, output).detach()

        return hook

    def other_hook(i: int, probe: Probe) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if i not in pending:
                raise RuntimeError(f"{probe.module!r} ran a different number of times")
            # Consuming the reference's activation right away keeps only one model's
            # activations in memory.
            ref = pending.pop(i)
            stats[i].update(ref, grab(probe, inputs, output).detach().to(ref.device))

        return hook

    ref_modules, other_modules = dict(reference.named_modules()), dict(other.named_modules())
    handles = []
    modes = (reference.training, other.training)
    try:
        for i, (_, probe) in enumerate(points):
            handles.append(ref_modules[probe.module].register_forward_hook(ref_hook(i, probe)))
            handles.append(
                other_modules[probe.module].register_forward_hook(other_hook(i, probe))
            )
        reference.eval()
        other.eval()
        ref_dev, other_dev = _device(reference), _device(other)
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size]
                reference(xb.to(ref_dev))
                if len(pending) != len(points):
                    raise RuntimeError("some probed modules did not run in the forward pass")
                other(xb.to(other_dev))
                if pending:
                    raise RuntimeError("some probed modules did not run in the other model")
    finally:
        for handle in handles:
            handle.remove()
        pending.clear()
        reference.train(modes[0])
        other.train(modes[1])

    perms: dict[str, Tensor] = {}
    for name, group in spec.groups.items():
        corr = np.zeros((group.size, group.size))
        for (owner, _), st in zip(points, stats):
            if owner == name:
                c = st.correlation()
                if c.shape != corr.shape:
                    raise ValueError(
                        f"group {name!r}: probe has {c.shape[0]} units, expected {group.size}"
                    )
                corr += c
        rows, cols = linear_sum_assignment(corr, maximize=True)
        perm = torch.empty(group.size, dtype=torch.long)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        perms[name] = perm
    return perms


def merge_aligned(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Weighted average of aligned state dicts (DIMAT's ``sum_j W_ij permuted(w_j)``).

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        State dicts with the same keys and shapes, already aligned to a common unit order.
    weights : sequence of float
        Nonnegative weights, one per state, with a positive sum; they are divided by their sum,
        so a row of a mixing matrix and raw example counts both work.

    Returns
    -------
    dict of str to Tensor
        Floating-point entries: the weighted average, computed in float64 and returned in the
        first state's dtype. Other entries (BatchNorm's ``num_batches_tracked``): a copy of the
        first state's value, since a counter has no meaningful average. BatchNorm running
        statistics are averaged like parameters; recompute them on data afterwards, as DIMAT
        does.

    Raises
    ------
    ValueError
        If the states or weights are empty, mismatched or invalid.
    """
    if not states or len(states) != len(weights):
        raise ValueError(
            f"need one weight per state, got {len(states)} states and {len(weights)} weights"
        )
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    w = w / w.sum()
    first = states[0]
    for s in states[1:]:
        if set(s) != set(first) or any(s[k].shape != first[k].shape for k in first):
            raise ValueError("states must have the same keys and shapes")
    out: dict[str, Tensor] = {}
    for key, t in first.items():
        if not t.is_floating_point():
            out[key] = t.detach().clone()
            continue
        acc = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for wk, s in zip(w, states):
            acc += float(wk) * s[key].detach().to(device=t.device, dtype=torch.float64)
        out[key] = acc.to(t.dtype)
    return out
