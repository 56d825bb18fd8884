"""Memory throughput of the fused weighted average against a plain copy of the same memory.

``K`` state dicts of ``P`` float32 elements each (nine tensors per model, the largest 60% of
``P``, like a model whose first or last layer dominates, plus an integer counter) are averaged
with ``fedwa.core.averaging.weighted_average`` (fused, one pass) and with
``reference_weighted_average`` (the previous implementation: the whole accumulator, model after
model), and with ``flat_weighted_average`` on the same models as the rows of one ``K x P``
buffer (how ``fedwa.flower.arrays.average_records`` holds clients' replies: FedAvg's path). The
baseline is ``torch.Tensor.copy_`` of the ``K * P`` float32 buffer that holds the models (their
tensors are views into it), timed in the same run.

Throughput is memory traffic per second: the average reads ``K * P * 4`` bytes and writes
``P * 4``; the copy reads and writes ``K * P * 4`` bytes each. ``of copy`` is the average's
throughput as a fraction of the copy's (target >= 50%). Each figure is the best of at least
``--repeats`` interleaved runs (more for small sizes, see ``best_times``), on ``--threads``
torch threads (1 by default: fedwa's clients run on one,
and the machine's cores are shared).

    python simulations/bench_aggregation.py                         # K = 10, 100; P = 50k, 1M, 25M
    python simulations/bench_aggregation.py --quick                 # K = 10; P = 50k, 1M
    python simulations/bench_aggregation.py --ks 10 --ps 25M --repeats 5

Rows whose buffers would not fit in ``--memory-fraction`` of the available memory are skipped
(and listed as such). When the copy's destination would not fit beside the models, the copy is
timed segment by segment (``K`` copies of ``P`` elements into one reused ``P`` buffer: the same
bytes, all far larger than the caches) and the row is marked ``seg``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedwa.core.averaging import flat_weighted_average, reference_weighted_average, weighted_average

# Fractions of P per tensor (sum 1): one dominant layer, a few mid-sized, some small ones.
_SHARES = (0.60, 0.20, 0.10, 0.05, 0.03, 0.015, 0.004, 0.0008, 0.0002)


def parse_count(text: str) -> int:
    """``50k`` -> 50_000, ``1M`` -> 1_000_000, ``25M`` -> 25_000_000."""
    text = text.strip()
    scale = {"k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9}
    if text and text[-1] in scale:
        return int(float(text[:-1]) * scale[text[-1]])
    return int(text)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def make_states(stacked: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per model, named views into its row of ``stacked`` (K x P), plus an integer counter."""
    p = stacked.shape[1]
    sizes = [max(1, int(p * share)) for share in _SHARES]
    sizes[0] += p - sum(sizes)
    states = []
    for k in range(stacked.shape[0]):
        state, offset = {}, 0
        for i, size in enumerate(sizes):
            state[f"layer{i}.weight"] = stacked[k, offset:offset + size]
            offset += size
        state["bn.num_batches_tracked"] = torch.tensor(k)
        states.append(state)
    return states


def best_times(repeats: int, runs: dict[str, Callable[[], object]],
               min_seconds: float = 0.3) -> dict[str, float]:
    """Best wall time of each run, the runs interleaved so that drift hits all alike.

    Each timed call follows an untimed call of the same run, so that with small ``K * P``
    every run finds its data in cache as the one before it left it (timing them straight
    after each other would hand each one the cache state of another). At least ``repeats``
    rounds, and more while a round is short, until ``min_seconds`` have passed: the best of
    many short runs is what is reproducible on a shared machine.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    began = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - began < min_seconds and rounds < 1000):
        for name, run in runs.items():
            run()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: min(values) for name, values in times.items()}


def measure(k: int, p: int, args: argparse.Namespace) -> dict:
    budget = args.memory_fraction * available_bytes()
    models_bytes = k * p * 4
    # models + fused output + the reference's accumulator (and one more P for slack)
    needed = models_bytes + 3 * p * 4
    row: dict = {"K": k, "P": p, "models_GB": models_bytes / 1e9}
    if needed > budget:
        row["skipped"] = (f"needs {needed / 1e9:.1f} GB, {budget / 1e9:.1f} GB allowed "
                          f"({args.memory_fraction:.0%} of available)")
        return row
    stacked = torch.empty(k, p)
    for i in range(k):  # distinct, finite values at memset speed (no denormals)
        stacked[i].fill_(1.0 + i / k)
    states = make_states(stacked)
    weights = [float(i + 1) for i in range(k)]
    segmented = needed + models_bytes > budget
    if segmented:
        target = torch.empty(p)

        def copy() -> None:
            for i in range(k):
                target.copy_(stacked[i])
    else:
        target = torch.empty_like(stacked)

        def copy() -> None:
            target.copy_(stacked)
    fused_out = weighted_average(states, weights)
    reference_out = reference_weighted_average(states, weights)
    flat_out = flat_weighted_average(stacked, weights)
    row["identical"] = all(torch.equal(fused_out[n], reference_out[n]) for n in fused_out) \
        and torch.equal(torch.cat([fused_out[n] for n in fused_out if n.startswith("layer")]),
                        flat_out)
    del fused_out, reference_out, flat_out
    best = best_times(args.repeats, {
        "copy": copy,
        "fused": lambda: weighted_average(states, weights),
        "flat": lambda: flat_weighted_average(stacked, weights),
        "old": lambda: reference_weighted_average(states, weights),
    })
    t_copy, t_fused, t_flat, t_old = best["copy"], best["fused"], best["flat"], best["old"]
    average_bytes = (k * p + p) * 4
    copy_bytes = 2 * k * p * 4
    row.update({
        "copy": "segments" if segmented else "whole",
        "copy_GBps": copy_bytes / t_copy / 1e9,
        "fused_GBps": average_bytes / t_fused / 1e9,
        "flat_GBps": average_bytes / t_flat / 1e9,
        "old_GBps": average_bytes / t_old / 1e9,
        "copy_s": t_copy, "fused_s": t_fused, "flat_s": t_flat, "old_s": t_old,
    })
    row["fused_of_copy"] = row["fused_GBps"] / row["copy_GBps"]
    row["flat_of_copy"] = row["flat_GBps"] / row["copy_GBps"]
    row["old_of_copy"] = row["old_GBps"] / row["copy_GBps"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="10,100", help="comma-separated model counts K")
    parser.add_argument("--ps", default="50k,1M,25M",
                        help="comma-separated float elements per model P (k, M suffixes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="use at most this fraction of the available memory")
    parser.add_argument("--quick", action="store_true", help="K = 10; P = 50k, 1M")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.ps = "10", "50k,1M"
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    ps = [parse_count(p) for p in args.ps.split(",") if p.strip()]
    torch.set_num_threads(args.threads)

    print(f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
          f"{available_bytes() / 1e9:.1f} GB available, best of >= {args.repeats} runs")
    header = (f"{'K':>4}{'P':>11}{'models GB':>10}{'copy GB/s':>11}{'fused GB/s':>11}"
              f"{'of copy':>8}{'flat GB/s':>10}{'of copy':>8}{'old GB/s':>10}{'of copy':>8}"
              f"{'fused/old':>10}  note")
    print(header)
    print("-" * len(header))
    rows = []
    for k in ks:
        for p in ps:
            row = measure(k, p, args)
            rows.append(row)
            if "skipped" in row:
                print(f"{k:>4}{p:>11}{row['models_GB']:>10.2f}  skipped: {row['skipped']}",
                      flush=True)
                continue
            note = "seg" if row["copy"] == "segments" else ""
            if not row["identical"]:
                note += " MISMATCH"
            print(f"{k:>4}{p:>11}{row['models_GB']:>10.2f}{row['copy_GBps']:>11.2f}"
                  f"{row['fused_GBps']:>11.2f}{row['fused_of_copy']:>8.0%}"
                  f"{row['flat_GBps']:>10.2f}{row['flat_of_copy']:>8.0%}"
                  f"{row['old_GBps']:>10.2f}{row['old_of_copy']:>8.0%}"
                  f"{row['old_s'] / row['fused_s']:>10.2f}  {note}", flush=True)
    print("GB/s = (bytes read + bytes written) / s; average: (K+1)*P*4 bytes, copy: 2*K*P*4")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
