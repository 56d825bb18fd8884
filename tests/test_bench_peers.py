"""simulations/bench_peers.py: its pieces at a tiny scale, without pfl or FLGo installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "simulations" / "bench_peers.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def test_npz_holds_fedwas_split_and_initial_model(tmp_path: Path) -> None:
    from fedwa.run.config import resolve_config
    from fedwa.data.task import federated_data, make_model

    summary = bench.write_npz(tmp_path / "d.npz", clients=10, steps=5, rounds=2)
    arrays = bench.load_npz(str(tmp_path / "d.npz"))
    config = resolve_config(bench.fedwa_sets(10, 5, 2))
    data = federated_data(config)
    offsets = arrays["offsets"].tolist()
    assert len(offsets) == 11 and offsets[-1] == summary["train_examples"] == len(arrays["y"])
    for pid in (0, 9):
        x, y = data.client_data(pid)
        assert torch.equal(arrays["x"][offsets[pid]:offsets[pid + 1]], x)
        assert torch.equal(arrays["y"][offsets[pid]:offsets[pid + 1]], y)
    # The rebuilt mlp (torch only, what a peer trains) is fedwa's: same weights, same logits.
    model = make_model(config, data)
    rebuilt = bench.build_mlp(arrays)
    probe = arrays["x_test"][:7]
    assert torch.equal(rebuilt(probe), model(probe))
    # IID digits: 10 clients of ~144 examples, so 5 steps of 32 fit in one pass (pfl's driver
    # relies on it).
    low, high = summary["client_sizes_min_max"]
    assert high - low <= 1 and -(-low // 32) >= 5


def test_tree_rss_counts_children(tmp_path: Path) -> None:
    # A child holding ~200 MB: the tree's RSS must include it, the parent's own cannot.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
         "print('ok', flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ok"
        own = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert bench.tree_rss(child.pid) > 200 * 2**20
        assert bench.tree_rss(os.getpid()) >= own + 200 * 2**20
    finally:
        child.kill()
        child.wait()


def test_table_ratios_are_medians_over_the_loop_and_pfl() -> None:
    runs = [{"side": s, "scale": "10x5", "ok": True, "wall_s": w, "rounds_s": 1.0, "cpu_s": 2.0,
             "peak_rss_mb": 100.0, "accuracy": 0.5}
            for s, w in [("loop", 2.0), ("loop", 4.0), ("loop", 100.0),
                         ("pfl", 8.0), ("fedwa", 6.0)]]
    runs.append({"side": "fedwa", "scale": "10x5", "ok": False, "wall_s": 0.1})
    rows = {r["side"]: r for r in bench.summarise(runs, ["loop", "pfl", "fedwa"], "10x5")}
    assert rows["loop"]["wall_s"] == 4.0 and rows["loop"]["runs"] == 3
    assert rows["fedwa"]["runs"] == 1  # the failed run is left out
    assert rows["fedwa"]["x_loop"] == pytest.approx(1.5)
    assert rows["fedwa"]["x_pfl"] == pytest.approx(0.75)
    assert "| fedwa | 1 | 6.00 | 1.00 | 2.00 |" in bench.table(list(rows.values()), "10x5", 20)


def test_loop_and_fedwa_agree_and_missing_peers_are_skipped(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    missing = tmp_path / "no-pfl-python"
    # An interpreter that can import nothing of pfl: a script that always fails.
    missing.write_text("#!/bin/sh\nexit 1\n")
    missing.chmod(0o755)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sides", "loop,fedwa,pfl", "--scales", "10x5",
         "--rounds", "2", "--json", str(out), "--python", f"pfl={missing}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("pfl: skipped") for line in lines) == 1
    import json

    figures = json.loads(out.read_text())
    assert figures["sides"] == ["loop", "fedwa"] and "pfl" in figures["skipped"]
    runs = {r["side"]: r for r in figures["runs"]}
    # Same functions, seeds and split: the loop and fedwa's local backend compute the same
    # FedAvg, round by round.
    assert runs["loop"]["accuracies"] == runs["fedwa"]["accuracies"]
    assert len(runs["loop"]["accuracies"]) == 2 and runs["loop"]["accuracy"] > 0.5
    for run in runs.values():
        assert run["wall_s"] > run["rounds_s"] > 0 and run["peak_rss_mb"] > 50
        # Importing torch alone takes CPU seconds; the sleeping parent's time is not counted.
        assert 0.5 < run["cpu_s"] < 10 * run["wall_s"]
    assert "| loop | 1 |" in proc.stdout and "wall / loop" in proc.stdout
    assert time.perf_counter() - started < 300
