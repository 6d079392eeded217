"""The gap to llama.cpp on the same model: its plain greedy decoding vs msn's `ar` and `tr-jacobi`, one run,
interleaved per question (first turns of Spec-Bench questions, 128 new tokens, the same chat prompt tokens).

    pip install llama-cpp-python        # no wheel on this index: builds from source (cmake + g++, ~10 min)
    python benchmarks/llamacpp_gap.py --per-category 1 --threads 1 --out runs/llamacpp-gap.json

llama.cpp runs the SmolLM2-135M-Instruct GGUF the `smollm2-135m` preset is converted from (Q4_1: 4-bit
weights, 4x less to read per token than bf16), so the gap is "what a CPU user gets from llama.cpp today",
not an engine-only comparison at equal precision. Speed = new tokens / wall time, prompt evaluation included,
as in `msn bench`; the report gives medians over questions and the median per-question ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from msn.bench.questions import load_questions, select
from msn.decoding import generate
from msn.decoding.engine import DecoderState
from msn.errors import InputError
from msn.models import load_model
from msn.outputs import atomic_write_text
from msn.prompting import encode_chat, eos_ids

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def gguf_path() -> Path:
    """The GGUF file the smollm2-135m preset is converted from (found without importing its package)."""
    from msn.models import PRESETS, gguf_parts

    parts = gguf_parts(PRESETS["smollm2-135m"])
    if len(parts) != 1:
        raise InputError(f"expected one GGUF file for smollm2-135m, found {len(parts)}")
    return parts[0]


def llamacpp_greedy(llm, ids: list[int], max_new_tokens: int) -> tuple[int, float]:
    """New tokens and seconds for llama.cpp's greedy decoding of ``ids`` (prompt evaluation included)."""
    start = time.perf_counter()
    new = 0
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llm.token_eos() == token:
            break
        new += 1
        if new >= max_new_tokens:
            break
    return new, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS))
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--out", default=None, help="JSON file for the per-question numbers")
    args = p.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llamacpp_gap: llama-cpp-python is not installed (pip install llama-cpp-python; it builds from "
              "source here)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    questions = select(load_questions(args.questions), per_category=args.per_category, limit=args.limit)
    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    eos = eos_ids(model, tok)
    gguf = gguf_path()
    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, verbose=False)
    states = {m: DecoderState() for m in ("ar", "tr-jacobi")}
    rows = []
    warm = encode_chat(tok, [{"role": "user", "content": "Say hello."}])
    llamacpp_greedy(llm, warm[0].tolist(), 8)
    for m in states:
        generate(model, warm, max_new_tokens=8, method=m, eos_token_id=eos, state=states[m])
    for i, q in enumerate(questions):
        ids = encode_chat(tok, [{"role": "user", "content": q.turns[0]}])
        row = {"question_id": q.question_id, "category": q.category, "prompt_tokens": int(ids.shape[1])}
        order = ["llama.cpp", "ar", "tr-jacobi"]
        for name in order if i % 2 == 0 else order[::-1]:  # alternate, so drift hits every engine alike
            if name == "llama.cpp":
                new, wall = llamacpp_greedy(llm, ids[0].tolist(), args.max_new_tokens)
            else:
                out = generate(model, ids, max_new_tokens=args.max_new_tokens, method=name, eos_token_id=eos,
                               state=states[name])
                new, wall = out.new_tokens, out.wall_time
            row[name] = {"new_tokens": new, "seconds": wall, "tps": new / wall}
        rows.append(row)
        print(f"{i + 1}/{len(questions)} {q.category}: " + "  ".join(
            f"{n} {row[n]['tps']:.1f}" for n in order) + " tok/s", flush=True)
    summary = {n: statistics.median(r[n]["tps"] for r in rows) for n in ("llama.cpp", "ar", "tr-jacobi")}
    ratios = {n: statistics.median(r[n]["tps"] / r["llama.cpp"]["tps"] for r in rows) for n in ("ar", "tr-jacobi")}
    print("median tok/s: " + "  ".join(f"{n} {v:.1f}" for n, v in summary.items()))
    print("median per-question ratio to llama.cpp: " + "  ".join(f"{n} {v:.2f}x" for n, v in ratios.items()))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(
            {"settings": vars(args), "gguf": gguf.name, "torch_dtype": args.dtype,
             "median_tps": summary, "median_ratio_to_llamacpp": ratios, "questions": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
