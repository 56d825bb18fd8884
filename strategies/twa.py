"""TWA: Trainable Weight Averaging over the server's global models.

Li et al., "Trainable Weight Averaging: Efficient Training by Optimizing Historical Solutions",
ICLR 2023 (arXiv 2205.13104); TWA-v / TWA-t and layer-wise coefficients from the journal
version. The candidates are the global models of rounds ``twa-start-round``,
``+ twa-every``, ... up to the last training round. Their learnable parameters (BatchNorm's
affine ones included, its buffers not) define the subspace ``w = c + P^T x`` with ``c`` their
mean, the SWA point, where TWA starts (``x = 0``); only the coefficients ``x`` are trained.

TWA-v and TWA-t are the journal version's variants, so their defaults are the authors'
journal code (nblt/TWA, ``journal`` branch); the conference code (``main`` branch) is one
setting away, each alternative documented:

- optimiser (``twa-optimizer``): ``adamw`` (journal, default), learning rate 1e-3, cosine
  schedule after a 20% linear warmup, no weight decay; ``sgd`` (``main``), momentum
  ``twa-momentum`` 0.9, learning rate 2, coupled L2 weight decay 1e-5 on the weights
  (``twa-weight-decay``), x0.1 at 50% and 75% of the fit. ``twa-lr = 0`` takes the
  reference's rate for the optimiser, ``twa-schedule = auto`` its schedule (:mod:`fedwa.core.twa`).
  The ``main`` branch's rate of 2 is not scale-free: it was set for CIFAR networks with
  ~100 candidates, and on fedwa's small models it diverged (digits, `cnn`: 12% against the
  SWA point's 82%; 0.05 to 0.5 trained well), so pass ``twa-lr`` with ``sgd``;
- basis (``twa-basis``): ``centred`` (journal, default), an orthonormal basis of the
  candidates' differences from their centre, the affine hull (combinations summing to 1);
  ``uncentred`` (``main``), of the span of the candidates, which contains the centre and the
  weights' overall scale, so weight decay acts within it.

Variants:

- ``twa-v`` fits the coefficients on the server's validation split (``server-val-fraction``)
  right after the last training round: ``twa-epochs`` (10, both branches) passes of
  ``twa-batch-size`` (128) batches. ``twa-bn-mode = train`` (both branches) runs BatchNorm on
  batch statistics during the fit; ``eval`` (fedwa's earlier fit) on the running statistics,
  first recomputed at the centre, so that the loss depends on the weights alone.
- ``twa-t`` needs no server data: ``twa-rounds`` extra rounds follow training; in each, the
  server sends ``w = c + P^T x``, every client returns the gradient of its local training
  loss at ``w`` (one model's worth of traffic; the ClientApp's gradient handler runs
  BatchNorm in train mode over batches of ``batch-size``, as the authors' fit does, and
  restores its buffers), the server averages the gradients by example count, projects them
  and takes one optimiser step. The schedule runs over the ``twa-rounds`` steps, one per
  round; its state (buffers, step count) is checkpointed with the strategy.

In both, the BatchNorm buffers of the TWA and SWA points come from the last global model and
are recomputed by the server before it evaluates them (``recompute_bn``, route
``bn-recompute``), as the ``main`` branch recomputes them (``bn_update``) after the fit. The
journal evaluates with the running statistics its train-mode fit left behind; fedwa does not
use those.

Both report the candidates' SWA point beside the TWA point (``swa_*`` metrics): the same
candidates, with and without training the coefficients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord

from fedwa.flower.arrays import average_records, to_state_dict
from fedwa.common.keys import Key, at_least
from fedwa.common.errors import ConfigError
from fedwa.core.twa import (
                            BASES,
                            BN_MODES,
                            OPTIMIZERS,
                            REFERENCE_LR,
                            SCHEDULES,
                            Subspace,
                            SubspaceOptimizer,
                            flatten,
                            layer_blocks,
                            learnable_names,
                            resolve_schedule,
                            )
from strategies.fedavg import FedAvg
from strategies.swa import half_run

log = logging.getLogger("fedwa")

GRADIENT_ACTION = f"{MessageType.TRAIN}.gradient"

SHARED_KEYS = (
    Key("twa-start-round", 0, "twa: first candidate round (0 = the second half of the run).",
        check=at_least(0)),
    Key("twa-every", 1, "twa: take every n-th round's global model as a candidate.",
        check=at_least(1)),
    Key("twa-layerwise", False, "twa: one coefficient vector per layer (journal version)."),
    Key("twa-basis", "centred", "twa: basis of the candidates' affine hull (centred, the "
        "authors' journal code) or of their span (uncentred, main branch).", choices=BASES),
    Key("twa-optimizer", "adamw", "twa: coefficient optimiser: AdamW (the authors' journal "
        "code) or momentum SGD with coupled weight decay on the weights (main branch; its "
        "lr of 2 diverged on fedwa's small models, set twa-lr).", choices=OPTIMIZERS),
    Key("twa-lr", 0.0, "twa: learning rate of the coefficients (0 = the reference's: 2 for "
        "sgd, 1e-3 for adamw).",
        check=lambda v: None if v >= 0 else "0 (the reference's rate) or a number > 0"),
    Key("twa-schedule", "auto", "twa: learning-rate schedule over the fit (auto = step x0.1 "
        "at 50% and 75% for sgd, cosine with 20% warmup for adamw).", choices=SCHEDULES),
    Key("twa-weight-decay", 0.0, "twa: weight decay (adamw: decoupled, on the coefficients, "
        "0 in the journal; sgd: L2 on the weights, 1e-5 in the main branch).",
        check=at_least(0)),
    Key("twa-momentum", 0.9, "twa: momentum of the subspace coefficients (sgd).",
        check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),
)


class _TWA(FedAvg):
    """Collects candidates during training and builds their subspace after the last round."""

    recompute_bn = frozenset({"twa", "swa"})

    def __init__(self, *args: Any, twa_start_round: int = 0, twa_every: int = 1,
                 twa_layerwise: bool = False, twa_basis: str = "centred",
                 twa_optimizer: str = "adamw", twa_lr: float = 0.0, twa_schedule: str = "auto",
                 twa_weight_decay: float = 0.0, twa_momentum: float = 0.9,
                 model_fn: Callable[[], torch.nn.Module] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if model_fn is None and "dataset" not in self.run_config:
            # Which entries are learnable (the subspace's coordinates) is the model's to say;
            # a strategy built directly has no fedwa run config to build it from.
            raise ValueError(f"{name} needs the model's structure: pass model_fn=<a function "
                             "that returns your torch model>, or build it with "
                             f"{name}.from_config(run_config) from a fedwa run config (its "
                             "'dataset' and 'model' keys)")
        #: Builds the model (any weights) when the strategy is not built from a fedwa config.
        self.model_fn = model_fn
        self.twa_start_round = twa_start_round
        # A strategy built directly learns the run's length in start() (bind_rounds).
        self.bind_rounds(int(self.run_config.get("num-server-rounds", 2)),
                         check="num-server-rounds" in self.run_config)
        self.every, self.layerwise, self.basis = twa_every, twa_layerwise, twa_basis
        self.optimizer_name = twa_optimizer
        # twa-lr = 0: the rate the reference uses with this optimiser.
        self.lr = twa_lr if twa_lr > 0 else REFERENCE_LR[twa_optimizer]
        self.schedule = resolve_schedule(twa_schedule, twa_optimizer)
        self.weight_decay, self.momentum = twa_weight_decay, twa_momentum
        self.candidates: list[torch.Tensor] = []
        self.template: dict[str, torch.Tensor] | None = None  # names, shapes, buffers
        self.names: list[str] = []
        self.blocks: list[tuple[int, int]] | None = None
        self.subspace: Subspace | None = None
        self.optimizer: SubspaceOptimizer | None = None
        self.point: ArrayRecord | None = None

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"twa_start_round": int(config["twa-start-round"]),
                "twa_every": int(config["twa-every"]),
                "twa_layerwise": bool(config["twa-layerwise"]),
                "twa_basis": str(config["twa-basis"]),
                "twa_optimizer": str(config["twa-optimizer"]),
                "twa_lr": float(config["twa-lr"]),
                "twa_schedule": str(config["twa-schedule"]),
                "twa_weight_decay": float(config["twa-weight-decay"]),
                "twa_momentum": float(config["twa-momentum"])}

    def bind_rounds(self, num_rounds: int, check: bool = True) -> None:
        """Candidate rounds of a run of ``num_rounds`` training rounds."""
        self.train_rounds = num_rounds
        self.start_round = (self.twa_start_round
                            or half_run({"num-server-rounds": self.train_rounds}))
        if check and self.start_round > self.train_rounds:
            raise ConfigError("twa-start-round", self.twa_start_round,
                              f"at most num-server-rounds ({self.train_rounds})")

    def make_optimizer(self) -> SubspaceOptimizer | None:
        """The optimiser the server steps across rounds; None when the fit builds its own."""
        return None

    def new_model(self) -> torch.nn.Module:
        """A model of the run's architecture: ``model_fn()``, else from the fedwa config."""
        if self.model_fn is not None:
            return self.model_fn()
        from fedwa.data.task import federated_data, make_model

        return make_model(self.run_config, federated_data(self.run_config))

    def _names_and_blocks(self) -> None:
        model = self.new_model()
        self.names = learnable_names(model)
        self.blocks = layer_blocks(model, self.names) if self.layerwise else None

    def is_candidate(self, server_round: int) -> bool:
        return (self.start_round <= server_round <= self.train_rounds
                and (server_round - self.start_round) % self.every == 0)

    def collect(self, server_round: int, arrays: ArrayRecord) -> None:
        if not self.is_candidate(server_round):
            return
        state = to_state_dict(arrays)
        if not self.names:
            self._names_and_blocks()
        self.template = state
        self.candidates.append(flatten(state, self.names))
        if server_round == self.train_rounds or server_round + self.every > self.train_rounds:
            self.subspace = Subspace.from_candidates(self.candidates, self.blocks,
                                                     basis=self.basis)
            self.optimizer = self.make_optimizer()
            log.info("twa: %d candidates span %d directions (%s basis); basis holds %.1f MB",
                     len(self.candidates), self.subspace.dim, self.basis,
                     self.subspace.nbytes() / 1e6)
            self.candidates = []  # the subspace holds what is needed from here on

    def arrays_at(self, weights: torch.Tensor) -> ArrayRecord:
        """Full arrays: learnable parameters from ``weights``, buffers from the last global."""
        from fedwa.core.twa import unflatten

        assert self.template is not None
        state = dict(self.template)
        state.update(unflatten(weights, self.template, self.names))
        return ArrayRecord(state)

    def centre_arrays(self) -> ArrayRecord:
        assert self.subspace is not None
        return self.arrays_at(self.subspace.centre)

    def basis_bytes(self) -> int:
        return self.subspace.nbytes() if self.subspace is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return {"candidates": list(self.candidates), "template": self.template,
                "subspace": self.subspace.state_dict() if self.subspace else None,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.candidates, self.template = list(state["candidates"]), state["template"]
        if state["subspace"] is not None:
            if not self.names:
                self._names_and_blocks()
            self.subspace = Subspace.from_candidates(
                [torch.zeros_like(state["subspace"]["centre"])], self.blocks)
            self.subspace.load_state_dict(state["subspace"])
            self.optimizer = self.make_optimizer()
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])


class TWAv(_TWA):
    """TWA whose coefficients are fitted on the server's validation split (TWA-v, journal).

    The fit defaults to the journal's: 10 epochs on the held-out split in batches of 128,
    AdamW at lr 1e-3 with the cosine schedule, BatchNorm in train mode. ``twa-optimizer =
    sgd`` with ``twa-basis = uncentred`` and ``twa-weight-decay = 1e-5`` is the ``main``
    branch's fit (which ran on the training data) with its learning rate of 2.
    """

    config_keys = SHARED_KEYS + (
        Key("twa-epochs", 10, "twa-v: passes over the server validation split (10 as in the "
            "authors' code).", check=at_least(1)),
        Key("twa-batch-size", 128, "twa-v: batch size of the coefficient fit.",
            check=at_least(1)),
        Key("twa-bn-mode", "train", "twa-v: BatchNorm during the fit: batch statistics "
            "(train, the authors') or running statistics recomputed at the centre (eval).",
            choices=BN_MODES),
    )

    def __init__(self, *args: Any, twa_epochs: int = 10, twa_batch_size: int = 128,
                 twa_bn_mode: str = "train",
                 server_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 **kwargs: Any) -> None:
        if server_data is None and "dataset" not in (kwargs.get("run_config") or {}):
            # Checked first: a directly built TWAv lacks the data as well as the model.
            raise ValueError("TWAv fits its coefficients on data the server holds: pass "
                             "server_data=(x, y) (tensors: inputs and integer labels, held "
                             "out from the clients' training data) and model_fn=<a function "
                             "that returns your torch model>, or build it with "
                             "TWAv.from_config(run_config) from a fedwa run config with "
                             "server-val-fraction > 0")
        super().__init__(*args, **kwargs)
        if server_data is None:
            if float(self.run_config.get("server-val-fraction", 0)) <= 0:
                raise ConfigError("server-val-fraction",
                                  self.run_config.get("server-val-fraction"),
                                  "a fraction in (0, 1) for twa-v: it fits on the server's "
                                  "validation split")
        elif len(server_data) != 2 or len(server_data[0]) != len(server_data[1]):
            raise ValueError("server_data must be (x, y) with one label per input")
        #: The fit's data when given directly; else the fedwa config's server split.
        self.server_data = server_data
        self.epochs, self.batch_size, self.bn_mode = twa_epochs, twa_batch_size, twa_bn_mode

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().kwargs_from_config(config), "twa_epochs": int(config["twa-epochs"]),
                "twa_batch_size": int(config["twa-batch-size"]),
                "twa_bn_mode": str(config["twa-bn-mode"])}

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        self.collect(server_round, arrays)
        if server_round == self.train_rounds and self.subspace is not None:
            self.point = self.fit()
        return arrays, metrics

    def fit(self) -> ArrayRecord:
        from fedwa.core.bn import recompute_bn
        from fedwa.core.twa import fit_on_data

        if self.server_data is not None:
            x_val, y_val = self.server_data
        else:
            from fedwa.data.task import federated_data

            x_val, y_val = federated_data(self.run_config).server_val()
        model = self.new_model()
        model.load_state_dict(to_state_dict(self.centre_arrays()))
        if self.bn_mode == "eval":
            # BN normalises with running statistics during the fit: let them be the centre's
            # own. In train mode it uses batch statistics, so the buffers do not matter.
            recompute_bn(model, x_val)
        assert self.subspace is not None
        coefficients = fit_on_data(model, self.subspace, self.names, x_val, y_val,
                                   epochs=self.epochs, batch_size=self.batch_size,
                                   optimizer=self.optimizer_name, lr=self.lr,
                                   momentum=self.momentum, weight_decay=self.weight_decay,
                                   schedule=self.schedule, bn_mode=self.bn_mode, seed=self.seed)
        # Buffers from the last global model, whatever the fit left in the running statistics:
        # the server recomputes them before evaluating "twa" (recompute_bn).
        return self.arrays_at(self.subspace.point(coefficients))

    def models_to_evaluate(self, server_round: int, arrays: ArrayRecord
                           ) -> dict[str, ArrayRecord]:
        if self.point is None:
            return {"global": arrays}
        return {"twa": self.point, "swa": self.centre_arrays(), "global": arrays}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "point": self.point}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.point = state.get("point")


class TWAt(_TWA):
    """Federated TWA: extra rounds of projected gradient steps on the clients' losses.

    The journal's TWA-t fits the coefficients on the training data; federated, one step per
    round on the full-batch gradient of the clients' data, so ``twa-rounds`` plays the part
    of the epochs and the schedule (step or cosine) runs over the rounds.
    """

    config_keys = SHARED_KEYS + (
        Key("twa-rounds", 10, "twa-t: gradient rounds after training.", check=at_least(1)),
    )

    def __init__(self, *args: Any, twa_rounds: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.twa_rounds = twa_rounds

    def make_optimizer(self) -> SubspaceOptimizer:
        # One step per gradient round, and a round is a pass over the clients' data: the
        # schedule spans twa-rounds steps of one "epoch" each.
        assert self.subspace is not None
        return SubspaceOptimizer(self.subspace, self.lr, self.momentum,
                                 optimizer=self.optimizer_name, weight_decay=self.weight_decay,
                                 schedule=self.schedule, total_steps=self.twa_rounds)

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().kwargs_from_config(config), "twa_rounds": int(config["twa-rounds"])}

    def total_rounds(self) -> int:
        return self.train_rounds + self.twa_rounds

    def protocol_hint(self, server_round: int) -> str | None:
        if server_round <= self.train_rounds:
            return None  # training rounds are FedAvg's
        return ("TWA-t's gradient rounds send 'train.gradient' messages (the current weights in "
                "'arrays', 'server-round' in 'config'): the ClientApp must register "
                "@app.train('gradient') and reply with 'arrays' holding the gradient of its "
                "mean training loss at those weights, under the same entry names (zeros for "
                "buffers), and 'metrics' with 'num-examples'")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if server_round <= self.train_rounds:
            return messages
        # Same content, other action: the ClientApp's gradient function answers these.
        return [Message(m.content, m.metadata.dst_node_id, GRADIENT_ACTION) for m in messages]

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord:
        if server_round <= self.train_rounds:
            return super().aggregate_replies(server_round, replies)
        assert self.optimizer is not None
        mean = average_records([r.content["arrays"] for r in replies],
                               self.client_weights(replies))
        weights = self.optimizer.step(flatten(mean, self.names))
        return self.arrays_at(weights)

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        if server_round <= self.train_rounds:
            self.collect(server_round, arrays)
            if server_round == self.train_rounds:
                # Clients take their first gradient at the centre (x = 0), the SWA point.
                arrays = self.centre_arrays()
        else:
            self.point = arrays
        return arrays, metrics

    def models_to_evaluate(self, server_round: int, arrays: ArrayRecord
                           ) -> dict[str, ArrayRecord]:
        if self.subspace is None:
            return {"global": arrays}
        if server_round <= self.train_rounds:
            return {"swa": self.centre_arrays()}
        if server_round < self.total_rounds():
            return {"twa": arrays}  # the centre does not move: report it at the end only
        return {"twa": arrays, "swa": self.centre_arrays()}
