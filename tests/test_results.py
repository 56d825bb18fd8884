"""The run folder: unique names, atomic JSON, metrics.jsonl round trip, summary and plots."""

import json
import math

import pytest

from fedwa.callbacks.results import (
                                     ResultsWriter,
                                     mean_std,
                                     plot_curves,
                                     plot_run,
                                     read_rounds,
                                     summarise,
                                     unique_dir,
                                     write_json,
                                     )

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_unique_dir_never_reuses(tmp_path):
    first = unique_dir(tmp_path / "runs", "exp")
    (first / "keep.txt").write_text("mine")
    second = unique_dir(tmp_path / "runs", "exp")
    third = unique_dir(tmp_path / "runs", "exp")
    assert [p.name for p in (first, second, third)] == ["exp", "exp-2", "exp-3"]
    assert all(p.is_dir() for p in (first, second, third))
    assert (first / "keep.txt").read_text() == "mine"


def test_write_json_atomic(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "b": [1.5, None]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1.5, None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no .tmp left


def test_write_json_refuses_nan_and_keeps_old_file(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}


def test_writer_cleans_nan(tmp_path):
    writer = ResultsWriter(tmp_path / "run")
    writer.write("x.json", {"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": float("nan")}})
    assert json.loads((tmp_path / "run" / "x.json").read_text()) == {
        "a": None, "b": [None, 1.0], "c": {"d": None}}


def test_append_round_read_rounds_round_trip(tmp_path):
    writer = ResultsWriter(tmp_path / "run")
    records = [{"round": 0, "accuracy": 0.1, "per_class_accuracy": [0.0, 0.2]},
               {"round": 1, "accuracy": 0.5, "loss": 1.25, "bytes_down": 10}]
    for record in records:
        writer.append_round(record)
    assert read_rounds(tmp_path / "run") == records


def test_nan_becomes_none(tmp_path):
    writer = ResultsWriter(tmp_path)
    writer.append_round({"round": 1, "loss": float("nan"), "per_class_accuracy": [float("nan"), 1.0]})
    assert read_rounds(tmp_path) == [{"round": 1, "loss": None, "per_class_accuracy": [None, 1.0]}]


def test_torn_last_line_skipped(tmp_path):
    writer = ResultsWriter(tmp_path)
    writer.append_round({"round": 1, "accuracy": 0.5})
    writer.append_round({"round": 2, "accuracy": 0.6})
    with writer.metrics_path.open("a") as f:
        f.write('{"round": 3, "accur')  # killed mid-write
    assert read_rounds(tmp_path) == [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.6}]


def test_read_rounds_without_file(tmp_path):
    assert read_rounds(tmp_path) == []


ROUNDS = [
    {"round": 0, "accuracy": 0.10, "balanced_accuracy": 0.10, "loss": 2.3, "bytes_down": 0,
     "bytes_up": 0},
    {"round": 1, "accuracy": 0.60, "balanced_accuracy": 0.40, "loss": 1.0, "bytes_down": 100,
     "bytes_up": 80, "seconds": 1.5},
    {"round": 2, "accuracy": None, "loss": None, "bytes_down": 100, "bytes_up": 80,
     "seconds": 2.0},
    {"round": 3, "accuracy": 0.55, "balanced_accuracy": 0.50, "few_shot_accuracy": 0.2,
     "loss": 1.1, "bytes_down": 100, "bytes_up": 75, "seconds": 0.5,
     "per_class_accuracy": [0.9, 0.2]},
]


def test_summarise_hand_values():
    summary = summarise(ROUNDS)
    assert summary["rounds"] == 3
    assert summary["final"]["accuracy"] == 0.55
    assert summary["final"]["balanced_accuracy"] == 0.50
    assert summary["final"]["few_shot_accuracy"] == 0.2
    assert summary["final"]["many_shot_accuracy"] is None
    assert summary["final_per_class_accuracy"] == [0.9, 0.2]
    # best = max accuracy over rounds that have one: 0.60 in round 1 (round 2 has None)
    assert summary["best"]["round"] == 1
    assert summary["best"]["accuracy"] == 0.60
    assert summary["best"]["balanced_accuracy"] == 0.40
    # bytes: 0 + 100 + 100 + 100 = 300 down, 0 + 80 + 80 + 75 = 235 up
    assert summary["bytes_down"] == 300
    assert summary["bytes_up"] == 235
    # seconds: 1.5 + 2.0 + 0.5 = 4.0
    assert summary["train_seconds"] == pytest.approx(4.0)


def test_summarise_empty():
    assert summarise([]) == {"rounds": 0}


def test_finish_writes_summary_and_plot(tmp_path):
    run_dir = tmp_path / "run"
    writer = ResultsWriter(run_dir)
    for record in ROUNDS:
        writer.append_round(record)
    summary = writer.finish("completed", extra={"strategy": "fedavg"})
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    assert on_disk["strategy"] == "fedavg"
    assert on_disk["final"]["accuracy"] == 0.55
    assert on_disk["best"]["round"] == 1
    assert on_disk["total_seconds"] >= 0
    assert summary["status"] == "completed"
    assert is_png(run_dir / "accuracy.png")


def test_finish_without_rounds_has_no_plot(tmp_path):
    writer = ResultsWriter(tmp_path)
    summary = writer.finish("failed", extra={"error": "boom"})
    assert summary["rounds"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert not (tmp_path / "accuracy.png").exists()


def test_plot_run_without_rounds(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path)


def test_mean_std_hand_values():
    # mean of 1, 2, 3 = 2; sample variance ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1
    assert mean_std([1.0, None, 2.0, 3.0]) == (2.0, 1.0, 3)
    # 2, 4: mean 3, variance (1 + 1) / 1 = 2, std sqrt(2)
    mean, std, n = mean_std([2, 4])
    assert (mean, n) == (3.0, 2) and std == pytest.approx(math.sqrt(2))


def test_mean_std_one_and_none():
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    mean, std, n = mean_std([None, None])
    assert math.isnan(mean) and math.isnan(std) and n == 0


def test_plot_curves_writes_png(tmp_path):
    dirs = []
    for seed, accs in enumerate(([0.1, 0.5, 0.6], [0.2, 0.4, None], [0.1, 0.3])):
        writer = ResultsWriter(tmp_path / f"s{seed}")
        for r, acc in enumerate(accs):
            writer.append_round({"round": r, "accuracy": acc})
        dirs.append(writer.run_dir)
    out = plot_curves({"fedavg": dirs[:2], "fedprox": dirs[2:], "none": [tmp_path / "empty"]},
                      tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert is_png(out)


def test_seeds_are_averaged_round_by_round_not_line_by_line(tmp_path):
    from fedwa.callbacks.results import draw_mean_bands

    # Seed 0's file repeats round 0 (as a resume from a round-0 checkpoint once wrote it) and
    # seed 1's lacks round 1: by line index, seed 0's round 0 would meet seed 1's round 2.
    dirs = []
    for seed, records in enumerate(([(0, 0.1), (0, 0.1), (1, 0.5), (2, 0.7)],
                                    [(0, 0.3), (2, 0.9)])):
        writer = ResultsWriter(tmp_path / f"s{seed}")
        for r, acc in records:
            writer.append_round({"round": r, "accuracy": acc})
        dirs.append(writer.run_dir)

    class Axes:
        def plot(self, xs, means, **kw):
            self.xs, self.means = list(xs), list(means)

        def fill_between(self, xs, low, high, **kw):
            self.low, self.high = list(low), list(high)

    ax = Axes()
    draw_mean_bands(ax, {"fedavg": dirs})
    assert ax.xs == [0, 2]  # the rounds every seed has
    assert ax.means == pytest.approx([0.2, 0.8])  # (0.1 + 0.3) / 2, (0.7 + 0.9) / 2
    std = math.sqrt(2 * 0.1 ** 2)  # sample std of two values 0.2 apart
    assert ax.high == pytest.approx([0.2 + std, 0.8 + std])


def _written_run(run_dir):
    writer = ResultsWriter(run_dir, plot=False)
    for record in ROUNDS:
        writer.append_round(record)
    writer.finish("completed")
    return run_dir


def test_plot_worker_draws_what_plot_run_draws(tmp_path):
    from fedwa.callbacks.results import PlotWorker

    # The same folder name: it is the plot's title.
    here = plot_run(_written_run(tmp_path / "a" / "run"), tmp_path / "here.png")
    run_dir = _written_run(tmp_path / "b" / "run")
    worker = PlotWorker()
    # The worker drew it (not the fallback in this process): it exited 0 after drawing.
    process = worker._process
    assert worker.draw(run_dir) == run_dir / "accuracy.png"
    assert process.returncode == 0
    assert is_png(run_dir / "accuracy.png")
    assert (run_dir / "accuracy.png").read_bytes() == here.read_bytes()
    worker.close()  # nothing left to stop: a no-op


def test_a_dead_plot_worker_leaves_the_drawing_to_this_process(tmp_path):
    from fedwa.callbacks.results import PlotWorker

    run_dir = _written_run(tmp_path / "run")
    worker = PlotWorker()
    worker._process.kill()
    worker._process.wait()
    assert worker.draw(run_dir) == run_dir / "accuracy.png"
    assert is_png(run_dir / "accuracy.png")


def test_an_unused_plot_worker_is_stopped(tmp_path):
    from fedwa.callbacks.results import PlotWorker

    worker = PlotWorker()
    process = worker._process
    worker.close()
    assert process.returncode is not None
