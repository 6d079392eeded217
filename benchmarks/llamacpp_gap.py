"""The gap to llama.cpp on the same model: its plain greedy decoding (and its own prompt-lookup speculation) vs
msn's `ar` and `tr-jacobi`, one run, interleaved per question (first turns of Spec-Bench questions, 128 new tokens, the same chat prompt tokens).

    pip install llama-cpp-python        # no wheel on this index: builds from source (cmake + g++, ~10 min)
    python benchmarks/llamacpp_gap.py --per-category 1 --threads 1 --out runs/llamacpp-gap.json
    python benchmarks/llamacpp_gap.py --quantize none,int4 --per-category 2 --threads 1 --out runs/llamacpp-int4.json

``--quantize none,int4`` runs msn's `ar` and `tr-jacobi` on both weight formats in the same interleaved run
(``int4``: the preset's own 4-bit GGUF codes, msn.int4); ``--model`` takes another preset (its GGUF parts are
joined into a temporary file for llama.cpp). Each engine's first-token time (prompt evaluation plus one token)
is recorded beside the total, so prompt evaluation can be reported apart. ``llama.cpp-lookup`` is llama-cpp-python's
own speculation, ``LlamaPromptLookupDecoding`` (n-gram drafts from the prompt and the text so far, verified in
one batch by the same greedy sampler; ``--lookup-tokens`` drafts per step, its default 10), on the same GGUF.

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
from msn.bench.stats import paired
from msn.decoding import generate
from msn.decoding.engine import DecoderState
from msn.errors import InputError
from msn.models import load_model
from msn.outputs import atomic_write_text
from msn.prompting import encode_chat, eos_ids

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def gguf_parts_of(model: str) -> list[Path]:
    """The GGUF file (or parts) a preset is converted from (found without importing its package)."""
    from msn.models import PRESETS, gguf_parts

    if model not in PRESETS:
        raise InputError(f"--model must be a preset ({', '.join(PRESETS)}): llama.cpp runs its GGUF file")
    return gguf_parts(PRESETS[model])


def llamacpp_greedy(llm, ids: list[int], max_new_tokens: int) -> tuple[int, float, float, list[int]]:
    """New tokens, seconds and first-token seconds for llama.cpp's greedy decoding of ``ids`` (prompt
    evaluation included), and the tokens."""
    start = time.perf_counter()
    new, first, tokens = 0, float("nan"), []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if new == 0:
            first = time.perf_counter() - start
        if llm.token_eos() == token:
            break
        new += 1
        tokens.append(int(token))
        if new >= max_new_tokens:
            break
    return new, time.perf_counter() - start, first, tokens


def decode_tps(run: dict) -> float:
    """Tokens per second after the first token: decoding speed with prompt evaluation set apart."""
    return (run["new_tokens"] - 1) / max(run["seconds"] - run["first_token_seconds"], 1e-9)


class FirstToken:
    """A streamer that notes when msn's first new tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.start, self.puts, self.first = time.perf_counter(), 0, float("nan")

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS))
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--model", default="smollm2-135m", help="a preset (llama.cpp runs its GGUF file)")
    p.add_argument("--quantize", default="none", help="msn weight formats, comma-separated: none, int4")
    p.add_argument("--lookup-tokens", type=int, default=10,
                   help="llama.cpp-lookup: draft tokens per step (LlamaPromptLookupDecoding's num_pred_tokens); 0: "
                        "leave llama.cpp's lookup speculation out")
    p.add_argument("--out", default=None, help="JSON file for the per-question numbers")
    args = p.parse_args(argv)
    formats = [q.strip() for q in args.quantize.split(",") if q.strip()]
    if not formats or any(q not in ("none", "int4") for q in formats):
        raise InputError(f"--quantize must list none and/or int4, got {args.quantize!r}")
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llamacpp_gap: llama-cpp-python is not installed (pip install llama-cpp-python; it builds from "
              "source here)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    questions = select(load_questions(args.questions), per_category=args.per_category, limit=args.limit)
    from msn.gguf_int4 import joined_gguf

    models = {q: load_model(args.model, dtype=args.dtype, quantize=q) for q in formats}
    tok = next(iter(models.values()))[1]
    eos = eos_ids(next(iter(models.values()))[0], tok)
    with joined_gguf(gguf_parts_of(args.model)) as gguf:
        settings = dict(model_path=str(gguf), n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads,
                        n_batch=512, verbose=False)
        llamas = {"llama.cpp": Llama(**settings)}
        if args.lookup_tokens > 0:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            # logits_all: llama-cpp-python 0.3.36's speculative path keeps every position's logits, but sizes its
            # buffer for n_batch rows unless asked for all: a prompt past ~500 tokens failed with a broadcast error.
            llamas["llama.cpp-lookup"] = Llama(**settings, logits_all=True, draft_model=LlamaPromptLookupDecoding(
                num_pred_tokens=args.lookup_tokens))
        engines = {f"{m}{'' if q == 'none' else '-' + q}": (models[q][0], m) for q in formats
                   for m in ("ar", "tr-jacobi")}
        states = {name: DecoderState() for name in engines}
        rows = []
        warm = encode_chat(tok, [{"role": "user", "content": "Say hello."}])
        for llm in llamas.values():
            llamacpp_greedy(llm, warm[0].tolist(), 8)
        for name, (model, m) in engines.items():
            generate(model, warm, max_new_tokens=8, method=m, eos_token_id=eos, state=states[name])
        order = [*llamas, *engines]
        for i, q in enumerate(questions):
            ids = encode_chat(tok, [{"role": "user", "content": q.turns[0]}])
            row = {"question_id": q.question_id, "category": q.category, "prompt_tokens": int(ids.shape[1])}
            text: dict[str, list[int]] = {}
            for name in order if i % 2 == 0 else order[::-1]:  # alternate, so drift hits every engine alike
                if name in llamas:
                    new, wall, first, text[name] = llamacpp_greedy(llamas[name], ids[0].tolist(), args.max_new_tokens)
                else:
                    model, m = engines[name]
                    streamer = FirstToken()
                    out = generate(model, ids, max_new_tokens=args.max_new_tokens, method=m, eos_token_id=eos,
                                   state=states[name], streamer=streamer)
                    new, wall, first = out.new_tokens, out.wall_time, streamer.first
                row[name] = {"new_tokens": new, "seconds": wall, "tps": new / wall, "first_token_seconds": first}
            if "llama.cpp-lookup" in text:  # llama.cpp's speculation is greedy too: the same tokens?
                row["lookup_same_tokens"] = text["llama.cpp-lookup"] == text["llama.cpp"]
            rows.append(row)
            print(f"{i + 1}/{len(questions)} {q.category}: " + "  ".join(
                f"{n} {row[n]['tps']:.1f}" for n in order) + " tok/s", flush=True)
    summary = {n: statistics.median(r[n]["tps"] for r in rows) for n in order}
    others = [n for n in order if n != "llama.cpp"]
    ratios = {n: statistics.median(r[n]["tps"] / r["llama.cpp"]["tps"] for r in rows) for n in others}
    print("median tok/s: " + "  ".join(f"{n} {v:.1f}" for n, v in summary.items()))
    print("median per-question ratio to llama.cpp: " + "  ".join(f"{n} {v:.2f}x" for n, v in ratios.items()))
    intervals = {}
    for n in others:
        d = paired({str(r["question_id"]): r[n]["tps"] for r in rows},
                   {str(r["question_id"]): r["llama.cpp"]["tps"] for r in rows})
        intervals[n] = d
        print(f"  {n} - llama.cpp: {d['mean']:+.1f} tok/s [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] (95% bootstrap), "
              f"{d['wins']}/{d['losses']} questions")
    decode = {n: statistics.median(decode_tps(r[n]) for r in rows) for n in order}
    print("median tok/s after the first token (prompt evaluation apart): " + "  ".join(
        f"{n} {v:.1f}" for n, v in decode.items()))
    first = {n: statistics.median(r[n]["first_token_seconds"] for r in rows) for n in order}
    print("median first-token seconds (prompt evaluation + 1 token): " + "  ".join(
        f"{n} {v:.3f}" for n, v in first.items()))
    if "llama.cpp-lookup" in llamas:
        for n in engines:
            d = paired({str(r["question_id"]): r[n]["tps"] for r in rows},
                       {str(r["question_id"]): r["llama.cpp-lookup"]["tps"] for r in rows})
            print(f"  {n} / llama.cpp-lookup: median per question "
                  f"{statistics.median(r[n]['tps'] / r['llama.cpp-lookup']['tps'] for r in rows):.2f}x, "
                  f"{d['mean']:+.1f} tok/s [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}], {d['wins']}/{d['losses']}")
    if "llama.cpp-lookup" in llamas:
        print(f"llama.cpp-lookup's tokens equal llama.cpp's greedy on "
              f"{sum(r['lookup_same_tokens'] for r in rows)}/{len(rows)} questions")
    if "ar-int4" in engines and "ar" in engines:
        for m in ("ar", "tr-jacobi"):
            print(f"{m} int4 / {m} {args.dtype}: median per question "
                  f"{statistics.median(r[m + '-int4']['tps'] / r[m]['tps'] for r in rows):.2f}x")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(
            {"settings": vars(args), "gguf": gguf.name, "torch_dtype": args.dtype,
             "median_tps": summary, "median_ratio_to_llamacpp": ratios, "paired_to_llamacpp": intervals,
             "median_decode_tps": decode, "median_first_token_seconds": first, "questions": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
