"""What a run leaves on disk while it goes: the run folder and its lock, ``metrics.jsonl``,
``summary.json`` and plots, and checkpoints to resume from."""
