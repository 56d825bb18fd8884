"""What runs after every round of a run: evaluating the global model, writing the run folder
(``metrics.jsonl``, ``summary.json``, plots) under its lock, and checkpoints to resume from.
Above the strategies (the evaluator asks the strategy which models to evaluate), below the
composition root that builds them (:mod:`fedwa.run.compose`)."""
