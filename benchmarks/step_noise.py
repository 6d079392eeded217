"""How steady is one decoding step on this machine, and how much does a t(n) curve move from one measurement to
the next? (Why msn re-measures a curve that the step times disagree with: docs/results.md section 18.)

    python benchmarks/step_noise.py --model smollm2-135m --dtype bf16 --threads 1 --steps 60 --pasts 128,512,900,128

First: ``--steps`` packed one-token steps on a 128-token cache, timed one by one right after loading (bursts
show as runs of slow steps). Then: ``measure_forward`` (the auto tree's own measurement) at each past in
``--pasts``, one after another in the same process; a past listed twice shows the drift between two
measurements of the same shape.
"""

from __future__ import annotations

import argparse
import time

import torch

from msn.decoding.attention import gqa_attention
from msn.decoding.costs import measure_forward
from msn.decoding.packed import packing
from msn.decoding.static_kv import make_kv
from msn.models import load_model

SIZES = (1, 5, 9, 13, 17, 25, 33)  # tokens per forward: the root plus 0-32 tree nodes


@torch.inference_mode()
def step_times(model, steps: int, past: int = 128) -> list[float]:
    with packing(model, True) as pk, gqa_attention(model):
        kv = make_kv(model, past + 8, False, pk)
        kv.prefill(torch.randint(0, model.config.vocab_size, (1, past)))
        none_kept = torch.empty(0, dtype=torch.long)
        out = []
        for _ in range(steps):
            start = time.perf_counter()
            kv.forward(torch.randint(0, model.config.vocab_size, (1,)), torch.arange(past, past + 1), None, past)
            out.append(time.perf_counter() - start)
            kv.keep(past, 1, none_kept)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--pasts", default="128,512,900,128")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, dtype=a.dtype)[0]
    print("one-token steps (ms):", " ".join(f"{1000 * t:.0f}" for t in step_times(model, a.steps)), flush=True)
    for past in (int(x) for x in a.pasts.split(",")):
        t = measure_forward(model, SIZES, past=past, repeats=a.repeats, packed=True)
        print(f"past {past}: " + " ".join(f"{k}:{1000 * v:.1f}" for k, v in t.items())
              + f"  t(33)/t(1) {t[33] / t[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
