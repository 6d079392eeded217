"""Does the t(n) curve the auto tree is sized with agree with the forwards the decoder then runs?

    python benchmarks/curve_agreement.py --model smollm2-135m --dtype bf16 --threads 1 --per-category 1

Measures the curve once in this process (as a fresh ``msn`` process does, no cached file), then decodes Spec-Bench
questions with tr-jacobi and records every step: tree size n, cache length (past), the forward's own time and
the whole step's. Prints, per tree-size bucket and past (short < 400 <= long), the median of observed forward /
measured t(n, past), and overall the median with its 10th-90th percentile range, plus how often the decoder
measured the curve again (docs/results.md §21: issue 35 asks for agreement within +-15%).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from msn.bench.questions import load_questions, select
from msn.decoding import costs
from msn.decoding.engine import DecoderState, generate
from msn.decoding.packed import resolve_pack
from msn.models import load_model
from msn.prompting import encode_chat, eos_ids

DEFAULT_QUESTIONS = "../shared/data/spec_bench/question.jsonl"
BUCKETS = (0, 2, 4, 8, 12, 16, 32, 64)


def recorded(latency: costs.Latency, rows: list) -> costs.Latency:
    """The curve, with each observation also written to ``rows`` as (n, past, forward s, predicted s)."""
    observe = latency.observe

    def spy(n: int, seconds: float, past: int = costs.PAST, step_seconds: float | None = None) -> None:
        rows.append((n, past, seconds, latency._at(latency.raw, n, past)))  # as measured, as the drift check
        observe(n, seconds, past, step_seconds)

    latency.observe = spy
    return latency


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--questions", default=DEFAULT_QUESTIONS)
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=a.dtype)
    packed = resolve_pack(model, None, False)
    start = time.perf_counter()
    latency, _ = costs.remeasure(model, packed=packed)
    measured_in = time.perf_counter() - start
    rows: list = []
    state = DecoderState()
    path = "packed" if packed else "eager"
    state.latencies[path] = recorded(latency, rows)
    remeasured, starts = 0, [0]  # index in rows where each curve's steps begin
    for q in select(load_questions(a.questions), per_category=a.per_category):
        # What the engine does before a request (a stale curve is measured again), done here so the fresh curve
        # is recorded too; the engine then keeps it.
        fresh = costs.for_next_request(state.latencies[path], model, packed=packed)
        if fresh is not state.latencies[path]:
            remeasured += 1
            starts.append(len(rows))
            state.latencies[path] = latency = recorded(fresh, rows)
        ids = encode_chat(tok, [{"role": "user", "content": q.turns[0]}])
        generate(model, ids, max_new_tokens=a.max_new_tokens, eos_token_id=eos_ids(model, tok), state=state)
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for n, past, seconds, predicted in rows:
        bucket = min(BUCKETS, key=lambda b: abs(b - n))
        groups[bucket, "short" if past < 400 else "long"].append(seconds / predicted)
    print(f"{a.model} {a.dtype}, {a.threads} thread(s), curve measured in {measured_in:.1f} s, {len(rows)} steps")
    print("| tree nodes | past | steps | observed / measured (median) |\n|---:|---|---:|---:|")
    for key in sorted(groups):
        if len(groups[key]) >= 3:
            print(f"| {key[0]} | {key[1]} | {len(groups[key])} | {statistics.median(groups[key]):.2f} |")
    ratios = sorted(seconds / predicted for _, _, seconds, predicted in rows)
    print(f"overall: median {statistics.median(ratios):.2f}, p10 {ratios[len(ratios) // 10]:.2f}, "
          f"p90 {ratios[9 * len(ratios) // 10]:.2f}; within +-15%: "
          f"{sum(0.85 <= r <= 1.15 for r in ratios) / len(ratios):.0%} of steps; curve measured again "
          f"{remeasured} time(s); overhead outside the forward {1000 * latency.overhead:.1f} ms/step")
    for i, (a_, b_) in enumerate(zip(starts, [*starts[1:], len(rows)], strict=True)):
        part = [seconds / predicted for _, _, seconds, predicted in rows[a_:b_]]
        if part:
            print(f"curve {i} ({'first measurement' if i == 0 else 'measured again in a request'}): median "
                  f"{statistics.median(part):.2f} over {len(part)} steps")


if __name__ == "__main__":
    main()
