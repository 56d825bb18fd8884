"""The run config: one flat namespace of keys, shared by `flwr run`, TOML files and `--set`.

A key is declared once, with its default, its type and what values it allows. Strategies declare
their own keys the same way (``config_keys`` on the strategy class), so the README table, the
validation and the defaults all come from one place.

Validation happens once, before any engine starts, and every error names the key, the value and
what is allowed (:class:`fedwa.common.errors.ConfigError`).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedwa.common.errors import ConfigError
from fedwa.common.keys import (INT_MAX, INT_MIN, SEED_MAX, Check, Key, Scalar,  # noqa: F401
                               at_least, closed_fraction, half_open_fraction, positive,
                               seed_range, unit_fraction)

#: Longest run folder name, in UTF-8 bytes: file systems allow 255, and fedwa appends "-N"
#: to a taken name and writes ".NAME.tmp" files beside its own.
RUN_NAME_MAX_BYTES = 200


def folder_name(value: str) -> str | None:
    """A check: '' or one folder name that stays inside its parent (``output-dir``).

    A path separator would make folders fedwa did not create (``a/b/c``) or leave
    ``output-dir`` (``../x``, ``/abs``); a name longer than the file system allows fails
    only when the folder is made.
    """
    allowed = (f"'' or one folder name inside output-dir: no '/' or '\\', not '.' or '..', "
               f"at most {RUN_NAME_MAX_BYTES} bytes")
    if value == "":
        return None
    if "/" in value or "\\" in value or value in (".", ".."):
        return allowed
    if len(value.encode("utf-8", "surrogatepass")) > RUN_NAME_MAX_BYTES:
        return allowed + f" (this one has {len(value.encode('utf-8', 'surrogatepass'))})"
    return None


# --- the core keys ----------------------------------------------------------------------------

# Names are listed here rather than imported, so reading the config never imports torch.
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic", "npz")
MODELS = ("mlp", "cnn", "resnet20", "resnet32")
# The shape of an import path `module:function` (as fedwa.common.plugins.IMPORT_PATH). Only
# the shape is checked here; the plug-in is imported and called once the run's data is loaded
# (fedwa.cli.check_runnable), where its errors name the same key.
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def name_or_import_path(names: tuple[str, ...], what: str) -> Check:
    """A check: one of ``names``, or an import path ``module:function`` (``what`` it names)."""
    def check(value: str) -> str | None:
        if value in names or _IMPORT_PATH.fullmatch(value):
            return None
        return f"one of {', '.join(names)}, or an import path module:function naming {what}"
    return check

PARTITIONS = ("iid", "dirichlet", "shards", "replicas", "classes")

CORE_KEYS: tuple[Key, ...] = (
    Key("dataset", "digits", "Dataset: " + ", ".join(DATASETS) + " (train.npz/test.npz in "
        "data-root), or `module:function`, your own loader returning (train, test, "
        "class_names).", check=name_or_import_path(
            DATASETS, "a loader load() or load(data_root) that returns (train, test, "
            "class_names)")),
    Key("data-root", "", "Folder with the dataset files ('' = built-in search paths only; "
        "dataset = npz: the folder of train.npz and test.npz)."),
    Key("download", False, "Let torchvision download a missing dataset (needs the network)."),
    Key("model", "cnn", "Model: " + ", ".join(MODELS) + ", or `module:function`, your own "
        "factory make_net(input_shape, num_classes) returning a torch.nn.Module.",
        check=name_or_import_path(MODELS, "a factory make_net(input_shape, num_classes) that "
                                  "returns a torch.nn.Module")),
    Key("model-width", 1, "Width multiplier of the model.", check=at_least(1)),
    Key("strategy", "fedavg", "Strategy: a registered name or `module:Class`."),
    Key("strategy-args", "", "Constructor arguments of a `module:Class` strategy fedwa does "
        "not fill itself, as a TOML inline table in a string, e.g. \"{q = 0.2}\"; a wrapper's "
        "inner strategy as strategy = 'name' with its own strategy-args = {...} table."),
    Key("seed", 0, "Seed of init, long tail, partition, sampling and shuffles "
        "(0 to 2**32 - 1).", check=seed_range),
    Key("output-dir", "runs", "Folder that receives one sub-folder per run."),
    Key("run-name", "", "Name of the run's folder inside output-dir, without '/' "
        "('' = strategy-dataset-seed-time).", check=folder_name),
    Key("num-clients", 10, "Number of clients (SuperNodes).", check=at_least(1)),
    Key("num-server-rounds", 10, "Number of server rounds.", check=at_least(1)),
    Key("fraction-train", 1.0, "Fraction of clients sampled per round.", check=unit_fraction),
    Key("fraction-evaluate", 0.0, "Fraction of clients that also evaluate on local data.",
        check=closed_fraction),
    Key("partition", "dirichlet", "How training data is split over clients.", choices=PARTITIONS),
    Key("dirichlet-alpha", 0.5, "Concentration of the Dirichlet partition.", check=positive),
    Key("shards-per-client", 2, "Label shards per client (`shards` partition).", check=at_least(1)),
    Key("imbalance-ratio", 10.0, "Long-tail ratio rho = n_max / n_min (1 = balanced).",
        check=at_least(1)),
    Key("imbalance-type", "exp", "Long-tail profile.", choices=("exp", "step")),
    Key("server-val-fraction", 0.0, "Stratified fraction of training data held by the server.",
        check=half_open_fraction),
    Key("local-epochs", 1, "Local epochs per round (ignored when local-steps > 0).",
        check=at_least(1)),
    Key("local-steps", 0, "Local SGD steps per round (0 = use local-epochs).", check=at_least(0)),
    Key("batch-size", 32, "Local minibatch size.", check=at_least(1)),
    Key("lr", 0.05, "Client learning rate.", check=positive),
    Key("lr-schedule", "constant", "Client lr over server rounds.", choices=("constant", "cosine")),
    Key("optimizer", "sgd", "Local-training optimiser of every strategy, created fresh every "
        "round: SGD (lr, momentum, weight-decay as L2), Adam (lr, weight-decay as L2) or AdamW "
        "(lr, decoupled weight-decay); Adam/AdamW use torch's default betas and eps and no "
        "momentum. sgd only with late-phase-k > 1; with batch-clients, adam/adamw clients train "
        "one by one.",
        choices=("sgd", "adam", "adamw")),
    Key("momentum", 0.9, "SGD momentum (optimizer = sgd only).",
        check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),
    Key("weight-decay", 5e-4, "Weight decay of the local optimiser (L2 for sgd and adam, "
        "decoupled for adamw).", check=at_least(0)),
    Key("late-phase-k", 1, "Late-phase weights: members of every BN layer and the head "
        "(1 = off).", check=at_least(1)),
    Key("late-phase-start", 0.6, "Late-phase weights: fraction of the run after which the "
        "members train apart.", check=half_open_fraction),
    Key("late-phase-shared-grad", "sum", "Late-phase weights: the shared weights step once "
        "per cycle of K member batches with the sum of their gradients (the authors' code) "
        "or their mean.", choices=("sum", "mean")),
    Key("late-phase-members", "averaged", "Late-phase weights in FL: the server averages "
        "member k with member k across clients and every client trains from that average "
        "(averaged), or each client keeps its own members and takes only the shared weights "
        "from the server (local).", choices=("averaged", "local")),
    Key("was-layers", "", "Shadow weights (WAS) on these conv layers: 'all' or a "
        "comma-separated list of names ('' = off)."),
    Key("was-transform", "reference", "Shadow weights: random kernel transform (reference = "
        "the authors' RandomResizedCrop of the kernel, scale 0.8-1, aspect 3/4-4/3).",
        choices=("reference", "resize-crop", "translate")),
    Key("was-scale-init", "one", "Shadow weights: initial value of the learnable scale a: 1, "
        "or U(0, 1) as in the authors' code (then evaluate with was-inference = shadow: "
        "plain-weight inference feeds the BatchNorm 1/a times what it was trained on).",
        choices=("one", "uniform")),
    Key("was-inference", "plain", "Shadow weights at inference: plain weights W (accuracy-"
        "oriented) or a * T(W) with a fresh random transform per forward pass, as in training "
        "(desire-oriented; reseeded per evaluation from seed and round, so repeatable, but "
        "the numbers depend on eval-batch-size).", choices=("plain", "shadow")),
    Key("device", "auto", "Where clients train: cuda when there is one (auto).",
        choices=("auto", "cpu", "cuda")),
    Key("backend", "local", "Simulation backend of `fedwa run`: ClientApps in this process "
        "(local, no start-up cost) or Flower's Ray engine (ray: parallel clients, several "
        "machines).", choices=("local", "ray")),
    Key("batch-clients", False, "Local backend: train a round's clients together in one "
        "batched computation (fedwa.core.batched) where they share an architecture, whatever their "
        "step counts; equal to one-by-one training to float tolerance, not bit for bit. Pays "
        "for small models and inputs (the mlp on digits), not for the cnn on 28x28."),
    Key("client-cpus", 1.0, "CPUs per client, handed to the Ray backend.", check=positive),
    Key("client-gpus", 0.0, "GPUs per client (fractions share a card; Ray backend).",
        check=at_least(0)),
    Key("evaluation", "central", "Where the global model is evaluated: on the balanced test "
        "set at the server, or federated (every node on its own held-out test split; for "
        "servers without data).", choices=("central", "federated")),
    Key("local-test-fraction", 0.2, "Federated evaluation: stratified fraction of each node's "
        "data held out as its test split (unless the node's data-dir has test.npz).",
        check=lambda v: None if 0 < v < 1 else "a fraction in (0, 1)"),
    Key("round-timeout", 3600.0, "Seconds a round waits for its replies; a client that has "
        "not answered by then is dropped for the round (local backend: each client's own "
        "limit, as they run one after another).", check=positive),
    Key("min-available-clients", 1, "A round needs at least this many usable replies, and from "
        "round 2 on this many connected nodes (round 1 waits for num-clients).",
        check=at_least(1)),
    Key("round-retries", 0, "Times a round with fewer usable replies than min-available-clients "
        "is tried again before the run stops.", check=at_least(0)),
    Key("checkpoint-every", 1, "Rounds between checkpoints (checkpoint.pt in the run folder; "
        "0 = none).", check=at_least(0)),
    Key("checkpoint-min-seconds", 10.0, "A due checkpoint is skipped when the last one is "
        "younger than this (the last round is always saved; 0 = every due round), so short "
        "rounds do not spend their time saving.", check=lambda v: None if v >= 0 else ">= 0"),
    Key("resume", "", "Run folder to continue from its checkpoint ('' = a new run; `fedwa run "
        "--resume RUN_DIR` sets it)."),
    Key("eval-batch-size", 1024, "Batch size of evaluation.", check=at_least(1)),
    Key("bn-recompute", "auto", "How averaged models get fresh BatchNorm statistics: on the "
        "server validation split, federated over the clients' data, or not at all (auto = "
        "central when server-val-fraction > 0).",
        choices=("auto", "central", "federated", "off")),
    Key("shot-split", "thirds", "Many/medium/few-shot groups: class thirds by training count, "
        "or absolute thresholds.", choices=("thirds", "absolute")),
    Key("many-shot-min", 100, "`absolute` split: many-shot classes have more examples.",
        check=at_least(0)),
    Key("few-shot-max", 20, "`absolute` split: few-shot classes have fewer examples.",
        check=at_least(0)),
)


def core_keys() -> dict[str, Key]:
    return {key.name: key for key in CORE_KEYS}


def _strategy_keys(strategy: str) -> dict[str, Key]:
    # Imported here: the registry imports Flower, which the TOML parsing below does not need.
    from strategies import resolve_strategy_class

    cls = resolve_strategy_class(strategy)
    return {key.name: key for key in getattr(cls, "config_keys", ())}


def all_known_keys() -> dict[str, Key]:
    """Every key of the core and of every registered strategy (for docs and suggestions)."""
    from strategies import REGISTRY

    keys = core_keys()
    for cls in REGISTRY.values():
        keys.update({key.name: key for key in getattr(cls, "config_keys", ())})
    return keys


def resolve_config(overrides: Mapping[str, Any], *, other_strategy_keys: str = "error"
                   ) -> dict[str, Scalar]:
    """Fill in defaults, coerce types and validate every key.

    Parameters
    ----------
    overrides : mapping
        User values, e.g. ``context.run_config`` or a parsed TOML file plus ``--set`` pairs.
    other_strategy_keys : {"error", "drop"}
        What to do with keys that belong to a strategy other than the chosen one. ``drop`` is
        for ``flwr run``, whose run config always holds every key of pyproject.toml.

    Returns
    -------
    dict
        Every core key and every key of the chosen strategy, validated.

    Raises
    ------
    ConfigError
        On the first bad key: unknown, of the wrong type or out of range.
    """
    keys = core_keys()
    strategy = keys["strategy"].validate(overrides.get("strategy", keys["strategy"].default))
    keys.update(_strategy_keys(str(strategy)))
    if other_strategy_keys == "drop":
        overrides = {k: v for k, v in overrides.items()
                     if k in keys or k not in all_known_keys()}
    unknown = [name for name in overrides if name not in keys]
    if unknown:
        name = unknown[0]
        everything = set(keys) | set(all_known_keys())
        close = difflib.get_close_matches(name, sorted(everything), n=1)
        if name in everything:
            hint = f"a key of the chosen strategy '{strategy}' ({name} belongs to another one)"
        else:
            hint = "a known key" + (f" (did you mean '{close[0]}'?)" if close else "")
        raise ConfigError(name, overrides[name], hint)
    config = {name: key.validate(overrides.get(name, key.default)) for name, key in keys.items()}
    _check_together(config)
    return config


def _check_together(config: Mapping[str, Scalar]) -> None:
    """Checks that involve more than one key."""
    if config["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda", "auto or cpu: torch sees no CUDA device here")
    if config["bn-recompute"] == "central" and config["server-val-fraction"] <= 0:
        raise ConfigError("bn-recompute", "central", "federated, auto or off when "
                          "server-val-fraction is 0: central recomputation needs server data")
    if config["late-phase-k"] > 1 and config["strategy"] in ("fedprox", "wsa"):
        raise ConfigError("late-phase-k", config["late-phase-k"],
                          f"1 with strategy {config['strategy']}: late-phase training has no "
                          "proximal or scope term")
    if config["optimizer"] != "sgd" and config["late-phase-k"] > 1:
        raise ConfigError("optimizer", config["optimizer"], "sgd with late-phase-k > 1: "
                          "late-phase training steps its shared weights and members with SGD")
    if config["evaluation"] == "federated" and config["late-phase-k"] > 1:
        raise ConfigError("evaluation", "federated", "central with late-phase-k > 1: the "
                          "server collapses the members before it evaluates")
    if config["batch-clients"] and config["backend"] != "local":
        raise ConfigError("batch-clients", True, "false with backend = ray: only the local "
                          "backend hands a round's clients over together")
    if config["min-available-clients"] > config["num-clients"]:
        raise ConfigError("min-available-clients", config["min-available-clients"],
                          f"at most num-clients ({config['num-clients']})")
    if config["few-shot-max"] > config["many-shot-min"]:
        raise ConfigError("few-shot-max", config["few-shot-max"],
                          f"at most many-shot-min ({config['many-shot-min']})")


# --- reading user input -----------------------------------------------------------------------


def parse_set(pairs: Iterable[str]) -> dict[str, Scalar]:
    """Parse ``--set key=value`` pairs; values are TOML literals, bare words are strings."""
    values: dict[str, Scalar] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name:
            raise ConfigError("--set", pair, "key=value, e.g. --set lr=0.1")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            # A bare word (strategy=fedavg) is a string; anything with quotes must parse.
            if any(c in text for c in "\"'[]{}") or not text:
                raise ConfigError("--set", pair, "key=value where value is a number, "
                                  "true/false or a string") from None
            value = text
        if isinstance(value, (list, dict)) or hasattr(value, "isoformat"):
            raise ConfigError(name, text, "a single number, true/false or string")
        values[name] = value
    return values


def load_toml(path: str | Path) -> dict[str, Scalar]:
    """Read a run config from TOML: a flat table, or a pyproject's ``[tool.flwr.app.config]``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("CONFIG", str(path), "an existing TOML file")
    try:
        raw = path.read_bytes()
    except OSError as err:  # unreadable (permissions): the user's to fix, not a bug
        raise ConfigError("CONFIG", str(path), f"a readable TOML file ({err.strerror})") from None
    try:
        # TOML is UTF-8 by definition; Path.read_text would use the locale's encoding.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("CONFIG", str(path), f"a UTF-8 encoded TOML file (byte "
                          f"{raw[err.start]:#04x} at offset {err.start} is not UTF-8)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("CONFIG", str(path), f"valid TOML ({err})") from None
    table: Any = data
    for part in ("tool", "flwr", "app", "config"):
        table = table.get(part) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        table = data.get("config") if isinstance(data.get("config"), dict) else data
    table = dict(table)
    if isinstance(table.get("strategy-args"), dict):  # the one key that holds a table
        table["strategy-args"] = inline_table(table["strategy-args"])
    nested = [name for name, value in table.items() if isinstance(value, (dict, list))]
    if nested:
        raise ConfigError(nested[0], table[nested[0]], "a single value: the run config is flat")
    return dict(table)


def markdown_table() -> str:
    """The README's table of every key: name, owning strategy, default, meaning."""
    from strategies import REGISTRY

    owners: dict[str, list[str]] = {}
    for name, cls in REGISTRY.items():
        for key in getattr(cls, "config_keys", ()):
            owners.setdefault(key.name, []).append(name)
    lines = ["| key | strategy | default | meaning |", "|---|---|---|---|"]
    for key in all_known_keys().values():
        allowed = f" One of: {', '.join(key.choices)}." if key.choices else ""
        owner = ", ".join(owners.get(key.name, ["all"]))
        lines.append(f"| `{key.name}` | {owner} | `{toml_value(key.default)}` | "
                     f"{key.help}{allowed} |")
    return "\n".join(lines) + "\n"


def toml_value(value: Scalar) -> str:
    """A value written as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def inline_table(table: Mapping[str, Any]) -> str:
    """``table`` written as a TOML inline table (scalars, lists and nested tables)."""
    def literal(value: Any) -> str:
        if isinstance(value, Mapping):
            return inline_table(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return toml_value(value)

    return "{" + ", ".join(f'"{k}" = {literal(v)}' for k, v in table.items()) + "}"


def to_record(config: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """The config as a dict a Flower ``ConfigRecord`` accepts (all scalars already)."""
    return dict(config)
