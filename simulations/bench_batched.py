"""Client updates per second: batched training (fedwa.core.batched) against the sequential loop.

Every client starts from the same model (the global model of a round), holds its own synthetic
data (``--samples`` examples of 1 x S x S, 10 classes) and makes ``--steps`` SGD steps of
``--batch-size``. The sequential side calls ``train_local`` once per client, the batched side
``train_batched`` once for all of them; both in this process, on one torch thread (as fedwa's
clients train), after one untimed warm-up call each. The script also checks that both sides
computed the same models (largest absolute weight difference).

    python simulations/bench_batched.py                          # K = 10, 100, 1000; mlp, cnn
    python simulations/bench_batched.py --quick                  # K = 10, 50
    python simulations/bench_batched.py --ks 10,100 --models cnn --image-size 8
    python simulations/bench_batched.py --cap 200                # time at most 200 clients
    python simulations/bench_batched.py --partition dirichlet --epochs 1 --models mlp \
        --ks 100,1000 --image-size 8                             # unequal sizes and steps

``--partition dirichlet`` gives the clients unequal amounts of data, as fedwa's Dirichlet
partition does: ``K * --samples`` examples with random labels split by
:func:`fedwa.data.partition.partition_indices` (``--alpha``, every client at least 2
examples), and every client trains ``--epochs`` epochs over its own data (``--steps`` is
ignored), so clients differ in step count and in the size of their last batch.

``--cap N`` trains only N of the K clients on each side and reports the rate over those:
per-client work does not depend on K, and the batched side already splits K into chunks of
``--max-clients``, so the rate over N >= ``--max-clients`` clients stands for all K. The table
says how many clients each row actually timed. Machines here are shared and noisy: compare the
ratio within one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedwa.core.batched import auto_max_clients, train_batched
from fedwa.data.partition import partition_indices
from fedwa.models import build_model
from fedwa.core.training import LocalTrainSpec, configure_threads, train_local


def synthetic_clients(count: int, samples: int, size: int, seed: int,
                      sizes: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random ``1 x size x size`` examples of 10 classes: ``samples`` per client, or ``sizes``."""
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes if sizes is not None else [samples] * count
    return [(torch.randn(n, 1, size, size, generator=gen),
             torch.randint(0, 10, (n,), generator=gen)) for n in sizes]


def dirichlet_sizes(count: int, samples: int, alpha: float, seed: int) -> list[int]:
    """Client sizes of fedwa's Dirichlet partition of ``count * samples`` random labels."""
    labels = np.random.default_rng(seed).integers(0, 10, count * samples)
    parts = partition_indices(labels, count, "dirichlet", seed, dirichlet_alpha=alpha,
                              min_size=min(2, samples))
    return [len(p) for p in parts]


def measure(model_name: str, clients: int, args: argparse.Namespace) -> dict:
    """Time both sides on ``clients`` clients; return the row of the table."""
    unequal = args.partition == "dirichlet"
    spec = LocalTrainSpec(steps=0 if unequal else args.steps, epochs=args.epochs,
                          batch_size=args.batch_size, lr=0.05, momentum=0.9, weight_decay=5e-4)
    shape = (1, args.image_size, args.image_size)
    start = build_model(model_name, shape, 10, seed=0)
    sizes = dirichlet_sizes(clients, args.samples, args.alpha, seed=1) if unequal else None
    data = synthetic_clients(clients, args.samples, args.image_size, seed=1, sizes=sizes)
    seeds = list(range(clients))
    # Warm-up: first calls pay one-off costs (oneDNN primitive creation, vmap setup).
    warm = min(clients, 4)
    train_local(copy.deepcopy(start), *data[0], spec, seed=0)
    train_batched([copy.deepcopy(start) for _ in range(warm)], data[:warm], spec, seeds[:warm],
                  max_clients=args.max_clients)

    # Interleaved repeats (sequential, batched, sequential, ...): a burst of load from other
    # processes then hits both sides alike; each side's best repeat is reported.
    seq_s = bat_s = float("inf")
    for _ in range(args.repeats):
        sequential = [copy.deepcopy(start) for _ in range(clients)]
        began = time.perf_counter()
        for model, (x, y), seed in zip(sequential, data, seeds):
            train_local(model, x, y, spec, seed=seed)
        seq_s = min(seq_s, time.perf_counter() - began)

        batched = [copy.deepcopy(start) for _ in range(clients)]
        began = time.perf_counter()
        train_batched(batched, data, spec, seeds, max_clients=args.max_clients)
        bat_s = min(bat_s, time.perf_counter() - began)

    diff = max(float((a - b).abs().max()) for ms, mb in zip(sequential, batched)
               for a, b in zip(ms.state_dict().values(), mb.state_dict().values())
               if torch.is_floating_point(a))
    steps = [len(x) // args.batch_size + (len(x) % args.batch_size > 1) for x, _ in data]
    return {"model": model_name, "timed_clients": clients,
            "steps_min": min(steps) * spec.epochs if unequal else args.steps,
            "steps_max": max(steps) * spec.epochs if unequal else args.steps,
            "sequential_per_s": clients / seq_s, "batched_per_s": clients / bat_s,
            "ratio": seq_s / bat_s, "max_abs_diff": diff,
            "sequential_s": seq_s, "batched_s": bat_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="10,100,1000", help="comma-separated client counts K")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated model names")
    parser.add_argument("--steps", type=int, default=5, help="local SGD steps per client")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=0,
                        help="examples per client (default: steps x batch size, one epoch)")
    parser.add_argument("--image-size", type=int, default=28, help="inputs are 1 x S x S")
    parser.add_argument("--max-clients", type=int, default=0,
                        help="clients per batched computation (default: train_batched's own)")
    parser.add_argument("--cap", type=int, default=0,
                        help="time at most this many clients per row (0: all K)")
    parser.add_argument("--partition", choices=("equal", "dirichlet"), default="equal",
                        help="equal: every client --samples examples and --steps steps; "
                             "dirichlet: unequal sizes, --epochs epochs each")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--epochs", type=int, default=1,
                        help="local epochs per client with --partition dirichlet")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved timings per side; the best of each is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="K = 10, 50 (overrides --ks)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.quick:
        args.ks = "10,50"
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.samples = args.samples or args.steps * args.batch_size
    args.max_clients = args.max_clients or auto_max_clients(
        args.batch_size, (1, args.image_size, args.image_size))
    configure_threads(torch.device("cpu"))
    torch.set_num_threads(args.threads)

    work = (f"dirichlet(alpha={args.alpha}) sizes, {args.epochs} epoch(s)"
            if args.partition == "dirichlet" else f"{args.steps} steps")
    print(f"{work} x batch {args.batch_size}, {args.samples} examples/client (mean), "
          f"1x{args.image_size}x{args.image_size} inputs, chunks of {args.max_clients} clients, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    header = (f"{'model':<6}{'K':>6}{'timed':>7}{'steps':>8}{'sequential/s':>14}{'batched/s':>11}"
              f"{'ratio':>7}{'max|diff|':>11}")
    print(header)
    print("-" * len(header))
    rows = []
    for model_name in models:
        for k in ks:
            timed = min(k, args.cap) if args.cap > 0 else k
            row = {"K": k, **measure(model_name, timed, args)}
            rows.append(row)
            span = f"{row['steps_min']}-{row['steps_max']}"
            print(f"{model_name:<6}{k:>6}{timed:>7}{span:>8}{row['sequential_per_s']:>14.1f}"
                  f"{row['batched_per_s']:>11.1f}{row['ratio']:>7.2f}"
                  f"{row['max_abs_diff']:>11.1e}", flush=True)
    print("client updates per second; ratio = batched / sequential (> 1: batched is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
