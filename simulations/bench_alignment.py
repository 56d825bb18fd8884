"""Time one activation-matching alignment of two ResNet-20s (the per-neighbour cost of DIMAT).

    python simulations/bench_alignment.py                  # width 1, 32x32x3, 512 samples
    python simulations/bench_alignment.py --samples 2048 --width 2

Two differently seeded models are aligned on Gaussian inputs; the time covers the forward
passes of both models, the correlation sums and the assignment problems. Machines here are
shared and noisy: treat the figure as an order of magnitude.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedwa.core.alignment import align_to, permutation_spec
from fedwa.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    shape = (3, 32, 32)
    reference = build_model(args.model, shape, 10, seed=0, width=args.width)
    other = build_model(args.model, shape, 10, seed=1, width=args.width)
    spec = permutation_spec(reference)
    x = torch.randn(args.samples, *shape, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    align_to(reference, other, x, spec, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    print(
        f"align_to {args.model} width {args.width}, {args.samples} samples of 32x32x3, "
        f"{len(spec.groups)} groups, {torch.get_num_threads()} threads: {seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
