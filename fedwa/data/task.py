"""From a resolved run config to the things a run is made of: data, model, local-training spec.

The ServerApp and the ClientApp both call these, so both sides build the same partition and the
same initial model from the same config and seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fedwa.data import FederatedData, build_federated_data, data_stamp
from fedwa.common.errors import ConfigError
from fedwa.core.late_phase import add_late_phase
from fedwa.models import build_model
from fedwa.core.shadow import add_shadow_weights
from fedwa.core.training import LocalTrainSpec


def federated_data(config: Mapping[str, Any]) -> FederatedData:
    """The run's data: long-tailed training pool, client partitions, server split, test set."""
    return build_federated_data(
        dataset=str(config["dataset"]),
        data_root=str(config["data-root"]) or None,
        seed=int(config["seed"]),
        num_clients=int(config["num-clients"]),
        partition=str(config["partition"]),
        dirichlet_alpha=float(config["dirichlet-alpha"]),
        shards_per_client=int(config["shards-per-client"]),
        imbalance_ratio=float(config["imbalance-ratio"]),
        imbalance_type=str(config["imbalance-type"]),
        server_val_fraction=float(config["server-val-fraction"]),
        download=bool(config["download"]),
        data_stamp=data_stamp(str(config["dataset"]), str(config["data-root"]) or None),
    )


def make_plain_model(config: Mapping[str, Any], data: FederatedData,
                     seed: int | None = None) -> nn.Module:
    """The model as it is evaluated: shadow-weight convs if any, one copy of every layer.

    ``seed`` replaces the run seed (a decentralized node's own initialisation)."""
    seed = int(config["seed"]) if seed is None else seed
    model = build_model(str(config["model"]), data.input_shape, data.num_classes,
                        seed=seed, width=int(config["model-width"]))
    layers = str(config.get("was-layers", ""))
    if layers:
        selected = "all" if layers == "all" else [n.strip() for n in layers.split(",")]
        try:
            # The scale init is drawn from the seed, so the server's initial model (sent to
            # every client) and a model rebuilt from the same config carry the same a.
            add_shadow_weights(model, selected, str(config["was-transform"]),
                               str(config["was-inference"]), seed=seed,
                               scale_init=str(config.get("was-scale-init", "one")))
        except ValueError as err:
            raise ConfigError("was-layers", layers, str(err)) from None
    return model


def make_model(config: Mapping[str, Any], data: FederatedData,
               seed: int | None = None) -> nn.Module:
    """The run's model as it trains and travels, initialised from the run seed (the shared
    initialisation) or ``seed``: with ``late-phase-k`` members of every BN layer and the head."""
    model = make_plain_model(config, data, seed)
    return add_late_phase(model, int(config.get("late-phase-k", 1)))


def needs_permutation_spec(strategy: Any) -> bool:
    """Whether a strategy aligns hidden units across models (DIMAT), so needs the model's spec.

    A strategy says so with a ``needs_permutation_spec`` attribute; without one, a
    decentralized strategy that aligns (``decentralized`` and ``align`` true) does.
    """
    explicit = getattr(strategy, "needs_permutation_spec", None)
    if explicit is not None:
        return bool(explicit)
    return bool(getattr(strategy, "decentralized", False) and getattr(strategy, "align", False))


def check_model_fits(config: Mapping[str, Any], data: FederatedData,
                     strategy: Any = None) -> None:
    """Check, before any engine starts, that the run's model can be built and used.

    A user's factory (``model = "module:function"``) is built and run once on a batch of two
    zero examples (eval mode, no gradients), which must give ``[2, num_classes]`` logits.
    When ``strategy`` aligns hidden units (:func:`needs_permutation_spec`), the model's
    permutation spec must exist (supplied, registered or derived).

    Parameters
    ----------
    config : mapping
        The resolved run config.
    data : FederatedData
        The run's data (input shape and number of classes).
    strategy : object, optional
        The built strategy.

    Raises
    ------
    ConfigError
        Key ``model``: one line naming the model and what is missing.
    """
    import torch

    from fedwa.common.plugins import is_import_path, one_line

    name = str(config["model"])
    model = make_plain_model(config, data)
    if is_import_path(name):
        shape = (2, *data.input_shape)
        training = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                out = model(torch.zeros(shape))
        except Exception as err:  # noqa: BLE001 - whatever the user's forward raises
            raise ConfigError("model", name, f"a model whose forward maps a batch "
                              f"{list(shape)} to [2, {data.num_classes}] logits; it raised "
                              f"{type(err).__name__}: {one_line(err)[:300]}") from None
        finally:
            for module, flag in training.items():
                module.training = flag
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
            got = (list(out.shape) if isinstance(out, torch.Tensor)
                   else f"a {type(out).__name__}")
            raise ConfigError("model", name, f"a model whose forward maps a batch {list(shape)}"
                              f" to [2, {data.num_classes}] logits (one per class); it gave "
                              f"{got}")
    if strategy is not None and needs_permutation_spec(strategy):
        # Here, not at the top: fedwa.core.alignment imports scipy and torch.fx (0.5-2 s), which
        # only aligning strategies need.
        from fedwa.core.alignment import permutation_spec

        try:
            permutation_spec(model, data.input_shape)
        except (TypeError, ValueError) as err:
            raise ConfigError("model", name, f"a model whose hidden units strategy "
                              f"{config['strategy']!r} can align: {one_line(err)}") from None


def shot_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The many/medium/few-shot settings of :func:`fedwa.core.metrics.evaluate_model`."""
    return {"shot_split": str(config["shot-split"]),
            "many_shot_min": int(config["many-shot-min"]),
            "few_shot_max": int(config["few-shot-max"])}


def local_train_spec(config: Mapping[str, Any], round_config: Mapping[str, Any]) -> LocalTrainSpec:
    """Local training of one round: run config, overridden by what the strategy sent.

    The learning rate follows the run's global progress (``lr-schedule``): by default round r of
    R covers progress [(r-1)/R, r/R); a strategy whose rounds are uneven (IMWA's episodes) sends
    ``progress-start``/``progress-end``. A strategy may also send ``lr`` (then constant for
    the round), ``local-epochs``/``local-steps``, and FedProx's ``proximal-mu``. The optimiser
    (``optimizer``: sgd, adam or adamw) is the run's, for every strategy.
    """
    server_round = int(round_config.get("server-round", 1))
    num_rounds = int(config["num-server-rounds"])
    schedule = str(config["lr-schedule"])
    lr = round_config.get("lr")
    if lr is not None:
        schedule = "constant"
    return LocalTrainSpec(
        epochs=int(round_config.get("local-epochs", config["local-epochs"])),
        steps=int(round_config.get("local-steps", config["local-steps"])),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"] if lr is None else lr),
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight-decay"]),
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
        lr_schedule=schedule,
        progress_start=float(round_config.get("progress-start",
                                              (server_round - 1) / num_rounds)),
        progress_end=float(round_config.get("progress-end", server_round / num_rounds)),
        optimizer=str(config.get("optimizer", "sgd")),
    )
