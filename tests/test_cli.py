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


# --- bad input that used to give a traceback (issue #17, section 4) ---------------------------
#
# Every case: exit 2, one line naming the key (or file, or flag), the value and what is allowed,
# before any engine starts, and nothing written.

BIG = "9" * 400  # a whole number no float, no int64 and no generator can hold

ISSUE_17 = [
    # (id, --set pairs, key named, a piece of the allowed text)
    ("400-digit-int-key", [f"num-clients={BIG}"], "num-clients", "(64-bit)"),
    ("400-digit-float-key", [f"lr={BIG}"], "lr", "a finite number"),
    ("400-digit-seed", [f"seed={BIG}"], "seed", "[0, 4294967295]"),
    ("seed-2**64", [f"seed={2**64}"], "seed", "[0, 4294967295]"),
    ("run-name-a/b/c", ["run-name=a/b/c"], "run-name", "one folder name inside output-dir"),
    ("run-name-300-chars", ["run-name=" + "n" * 300], "run-name", "at most 200 bytes"),
    ("run-name-escapes", ["run-name=../escaped"], "run-name", "no '/'"),
    ("run-name-absolute", ["run-name=ABS/escaped"], "run-name", "no '/'"),
    ("partial-groups-layers", ["strategy=partial", "partial-groups=100",
                               "partial-grouping=balanced"], "partial-groups",
     "the number of layers"),
    ("partial-groups-units", ["strategy=partial", "partial-groups=100000"], "partial-groups",
     "the number of units"),
    ("abstract-strategy", ["strategy=flwr.serverapp.strategy:Strategy"], "strategy",
     "Strategy is abstract"),
    ("replicas-1e9-clients", ["partition=replicas", "num-clients=1000000000"], "num-clients",
     "with partition = replicas"),
    ("server-val-fraction", ["server-val-fraction=0.999"], "server-val-fraction",
     "a smaller fraction"),
    ("output-dir-file", ["output-dir=FILE"], "output-dir", "it is a file"),
    ("output-dir-under-file", ["output-dir=FILE/runs"], "output-dir", "FILE is a file"),
]


def expect_one_line(code: int, err: str, key: str, allowed: str) -> None:
    """Exit 2 and one line: the key quoted, and what is allowed."""
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert f"'{key}'" in err and allowed in err, err


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("pairs,key,allowed", [case[1:] for case in ISSUE_17],
                         ids=[case[0] for case in ISSUE_17])
def test_issue_17_bad_input_is_one_line_exit_2_and_writes_nothing(
        pairs: list[str], key: str, allowed: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "FILE").write_text("not a folder")
    argv = ["run", "--quiet", "--set", "model=mlp", "--set", "num-server-rounds=1",
            "--set", f"output-dir={tmp_path / 'runs'}"]
    for pair in pairs:
        pair = pair.replace("FILE", str(tmp_path / "FILE")).replace("ABS", str(tmp_path))
        argv += ["--set", pair]
    before = files_under(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    expect_one_line(code, err.replace(str(tmp_path) + "/", ""), key, allowed)
    # Refused before any engine started: no output folder, nothing beside it (../escaped).
    assert files_under(tmp_path) == before


def test_issue_17_non_utf8_config_file(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    config = tmp_path / "latin1.toml"
    config.write_bytes('model = "mlp"\n# caf\xe9 in Latin-1\n'.encode("latin-1"))
    code = main(["run", "--quiet", str(config), "--set", f"output-dir={tmp_path / 'runs'}"])
    expect_one_line(code, capsys.readouterr().err, "CONFIG", "a UTF-8 encoded TOML file")
    assert not (tmp_path / "runs").exists()


def test_issue_17_nul_in_run_name(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    # A command line cannot carry a NUL; a TOML file can.
    config = tmp_path / "nul.toml"
    config.write_text('model = "mlp"\nrun-name = "a\\u0000b"\n'
                      f'output-dir = "{tmp_path / "runs"}"\n')
    code = main(["run", "--quiet", str(config)])
    err = capsys.readouterr().err
    expect_one_line(code, err, "run-name", "without NUL")
    assert "'a\\x00b'" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("body,raised", [
    ("raise RuntimeError('no GPU found at import')\n", "RuntimeError"),
    ("def broken(:\n", "SyntaxError"),
    ("import math\nVALUE = math.sqrt(-1)\n", "ValueError"),
], ids=["runtime-error", "syntax-error", "value-error"])
def test_issue_17_strategy_module_that_fails_at_import(body: str, raised: str, tmp_path: Path,
                                                       monkeypatch, capsys) -> None:  # noqa: ANN001
    module = f"fedwa_test_bad_{raised.lower()}"
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["run", "--quiet", "--set", f"strategy={module}:MyStrategy",
                 "--set", f"output-dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    expect_one_line(code, err, "strategy", f"importing {module} raised {raised}")
    assert f"{module}.py:" in err  # where to look: the file and line
    assert not (tmp_path / "runs").exists()


def read_only_folder(path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Make ``path`` read-only; where that does not stop writes (root), a test double makes
    the write fail as a read-only folder would."""
    import errno
    import os

    import fedwa.callbacks.results

    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").write_text("x")
    except PermissionError:
        return
    (path / "probe").unlink()

    def refuse(folder: Path) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))

    monkeypatch.setattr(fedwa.callbacks.results, "_write_probe", refuse)


@pytest.mark.parametrize("below", ["", "runs"], ids=["the-folder", "a-folder-below"])
def test_issue_17_read_only_output_dir(below: str, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    read_only = tmp_path / "ro"
    read_only_folder(read_only, monkeypatch)
    try:
        code = main(["run", "--quiet", "--set", "model=mlp",
                     "--set", f"output-dir={read_only / below}"])
        expect_one_line(code, capsys.readouterr().err, "output-dir",
                        "a folder fedwa can write run folders in")
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


def test_issue_17_output_dir_on_a_full_disk(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    import errno
    import os

    import fedwa.callbacks.results

    def full(folder: Path) -> None:  # the write of a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fedwa.callbacks.results, "_write_probe", full)
    code = main(["run", "--quiet", "--set", "model=mlp",
                 "--set", f"output-dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    expect_one_line(code, err, "output-dir", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_the_output_dir_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    from fedwa.callbacks.results import check_output_dir

    check_output_dir(tmp_path / "not" / "yet")
    assert list(tmp_path.iterdir()) == []  # neither the probe nor the folder


@pytest.mark.skipif(not __import__("fedwa.data", fromlist=["x"]).DEBIAN_FASHION_MNIST_DIR
                    .is_dir(), reason="needs Debian's dataset-fashion-mnist: without it a "
                    "wrong data-root was refused before too")
def test_issue_17_wrong_fashion_mnist_data_root_is_refused(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    # It used to fall back to the Debian copy silently: a run on other files than named.
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["run", "--quiet", "--set", "dataset=fashion-mnist", "--set", "model=mlp",
                 "--set", f"data-root={empty}", "--set", f"output-dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    expect_one_line(code, err, "data-root", "only when data-root is unset")
    assert str(empty) in err and "/usr/share/datasets/fashion-mnist" in err
    assert not (tmp_path / "runs").exists()


def test_issue_17_deploy_run_config_with_an_open_quote(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code = main(["deploy", "run", "--workdir", str(tmp_path / "work"), "--run-config", "lr='x"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'--run-config'" in err and "\"lr='x\"" in err and "every quote closed" in err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("out", ["overlay.xyz", "overlay", "no-such-folder/overlay.png"])
def test_issue_17_plot_out_that_cannot_be_written(out: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run = fake_run(tmp_path, "r0", 0.5, 0.6)
    before = files_under(tmp_path)
    code = main(["plot", str(run), "--out", str(tmp_path / out)])
    expect_one_line(code, capsys.readouterr().err, "--out", ".png")
    assert files_under(tmp_path) == before  # not even the run's own accuracy.png


def test_issue_17_compare_name_that_escapes(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code = main(["compare", "--quiet", "--strategies", "fedavg", "--name", "../escaped",
                 "--set", "model=mlp", "--set", f"output-dir={tmp_path / 'runs'}"])
    expect_one_line(code, capsys.readouterr().err, "--name", "one folder name")
    assert list(tmp_path.iterdir()) == []


def test_issue_17_deploy_output_dir_checked_before_anything_starts(tmp_path: Path,
                                                                  capsys) -> None:  # noqa: ANN001
    (tmp_path / "FILE").write_text("not a folder")
    code = main(["deploy", "run", "--workdir", str(tmp_path / "work"),
                 "--output-dir", str(tmp_path / "FILE")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'--output-dir'" in err and "it is a file" in err
    assert not (tmp_path / "work").exists()


def test_default_run_name_of_a_long_import_path_fits_a_file_name() -> None:
    from fedwa.callbacks.results import default_run_name

    name = default_run_name({"strategy": "pkg." * 100 + "mod:MyStrategy",
                             "dataset": "data." * 100 + "mod:load", "seed": 2**32 - 1})
    assert len(name.encode()) <= 200 and "MyStrategy" in name and "/" not in name


def test_a_resumed_run_checks_its_own_folder_not_output_dir(tmp_path: Path,
                                                            monkeypatch) -> None:  # noqa: ANN001
    import fedwa.callbacks.results
    from fedwa.cli import check_runnable
    from fedwa.run.config import resolve_config

    probed: list[Path] = []
    monkeypatch.setattr(fedwa.callbacks.results, "_write_probe", probed.append)
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "FILE").write_text("")
    check_runnable(resolve_config({"model": "mlp", "resume": str(run),
                                   "output-dir": str(tmp_path / "FILE")}))
    assert probed == [run]
