"""Flower's Byzantine-robust aggregators by name, behind fedwa's reply guard.

fedwa's guard (:mod:`fedwa.flower.replies`) leaves out replies that are *malformed*: payloads that
are not what they declare, NaN/inf, impossible example counts. A reply that is well formed
but *wrong* (a client sending finite weights scaled by 10^6, or a model trained on flipped
labels) passes every such check; only the aggregation rule can limit its influence. These
classes are Flower's own rules (``flwr.serverapp.strategy``), wired like
:mod:`strategies.flower`: fedwa's keys, guard, seeded sampling and dtype-preserving
aggregates, and checkpoints from Flower's attributes.

=================  ==========================================  ==============================
name               rule                                        keys
=================  ==========================================  ==============================
``fedmedian``      coordinate-wise median                      --
``fedtrimmedavg``  coordinate-wise mean after cutting the      ``trimmed-beta``
                   ``beta`` share at each end
``krum``           the one reply closest to its                ``krum-malicious``
                   ``n - f - 2`` nearest others
``bulyan``         Multi-Krum selection, then a trimmed        ``bulyan-malicious``
                   median around the coordinate-wise median
=================  ==========================================  ==============================

None of them weights by ``num-examples`` (the median, Krum and Bulyan ignore it; a trimmed
mean is unweighted), so a client's example count cannot move the model either.

Each rule needs enough replies for its guarantee: Krum ``n >= 2f + 3``, Bulyan ``n >= 4f + 3``
(``f`` = ``*-malicious``). The config is refused when the sampled clients are too few, and a
round whose usable replies fall below the rule's minimum raises
:class:`~fedwa.common.errors.TooFewRepliesError` (retried ``round-retries`` times) rather than
keeping the old model quietly, which is what Flower's Bulyan does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Bulyan as FlowerBulyan
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian
from flwr.serverapp.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum

from fedwa.flower.arrays import new_array_record
from fedwa.common.keys import Key
from fedwa.common.errors import ConfigError, TooFewRepliesError
from strategies.base import FedwaStrategy
from strategies.foreign import AttributeState, ForeignMark, sampled_clients


def whole_number(value: float) -> str | None:
    """A key check: None for a whole number >= 0, else what is allowed."""
    return None if value >= 0 and value == int(value) else "a whole number >= 0"


class RobustAggregation:
    """What the robust rules share: a minimum of usable replies, checked at build time
    against the sampled clients and in every round against the usable replies."""

    #: The key holding the number of malicious clients tolerated, if the rule has one.
    malicious_key: ClassVar[str | None] = None
    #: The rule's minimum of usable replies, as the error messages say it.
    rule: ClassVar[str] = "1"

    @classmethod
    def replies_needed(cls, malicious: int) -> int:
        """Usable replies the rule needs to tolerate ``malicious`` bad ones."""
        return 1

    @classmethod
    def malicious(cls, config: Mapping[str, Any]) -> int:
        return int(config[cls.malicious_key]) if cls.malicious_key else 0

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Refuse a config whose rounds sample fewer clients than the rule needs."""
        if not cls.malicious_key:
            return
        f = cls.malicious(config)
        needed, sampled = cls.replies_needed(f), sampled_clients(config)
        if sampled < needed:
            raise ConfigError(cls.malicious_key, f,
                              f"at most a number f with {cls.rule} <= the {sampled} clients "
                              "a round samples (num-clients x fraction-train)")

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Flower's ``num_malicious_nodes`` from the rule's key, once the config is checked."""
        if not cls.malicious_key:
            return {}
        cls.check_config(config)
        return {"num_malicious_nodes": cls.malicious(config)}

    def aggregate_replies(self, server_round: int, replies: list[Message]
                          ) -> ArrayRecord | None:
        f = int(getattr(self, "num_malicious_nodes", 0))  # Flower's attribute, set or not
        needed = self.replies_needed(f)
        if len(replies) < needed:
            detail = "; ".join(f"node {n}: {p}" for n, p in self.last_failures[:3])
            raise TooFewRepliesError(
                f"round {server_round}: {type(self).__name__} needs {needed} usable replies "
                f"({self.rule}, f = {f}), got {len(replies)}" + (f" ({detail})" if detail else ""))
        # Flower's FedMedian and Bulyan pop the arrays out of the replies they aggregate; give
        # them copies of the records (the Array objects are shared, not their bytes), so the
        # round's replies stay whole for whatever reads them after the aggregation.
        key = self.arrayrecord_key  # type: ignore[attr-defined]
        kept = [(reply, reply.content[key]) for reply in replies]
        for reply, arrays in kept:
            reply.content[key] = new_array_record(dict(arrays.items()))
        try:
            return super().aggregate_replies(server_round, replies)  # type: ignore[misc]
        finally:
            for reply, arrays in kept:
                reply.content[key] = arrays


class FedMedian(RobustAggregation, AttributeState, FedwaStrategy, ForeignMark, FlowerFedMedian):
    """Coordinate-wise median of the replies (Yin et al., ICML 2018, arXiv 1803.01498)."""


class FedTrimmedAvg(RobustAggregation, AttributeState, FedwaStrategy, ForeignMark,
                    FlowerFedTrimmedAvg):
    """Coordinate-wise trimmed mean: the ``trimmed-beta`` share of the values at each end is
    cut before averaging (Yin et al., ICML 2018, arXiv 1803.01498)."""

    config_keys = (
        Key("trimmed-beta", 0.2, "fedtrimmedavg: share of the replies cut at each end of every "
            "coordinate before the mean.",
            check=lambda v: None if 0 <= v < 0.5 else "in [0, 0.5)"),
    )

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"beta": float(config["trimmed-beta"])}


class Krum(RobustAggregation, AttributeState, FedwaStrategy, ForeignMark, FlowerKrum):
    """Krum: the reply whose summed squared distance to its ``n - f - 2`` nearest replies is
    smallest becomes the model (Blanchard et al., NeurIPS 2017)."""

    config_keys = (
        Key("krum-malicious", 0, "krum: malicious clients f to tolerate; a round needs "
            "2f + 3 usable replies.", check=whole_number),
    )
    malicious_key = "krum-malicious"
    rule = "2f + 3"

    @classmethod
    def replies_needed(cls, malicious: int) -> int:
        return 2 * malicious + 3


class Bulyan(RobustAggregation, AttributeState, FedwaStrategy, ForeignMark, FlowerBulyan):
    """Bulyan: Multi-Krum picks ``n - 2f`` replies, then each coordinate is the mean of the
    ``n - 4f`` values nearest its median (El Mhamdi et al., ICML 2018, arXiv 1802.07927)."""

    config_keys = (
        Key("bulyan-malicious", 0, "bulyan: malicious clients f to tolerate; a round needs "
            "4f + 3 usable replies.", check=whole_number),
    )
    malicious_key = "bulyan-malicious"
    rule = "4f + 3"

    @classmethod
    def replies_needed(cls, malicious: int) -> int:
        return 4 * malicious + 3
