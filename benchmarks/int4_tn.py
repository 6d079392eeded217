"""t(n) of a whole verification forward: bf16 packed vs int4 (msn.int4) with and without the wide path.

    python benchmarks/int4_tn.py --model smollm2-135m --threads 1 --rounds 5 --wide 4,8

One forward over n tokens on a 128-token cache through the engine's own path (msn.decoding.costs.measure_forward,
packed float layers), median over rounds; the variants alternate round by round so load drift hits all alike.
``int4`` runs every 4-bit layer on the int4 kernel whatever the rows; ``int4+wideR`` runs forwards over more than
R rows on the packed bf16 copy (the default R is msn.int4.WIDE_ROWS). Prints milliseconds per n: the data for
choosing ``wide_rows`` and for the ``ar`` int4 vs bf16 ratio at n = 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from msn.decoding.costs import measure_forward
from msn.int4 import Int4Linear
from msn.models import load_model

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _set_wide_rows(model, rows: int) -> None:
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.wide_rows = rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--wide", default="4", help="wide_rows values to time, comma-separated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    float_model, _ = load_model(args.model, dtype="bf16")
    int4_model, _ = load_model(args.model, dtype="bf16", quantize="int4")
    variants = {"bf16 packed": (float_model, None), "int4": (int4_model, 10**9)}
    variants.update({f"int4+wide{r}": (int4_model, int(r)) for r in args.wide.split(",") if r.strip()})
    times: dict[str, dict[int, list[float]]] = {v: {n: [] for n in SIZES} for v in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, rows = variants[name]
            if rows is not None:
                _set_wide_rows(model, rows)
            for n, t in measure_forward(model, SIZES, repeats=1, seed=r, packed=True).items():
                times[name][n].append(t)
    print(f"{args.model} bf16, {args.threads} thread(s), ms per forward over n tokens (128-token cache):")
    print(f"{'n':14}" + "".join(f"{n:>8}" for n in SIZES))
    for name, d in times.items():
        print(f"{name:14}" + "".join(f"{1000 * statistics.median(d[n]):8.1f}" for n in SIZES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
