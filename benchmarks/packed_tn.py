"""t(n) with and without packed Linear weights (msn.decoding.packed), measured alternately in one process.

    python benchmarks/packed_tn.py --model smollm2-135m --dtype bf16 --threads 1 --rounds 5

One forward over n tokens on a 128-token cache, through the engine's own verification path (one token: the
plain causal step; more: a chain with a 4-D mask), median over rounds; the two paths alternate round by round
so load drift hits both alike. Prints milliseconds per n and the ratio unpacked / packed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from msn.decoding.costs import measure_forward
from msn.models import load_model

SIZES = (1, 2, 4, 8, 12, 16, 24, 32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    times: dict[bool, dict[int, list[float]]] = {True: {n: [] for n in SIZES}, False: {n: [] for n in SIZES}}
    for r in range(args.rounds):
        for packed in (True, False) if r % 2 == 0 else (False, True):
            for n, t in measure_forward(model, SIZES, repeats=1, seed=r, packed=packed).items():
                times[packed][n].append(t)
    print(f"{args.model} {args.dtype}, {args.threads} thread(s), ms per forward over n tokens (128-token cache):")
    print("n        " + "".join(f"{n:>8}" for n in SIZES))
    med = {k: {n: 1000 * statistics.median(v) for n, v in d.items()} for k, d in times.items()}
    print("unpacked " + "".join(f"{med[False][n]:8.1f}" for n in SIZES))
    print("packed   " + "".join(f"{med[True][n]:8.1f}" for n in SIZES))
    print("ratio    " + "".join(f"{med[False][n] / med[True][n]:7.2f}x" for n in SIZES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
