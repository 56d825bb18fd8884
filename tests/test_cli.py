"""The `fedwa` command: user errors are one line and a non-zero exit; compare and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedwa.cli import comparison_table, main, rounds_to_target

BAD_INPUT = [
    # (--set pairs, key named in the message, a piece of the allowed text)
    (["dataset=nope"], "dataset", "one of digits"),
    (["model=nope"], "model", "one of mlp"),
    (["strategy=nope"], "strategy", "one of fedavg"),
    (["strategy=no_such_module:Cls"], "strategy", "cannot import"),
    (["dirichlet-alpha=0"], "dirichlet-alpha", "> 0"),
    (["dirichlet-alpha=-1"], "dirichlet-alpha", "> 0"),
    (["imbalance-ratio=0.5"], "imbalance-ratio", ">= 1"),
    (["fraction-train=0"], "fraction-train", "(0, 1]"),
    (["fraction-train=1.5"], "fraction-train", "(0, 1]"),
    (["num-clients=5000"], "num-clients", "at most"),
    (["dataset=cifar10", "data-root=EMPTY"], "data-root", "not found"),
    (["lr"], "--set", "key=value"),
    (["lr=abc"], "lr", "a number"),
    (["no-such-key=1"], "no-such-key", "a known key"),
]


@pytest.mark.parametrize("pairs,key,allowed", BAD_INPUT, ids=[p[0][-1] for p in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_exit_2(pairs: list[str], key: str, allowed: str,
                                                tmp_path: Path, capsys) -> None:  # noqa: ANN001
    argv = ["run", "--quiet", "--set", f"output-dir={tmp_path / 'runs'}"]
    for pair in pairs:
        argv += ["--set", pair.replace("EMPTY", str(tmp_path))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"'{key}'" in err and allowed in err, err
    # Rejected before any engine started: no run folder was made.
    assert not (tmp_path / "runs").exists()


def test_a_bad_config_file_is_rejected(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.toml"
    bad.write_text("dataset = 'digits'\nimbalance-ratio = 0.2\n")
    assert main(["run", str(bad)]) == 2
    assert "'imbalance-ratio' = 0.2" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2


def test_no_traceback_for_user_errors_from_the_shell() -> None:
    done = subprocess.run([sys.executable, "-m", "fedwa.cli", "run", "--set", "model=nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == ("fedwa: error: config key 'model' = 'nope' is not allowed: "
                                   "one of mlp, cnn, resnet20, resnet32, or an import path "
                                   "module:function naming a factory make_net(input_shape, "
                                   "num_classes) that returns a torch.nn.Module")


def test_rounds_to_target() -> None:
    rounds = [{"round": 0, "accuracy": 0.9}, {"round": 1, "accuracy": 0.5},
              {"round": 2, "accuracy": 0.81}, {"round": 3, "accuracy": 0.79}]
    # Round 0 is the initial model and does not count as reaching the target.
    assert rounds_to_target(rounds, 0.8) == 2
    assert rounds_to_target(rounds, 0.95) is None


def fake_run(root: Path, name: str, final: float, best: float) -> Path:
    run = root / name
    run.mkdir()
    rows = [{"round": 0, "accuracy": 0.1}, {"round": 1, "accuracy": best},
            {"round": 2, "accuracy": final}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "final": {"accuracy": final, "balanced_accuracy": final - 0.1,
                  "few_shot_accuracy": None},
        "best": {"round": 1, "accuracy": best}, "bytes_down": 2_000_000,
        "bytes_up": 1_000_000, "total_seconds": 10.0}))
    return run


def test_comparison_table_mean_and_std_by_hand(tmp_path: Path) -> None:
    runs = {"a": [fake_run(tmp_path, "a0", 0.50, 0.60), fake_run(tmp_path, "a1", 0.70, 0.80)]}
    table, numbers = comparison_table(runs, target=0.65)
    # final: mean 0.60, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.141421...
    assert numbers["a"]["final_accuracy"][0] == pytest.approx(0.60)
    assert numbers["a"]["final_accuracy"][1] == pytest.approx(0.1414213562)
    assert "| a | 2 | 60.00 ± 14.14 | 70.00 ± 14.14 | 50.00 ± 14.14 | n/a |" in table
    # a0 never reaches 0.65; a1 reaches it in round 1 (0.80).
    assert numbers["a"]["rounds_to_target"] == [None, 1]
    assert "1.0 (1/2 reached)" in table
    assert "3.0 ± 0.0" in table  # 2 MB down + 1 MB up


@pytest.mark.e2e
def test_compare_runs_every_strategy_and_seed_and_plots(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    config = tmp_path / "quick.toml"
    config.write_text("\n".join([
        'dataset = "digits"', 'model = "mlp"', "num-clients = 2", "num-server-rounds = 1",
        f'output-dir = "{tmp_path}"',
        "fedprox-mu = 0.5",  # a fedprox key: must be dropped for the fedavg runs, not rejected
    ]))
    assert main(["compare", str(config), "--strategies", "fedavg,fedprox", "--seeds", "0,1",
                 "--quiet", "--name", "cmp"]) == 0
    out = tmp_path / "cmp"
    table = (out / "compare.md").read_text()
    assert table.count("±") >= 8 and "| fedavg | 2 |" in table and "| fedprox | 2 |" in table
    numbers = json.loads((out / "compare.json").read_text())
    assert set(numbers) == {"fedavg", "fedprox"}
    for name in ("compare_accuracy.png", "compare_balanced_accuracy.png"):
        assert (out / name).stat().st_size > 0
    prox = json.loads((out / "fedprox-s0" / "config.json").read_text())
    assert prox["fedprox-mu"] == 0.5
    assert "fedprox-mu" not in json.loads((out / "fedavg-s0" / "config.json").read_text())

    # fedwa plot redraws each run and overlays them.
    (out / "fedavg-s0" / "accuracy.png").unlink()
    overlay = tmp_path / "overlay.png"
    assert main(["plot", str(out / "fedavg-s0"), str(out / "fedprox-s0"),
                 "--out", str(overlay)]) == 0
    assert (out / "fedavg-s0" / "accuracy.png").is_file() and overlay.is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 2
