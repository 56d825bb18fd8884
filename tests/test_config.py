"""Run-config resolution: defaults, coercion, every ConfigError, --set parsing and TOML files."""

from pathlib import Path

import pytest
import torch

from fedwa.run.config import CORE_KEYS, load_toml, parse_set, resolve_config
from fedwa.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def check_error(err: ConfigError, key: str, value_text: str, allowed_text: str) -> None:
    """The error names the key, shows the value and says what is allowed."""
    assert err.key == key
    message = str(err)
    assert f"'{key}'" in message
    assert value_text in message
    assert allowed_text in message


def resolve_error(overrides, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        resolve_config(overrides, **kwargs)
    return info.value


# --- defaults and coercion -------------------------------------------------------------------


def test_defaults_fill_every_core_key():
    config = resolve_config({})
    # fedavg (the default strategy) declares no keys of its own.
    assert config == {key.name: key.default for key in CORE_KEYS}
    # A few defaults written out, so a silent change of the table shows up here.
    assert config["dataset"] == "digits"
    assert config["model"] == "cnn"
    assert config["strategy"] == "fedavg"
    assert config["num-clients"] == 10
    assert config["lr"] == 0.05
    assert config["download"] is False
    assert config["weight-decay"] == 5e-4


def test_int_given_for_float_key_becomes_float():
    config = resolve_config({"lr": 1, "imbalance-ratio": 3})
    assert config["lr"] == 1.0 and type(config["lr"]) is float
    assert config["imbalance-ratio"] == 3.0 and type(config["imbalance-ratio"]) is float


def test_string_number_for_float_key_is_parsed():
    config = resolve_config({"lr": "0.1"})
    assert config["lr"] == 0.1 and type(config["lr"]) is float


def test_whole_float_and_string_for_int_key_become_int():
    config = resolve_config({"num-clients": 4.0, "seed": "7"})
    assert config["num-clients"] == 4 and type(config["num-clients"]) is int
    assert config["seed"] == 7 and type(config["seed"]) is int


def test_bool_key_accepts_true_false_strings():
    assert resolve_config({"download": "TRUE"})["download"] is True
    assert resolve_config({"download": "false"})["download"] is False


def test_fraction_for_int_key_rejected():
    err = resolve_error({"num-clients": 1.5})
    check_error(err, "num-clients", "1.5", "a whole number")


def test_yes_for_bool_key_rejected():
    err = resolve_error({"download": "yes"})
    check_error(err, "download", "'yes'", "true or false")


def test_bool_for_int_key_rejected():
    err = resolve_error({"num-clients": True})
    check_error(err, "num-clients", "True", "a whole number")


def test_number_for_string_key_becomes_text():
    # `--set run-name=2024` parses as a TOML integer; the user meant the folder name "2024".
    assert resolve_config({"run-name": 2024})["run-name"] == "2024"


def test_bool_for_string_key_rejected():
    err = resolve_error({"run-name": True})
    check_error(err, "run-name", "True", "a string")


# --- one test per error ----------------------------------------------------------------------


def test_unknown_dataset():
    err = resolve_error({"dataset": "imagenet"})
    check_error(err, "dataset", "'imagenet'",
                "one of digits, fashion-mnist, mnist, cifar10, cifar100, synthetic")


def test_unknown_model():
    err = resolve_error({"model": "vgg"})
    check_error(err, "model", "'vgg'", "one of mlp, cnn, resnet20, resnet32")


def test_unknown_registered_strategy():
    err = resolve_error({"strategy": "fedfoo"})
    check_error(err, "strategy", "'fedfoo'",
                "one of fedavg, fedavgm, fedprox, fedadam, fedmedian, fedtrimmedavg, krum, "
                "bulyan, imwa, hwa, swa, ema, twa-v, twa-t, partial, wsa, dimat, gossip, or an "
                "import path module:Class")


def test_strategy_path_missing_module():
    err = resolve_error({"strategy": "no_such_module_fedwa_test:Thing"})
    check_error(err, "strategy", "'no_such_module_fedwa_test:Thing'",
                "cannot import no_such_module_fedwa_test")


def test_strategy_path_missing_class():
    err = resolve_error({"strategy": "fedwa.run.config:NoSuchStrategy"})
    check_error(err, "strategy", "'fedwa.run.config:NoSuchStrategy'",
                "fedwa.run.config has no class NoSuchStrategy")


def test_strategy_path_not_a_flower_strategy():
    # fedwa.run.config.Key is a class, but not a flwr Strategy.
    err = resolve_error({"strategy": "fedwa.run.config:Key"})
    check_error(err, "strategy", "'fedwa.run.config:Key'",
                "a subclass of flwr.serverapp.strategy.Strategy")


def test_strategy_path_to_flower_strategy_accepted():
    config = resolve_config({"strategy": "flwr.serverapp.strategy:FedAvg"})
    assert config["strategy"] == "flwr.serverapp.strategy:FedAvg"


@pytest.mark.parametrize("alpha", [0, -0.5])
def test_dirichlet_alpha_not_positive(alpha):
    err = resolve_error({"dirichlet-alpha": alpha})
    check_error(err, "dirichlet-alpha", repr(float(alpha)), "a number > 0")


def test_imbalance_ratio_below_one():
    err = resolve_error({"imbalance-ratio": 0.5})
    check_error(err, "imbalance-ratio", "0.5", "a number >= 1")


def test_imbalance_ratio_one_is_balanced_and_allowed():
    assert resolve_config({"imbalance-ratio": 1})["imbalance-ratio"] == 1.0


@pytest.mark.parametrize("fraction", [0, 1.5])
def test_fraction_train_outside_unit_interval(fraction):
    err = resolve_error({"fraction-train": fraction})
    check_error(err, "fraction-train", repr(float(fraction)), "a fraction in (0, 1]")


def test_server_val_fraction_one():
    err = resolve_error({"server-val-fraction": 1.0})
    check_error(err, "server-val-fraction", "1.0", "a fraction in [0, 1)")


def test_unknown_key_with_suggestion():
    err = resolve_error({"num-client": 4})
    check_error(err, "num-client", "4", "did you mean 'num-clients'?")


def test_unknown_key_without_close_match():
    err = resolve_error({"zzzzqqq": 1})
    check_error(err, "zzzzqqq", "1", "a known key")
    assert "did you mean" not in str(err)


def test_key_of_another_strategy():
    err = resolve_error({"strategy": "fedavg", "fedprox-mu": 0.1})
    check_error(err, "fedprox-mu", "0.1", "a key of the chosen strategy 'fedavg'")
    assert "belongs to another one" in str(err)


def test_nan_for_float_key():
    err = resolve_error({"lr": float("nan")})
    check_error(err, "lr", "nan", "a finite number")


def test_inf_string_for_float_key():
    err = resolve_error({"lr": "inf"})
    check_error(err, "lr", "'inf'", "a finite number")


def test_momentum_one_rejected():
    err = resolve_error({"momentum": 1.0})
    check_error(err, "momentum", "1.0", "in [0, 1)")


def test_optimizer_key_defaults_to_sgd_and_allows_adam_and_adamw():
    assert resolve_config({})["optimizer"] == "sgd"
    for name in ("adam", "adamw"):
        assert resolve_config({"optimizer": name, "strategy": "dimat"})["optimizer"] == name
    check_error(resolve_error({"optimizer": "rmsprop"}), "optimizer", "rmsprop",
                "one of sgd, adam, adamw")


def test_non_sgd_optimizer_with_late_phase_weights_rejected():
    err = resolve_error({"optimizer": "adam", "late-phase-k": 2})
    check_error(err, "optimizer", "adam", "sgd with late-phase-k > 1")
    assert resolve_config({"optimizer": "sgd", "late-phase-k": 2})["late-phase-k"] == 2


def test_dimat_keys_have_defaults():
    config = resolve_config({"strategy": "dimat"})
    assert (config["dimat-basis"], config["dimat-align-data"],
            config["node-pretrain-epochs"]) == ("auto", "local", 0)
    assert resolve_config({"strategy": "gossip"})["node-pretrain-epochs"] == 0
    err = resolve_error({"strategy": "gossip", "dimat-basis": "single"})
    assert err.key == "dimat-basis"  # a DIMAT key: gossip has no basis to choose


def test_few_shot_max_above_many_shot_min():
    err = resolve_error({"few-shot-max": 50, "many-shot-min": 40})
    check_error(err, "few-shot-max", "50", "at most many-shot-min (40)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a CUDA device")
def test_cuda_device_without_cuda():
    err = resolve_error({"device": "cuda"})
    check_error(err, "device", "'cuda'", "torch sees no CUDA device")


# --- strategy keys ---------------------------------------------------------------------------


def test_fedprox_keys_have_defaults():
    config = resolve_config({"strategy": "fedprox"})
    assert config["fedprox-mu"] == 0.01
    assert "fedavgm-momentum" not in config


def test_fedavgm_and_fedadam_keys_have_defaults():
    assert resolve_config({"strategy": "fedavgm"})["fedavgm-momentum"] == 0.9
    config = resolve_config({"strategy": "fedadam", "fedadam-eta": "0.2"})
    assert config["fedadam-eta"] == 0.2
    assert config["fedadam-tau"] == 1e-3


def test_strategy_key_is_validated():
    err = resolve_error({"strategy": "fedprox", "fedprox-mu": -1})
    check_error(err, "fedprox-mu", "-1.0", "a number >= 0")


def test_drop_mode_drops_other_strategies_keys_only():
    config = resolve_config({"strategy": "fedavg", "fedprox-mu": 0.3, "lr": 0.2},
                            other_strategy_keys="drop")
    assert "fedprox-mu" not in config
    assert config["lr"] == 0.2
    # Unknown keys are still an error in drop mode.
    err = resolve_error({"num-client": 3}, other_strategy_keys="drop")
    check_error(err, "num-client", "3", "did you mean 'num-clients'?")


def test_repo_pyproject_config_resolves():
    table = load_toml(REPO / "pyproject.toml")
    assert table["dataset"] == "digits"
    # `flwr run` hands over every key of the table, those of other strategies too: the apps
    # resolve it in drop mode.
    config = resolve_config(table, other_strategy_keys="drop")
    assert config["strategy"] == table["strategy"]
    for name, value in table.items():
        if name in config:
            assert config[name] == value


# --- parse_set -------------------------------------------------------------------------------


def test_parse_set_types():
    values = parse_set(["lr=0.1", "strategy=fedavg", "download=true", 'name="a b"',
                        "seed = 3", "strategy-path=mod.sub:Cls"])
    assert values == {"lr": 0.1, "strategy": "fedavg", "download": True, "name": "a b",
                      "seed": 3, "strategy-path": "mod.sub:Cls"}
    assert type(values["lr"]) is float
    assert type(values["seed"]) is int


def test_parse_set_missing_equals():
    with pytest.raises(ConfigError) as info:
        parse_set(["lr0.1"])
    check_error(info.value, "--set", "'lr0.1'", "key=value")


def test_parse_set_missing_name():
    with pytest.raises(ConfigError) as info:
        parse_set(["=3"])
    assert info.value.key == "--set"


def test_parse_set_empty_value():
    with pytest.raises(ConfigError) as info:
        parse_set(["lr="])
    assert info.value.key == "--set"


def test_parse_set_list_rejected():
    with pytest.raises(ConfigError) as info:
        parse_set(["x=[1,2]"])
    check_error(info.value, "x", "[1,2]", "a single number, true/false or string")


def test_parse_set_unbalanced_quote_rejected():
    with pytest.raises(ConfigError) as info:
        parse_set(['name="a b'])
    assert info.value.key == "--set"


def test_parse_set_date_rejected():
    with pytest.raises(ConfigError) as info:
        parse_set(["day=2024-01-02"])
    assert info.value.key == "day"


def test_parse_set_then_resolve():
    config = resolve_config(parse_set(["lr=0.2", "strategy=fedprox", "fedprox-mu=0.5"]))
    assert (config["lr"], config["strategy"], config["fedprox-mu"]) == (0.2, "fedprox", 0.5)


# --- load_toml -------------------------------------------------------------------------------


def test_load_toml_flat(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "mnist"\nlr = 0.1\nnum-clients = 4\ndownload = true\n')
    assert load_toml(path) == {"dataset": "mnist", "lr": 0.1, "num-clients": 4,
                               "download": True}


def test_load_toml_pyproject_style(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n\n[tool.flwr.app]\npublisher = "me"\n\n'
                    '[tool.flwr.app.config]\nmodel = "mlp"\nseed = 2\n')
    assert load_toml(path) == {"model": "mlp", "seed": 2}


def test_load_toml_config_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[config]\nmodel = "mlp"\n')
    assert load_toml(path) == {"model": "mlp"}


def test_load_toml_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    check_error(info.value, "CONFIG", str(path), "an existing TOML file")


def test_load_toml_broken(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('lr = \n dataset = "x\n')
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    check_error(info.value, "CONFIG", str(path), "valid TOML")


def test_load_toml_nested_table_rejected(tmp_path):
    path = tmp_path / "nested.toml"
    path.write_text('lr = 0.1\n\n[extra]\na = 1\n')
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    check_error(info.value, "extra", "{'a': 1}", "the run config is flat")


def test_load_toml_list_rejected(tmp_path):
    path = tmp_path / "list.toml"
    path.write_text('lrs = [0.1, 0.2]\n')
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert info.value.key == "lrs"


def test_config_error_message_format():
    err = ConfigError("lr", -1, "a number > 0")
    assert (err.key, err.value, err.allowed) == ("lr", -1, "a number > 0")
    assert str(err) == "config key 'lr' = -1 is not allowed: a number > 0"


# --- bad input that used to give a traceback (issue #17, section 4) ---------------------------


def _number_keys():
    """(strategy, key) for every whole-number and real-number key, each with its owner."""
    from strategies import REGISTRY

    pairs = [("fedavg", key) for key in CORE_KEYS]
    for name, cls in REGISTRY.items():
        pairs += [(name, key) for key in getattr(cls, "config_keys", ())]
    seen, out = set(), []
    for strategy, key in pairs:
        if type(key.default) in (int, float) and key.name not in seen:
            seen.add(key.name)
            out.append((strategy, key.name, type(key.default)))
    return out


NUMBER_KEYS = _number_keys()


@pytest.mark.parametrize("strategy,name,kind", NUMBER_KEYS, ids=[k[1] for k in NUMBER_KEYS])
@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "negative"])
def test_400_digit_number_for_any_number_key(strategy, name, kind, sign):
    huge = sign * int("9" * 400)
    for value in (huge, str(huge)):  # from TOML / --set, and as text from a run config
        err = resolve_error({"strategy": strategy, name: value})
        assert err.key == name
        message = str(err)
        assert f"({len(repr(value))} characters)" in message
        assert len(message) < 400  # the value is shortened, so what is allowed stays in view


def test_int_keys_stay_exact():
    # Through float, 2**53 + 1 became 2**53; ints are taken as they are now.
    assert resolve_config({"eval-batch-size": 2**53 + 1})["eval-batch-size"] == 2**53 + 1
    assert resolve_config({"eval-batch-size": str(2**53 + 1)})["eval-batch-size"] == 2**53 + 1
    err = resolve_error({"eval-batch-size": 2**63})
    check_error(err, "eval-batch-size", str(2**63), "(64-bit)")


@pytest.mark.parametrize("seed", [2**32, 2**64, -1, -(2**64)])
def test_seed_outside_what_the_generators_take(seed):
    err = resolve_error({"seed": seed})
    check_error(err, "seed", str(seed), "a whole number in [0, 4294967295]")


def test_largest_seed_is_usable():
    import numpy as np

    from fedwa.run.config import SEED_MAX
    from fedwa.models import build_model

    seed = resolve_config({"seed": SEED_MAX})["seed"]
    build_model("mlp", (1, 8, 8), 10, seed=seed)  # torch.default_generator.manual_seed
    np.random.RandomState(seed)  # numpy's legacy generator takes no more than 2**32 - 1
    # Node and client seeds derived from it (strategies.decentralized, fedwa.data.node)
    # stay within what torch.Generator takes, for a million nodes.
    torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (10**6 + 1))


@pytest.mark.parametrize("name,allowed", [
    ("a/b/c", "one folder name inside output-dir"),
    ("../escaped", "no '/'"),
    ("/tmp/escaped", "no '/'"),
    ("..", "not '.' or '..'"),
    ("a\\b", "no '/' or '\\'"),
    ("n" * 201, "at most 200 bytes (this one has 201)"),
    ("é" * 101, "this one has 202"),  # bytes, not characters
])
def test_run_name_must_be_one_folder_inside_output_dir(name, allowed):
    err = resolve_error({"run-name": name})
    check_error(err, "run-name", repr(name)[:40], allowed)


@pytest.mark.parametrize("name", ["", "my-run", "n" * 200, "2024", "with space"])
def test_run_names_that_are_fine(name):
    assert resolve_config({"run-name": name})["run-name"] == name


@pytest.mark.parametrize("key", ["run-name", "output-dir", "data-root", "dataset"])
def test_nul_in_any_string_key(key):
    err = resolve_error({key: "a\x00b"})
    check_error(err, key, "'a\\x00b'", "text without NUL characters")


def test_load_toml_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('lr = 0.1\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    check_error(info.value, "CONFIG", str(path), "a UTF-8 encoded TOML file (byte 0xe9")


def test_abstract_strategy_class_blames_strategy():
    err = resolve_error({"strategy": "flwr.serverapp.strategy:Strategy"})
    check_error(err, "strategy", "flwr.serverapp.strategy:Strategy", "Strategy is abstract")
    assert "summary" in str(err)  # an abstract method it leaves out


@pytest.mark.parametrize("body,raised", [
    ("raise RuntimeError('boom')\n", "RuntimeError"),
    ("x = (\n", "SyntaxError"),
    ("1 / 0\n", "ZeroDivisionError"),
])
def test_strategy_module_failing_at_import(body, raised, tmp_path, monkeypatch):
    module = f"fedwa_cfg_bad_{raised.lower()}"
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    err = resolve_error({"strategy": f"{module}:S"})
    check_error(err, "strategy", f"{module}:S", f"importing {module} raised {raised} at ")
    assert f"{module}.py:1" in str(err)


def test_replicas_num_clients_bounded_by_data_and_memory():
    import numpy as np

    from fedwa.data.partition import REPLICA_BYTES_MAX, partition_indices

    labels = np.arange(50) % 5
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, 10**9, "replicas", 0)
    check_error(info.value, "num-clients", "1000000000", "at most 50 with partition = replicas")
    assert len(partition_indices(labels, 50, "replicas", 0)) == 50
    # A large pool: the memory bound, not the number of examples, is the limit.
    n = 100_000
    limit = REPLICA_BYTES_MAX // (8 * n)
    with pytest.raises(ConfigError) as info:
        partition_indices(np.zeros(n, dtype=np.int64), limit + 1, "replicas", 0)
    check_error(info.value, "num-clients", str(limit + 1), f"at most {limit} with")


def test_server_val_fraction_that_leaves_too_little_is_blamed():
    from fedwa.data.task import federated_data

    config = resolve_config({"server-val-fraction": 0.999})
    with pytest.raises(ConfigError) as info:
        federated_data(config)
    check_error(info.value, "server-val-fraction", "0.999", "a smaller fraction")
    # Where the partition itself cannot be met, its own key is still named.
    config = resolve_config({"server-val-fraction": 0.1, "dirichlet-alpha": 1e-6,
                             "num-clients": 50})
    with pytest.raises(ConfigError) as info:
        federated_data(config)
    assert info.value.key == "dirichlet-alpha"


def test_partial_groups_beyond_the_model():
    from fedwa.data.task import federated_data, make_model

    from strategies import build_strategy

    config = resolve_config({"strategy": "partial", "model": "mlp", "partial-groups": 100,
                             "partial-grouping": "round-robin"})
    strategy = build_strategy(config)
    with pytest.raises(ConfigError) as info:
        strategy.check_model(make_model(config, federated_data(config)).state_dict())
    check_error(info.value, "partial-groups", "100", "the number of layers")
