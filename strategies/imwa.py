"""IMWA: Iterative Model Weight Averaging.

Huang et al., "IMWA: Iterative Model Weight Averaging Benefits Class-Imbalanced Learning
Tasks", 2024 (arXiv 2404.16331). K models train from one initialisation for an episode; the
server averages them and the average starts the next episode. ``imwa-episodes = 1`` is vanilla
model weight averaging (MWA) at the same total compute. With ``partition = "replicas"`` every
client holds the whole training set in its own order, as in the paper.

The total local budget is the run's: ``num-server-rounds`` x ``local-epochs`` epochs (or
x ``local-steps`` steps when those are set). It is split into ``imwa-episodes`` episodes of
whole epochs (steps): ``equal``, or ``increasing`` (lengths proportional to 1, 2, ..., E, so
averaging happens more often early, where the paper finds it helps most). The learning-rate
schedule follows the global progress through the budget and does not restart per episode.
``imwa-ema-decay > 0`` also keeps a server-side EMA of the episode averages, evaluated and
reported beside them (``ema_*`` metrics); training continues from the plain average.

The average is uniform over the K models (``imwa-weighting = uniform``, the paper's
``w <- (1/K) sum_k w_k``); ``examples`` weights each client by its number of training examples,
as FedAvg does. The two are identical under ``replicas``, where every client holds the whole
training set; they differ on a federated partition, where ``examples`` with one episode per
round *is* FedAvg.

BatchNorm: the learnable parameters are averaged; the running statistics of the evaluated
average (and of its EMA) are recomputed on data before evaluation (``imwa-bn = recompute``,
the project default for every averaged model, through ``bn-recompute``: centrally on the
server split or federatedly), since the mean of K models' running statistics is not the
statistics of the mean model. ``imwa-bn = average`` evaluates the averaged buffers as they
are. Either way the next episode starts from the plain average, buffers included: the clients'
training replaces the running statistics within a few dozen steps.

The K replicas share an architecture and, with ``partition = "replicas"``, a step count, so
``batch-clients = true`` trains them in one batched computation (:mod:`fedwa.core.batched`): on
digits, 10 replicas of the mlp ran in 0.61x the time of one-by-one training, to the same
accuracy (README, "Benchmarks").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedwa.flower.arrays import to_state_dict
from fedwa.core.averaging import ExponentialAverage
from fedwa.common.keys import Key, at_least
from fedwa.common.errors import ConfigError
from strategies.fedavg import FedAvg


def episode_lengths(budget: int, episodes: int, schedule: str) -> list[int]:
    """Split ``budget`` whole units into ``episodes`` lengths of at least 1 that sum to it.

    ``equal``: as equal as possible, longer ones last. ``increasing``: proportional to
    1..E (largest remainders get the leftover units, ties to later episodes).
    """
    if not 1 <= episodes <= budget:
        raise ValueError(f"need 1 <= episodes <= budget, got {episodes} and {budget}")
    if schedule == "equal":
        base, extra = divmod(budget, episodes)
        return [base + (1 if e >= episodes - extra else 0) for e in range(episodes)]
    if schedule == "increasing":
        total = episodes * (episodes + 1) / 2
        spare = budget - episodes  # every episode gets 1 unit first
        shares = [spare * (e + 1) / total for e in range(episodes)]
        lengths = [1 + int(s) for s in shares]
        leftover = budget - sum(lengths)
        order = sorted(range(episodes), key=lambda e: (shares[e] - int(shares[e]), e),
                       reverse=True)
        for e in order[:leftover]:
            lengths[e] += 1
        return lengths
    raise ValueError(f"unknown episode schedule {schedule!r}")


class IMWA(FedAvg):
    """Episodes of parallel training from a shared start, averaged at every episode's end."""

    config_keys = (
        Key("imwa-episodes", 0, "imwa: number of episodes (0 = num-server-rounds; 1 = vanilla "
            "MWA).", check=at_least(0)),
        Key("imwa-schedule", "equal", "imwa: episode lengths.", choices=("equal", "increasing")),
        Key("imwa-ema-decay", 0.0, "imwa: decay of a server EMA of the episode averages "
            "(0 = off).", check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),
        Key("imwa-weighting", "uniform", "imwa: weights of the episode average: uniform over "
            "the K models (the paper's) or by example count (FedAvg's).",
            choices=("uniform", "examples")),
        Key("imwa-bn", "recompute", "imwa: BatchNorm statistics of the evaluated averages: "
            "recomputed on data (bn-recompute says where) or the averaged buffers as they are.",
            choices=("recompute", "average")),
    )
    recompute_bn = frozenset({"global", "ema"})

    def __init__(self, *args: Any, imwa_episodes: int = 0, imwa_schedule: str = "equal",
                 imwa_ema_decay: float = 0.0, imwa_weighting: str = "uniform",
                 imwa_bn: str = "recompute", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if imwa_weighting not in ("uniform", "examples"):
            raise ValueError(f"imwa_weighting must be 'uniform' or 'examples', got "
                             f"{imwa_weighting!r}")
        if imwa_bn not in ("recompute", "average"):
            raise ValueError(f"imwa_bn must be 'recompute' or 'average', got {imwa_bn!r}")
        self.weighting = imwa_weighting
        # An instance attribute shadows the class's: the evaluator reads it per strategy.
        self.recompute_bn = frozenset({"global", "ema"} if imwa_bn == "recompute" else ())
        self.episodes, self.schedule = imwa_episodes, imwa_schedule
        # A strategy built directly learns the run's length in start() (bind_rounds).
        self.bind_rounds(int(self.run_config.get("num-server-rounds", 1)))
        self.ema = ExponentialAverage(imwa_ema_decay) if imwa_ema_decay > 0 else None

    def bind_rounds(self, num_rounds: int) -> None:
        """Split the budget of ``num_rounds`` x ``local-epochs`` (or ``local-steps``) into the
        episodes. Without those keys in the run config a round is one epoch."""
        config = self.run_config
        self.unit = "local-steps" if int(config.get("local-steps", 0)) > 0 else "local-epochs"
        budget = num_rounds * int(config.get(self.unit, 1))
        episodes = self.episodes or num_rounds
        if episodes > budget:
            raise ConfigError("imwa-episodes", episodes, f"at most {budget}: the budget of "
                              f"{num_rounds} rounds x {config.get(self.unit, 1)} {self.unit}")
        self.lengths = episode_lengths(budget, episodes, self.schedule)
        self.budget = budget

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"imwa_episodes": int(config["imwa-episodes"]),
                "imwa_schedule": str(config["imwa-schedule"]),
                "imwa_ema_decay": float(config["imwa-ema-decay"]),
                "imwa_weighting": str(config["imwa-weighting"]),
                "imwa_bn": str(config["imwa-bn"])}

    def client_weights(self, replies: list[Message]) -> list[float]:
        """Uniform (the paper's mean of the K models) or example counts (FedAvg's)."""
        if self.weighting == "uniform":
            return [1.0] * len(replies)
        return super().client_weights(replies)

    def total_rounds(self) -> int:
        return len(self.lengths)

    def episode(self, server_round: int) -> tuple[int, float, float]:
        """Length of episode ``server_round`` and where it starts and ends in the budget."""
        if not 1 <= server_round <= len(self.lengths):
            raise ValueError(
                f"IMWA was planned for {len(self.lengths)} episodes (one per server round) and "
                f"round {server_round} is past them: run it with start(num_rounds=...), or build "
                "it with run_config={'num-server-rounds': R} (and imwa_episodes=E <= R)")
        done = sum(self.lengths[: server_round - 1])
        length = self.lengths[server_round - 1]
        return length, done / self.budget, (done + length) / self.budget

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        length, start, end = self.episode(server_round)
        config[self.unit] = length
        config["progress-start"], config["progress-end"] = start, end
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.ema is not None:
            self.ema.update(to_state_dict(arrays))
        return arrays, metrics

    def models_to_evaluate(self, server_round: int, arrays: ArrayRecord
                           ) -> dict[str, ArrayRecord]:
        if self.ema is None or self.ema.average is None:
            return {"global": arrays}
        return {"global": arrays, "ema": ArrayRecord(self.ema.average)}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
