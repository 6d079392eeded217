"""``msn demo``: the README's first command. A small offline benchmark on prompts we wrote ourselves.

Twelve prompts in Spec-Bench's format cover its kinds (conversation, translation, summarization, QA, math,
retrieval-augmented answers) plus code; every method runs side by side on the default model, so the
first thing a user sees is a measured speed-up on their own machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msn.bench import questions as qs
from msn.bench.flags import BENCH_SEED_HELP, check_run_flags
from msn.bench.runner import BENCH_METHODS, DEFAULT_METHODS, sampling_record
from msn.bench.session import BenchConfig, command_line, run_bench
from msn.bench.summary import print_report, sampling_text
from msn.decoding.tree import TREE_HELP
from msn.flags import (
    add_device_argument,
    add_dtype_argument,
    add_quantize_argument,
    add_sampling_arguments,
    add_threads_argument,
    check_quantize_flag,
    pick_device,
    sampling_settings,
)
from msn.models import DEFAULT_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset, folder or checkpoint (default: {DEFAULT_MODEL})")
    add_dtype_argument(p)
    add_device_argument(p, help="cpu, cuda or auto (default: auto)")
    add_quantize_argument(p)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated from {', '.join(BENCH_METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--max-new-tokens", type=int, default=96, help="per prompt (default: 96)")
    p.add_argument("--limit", type=int, default=None, help="only the first K of the 12 prompts")
    p.add_argument("--tree", default=None, help=TREE_HELP)
    add_threads_argument(p, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="runs/demo", help="report folder (default: runs/demo); a rerun resumes it")
    p.add_argument("--overwrite", action="store_true", help="measure again from scratch into --out")
    add_sampling_arguments(p, seed_help=BENCH_SEED_HELP)


def run(args: argparse.Namespace) -> int:
    methods = check_run_flags(args)
    sampling = sampling_settings(args)
    from msn.bench.session import check_bench_out

    check_quantize_flag(args, pick_device(args.device))
    check_bench_out(Path(args.out))  # before the banner: a bad input is the only line printed
    questions = qs.demo_questions(args.limit)
    print(f"msn demo: {len(questions)} prompts x {len(methods)} methods ({', '.join(methods)}) on {args.model}, "
          f"{args.dtype}, up to {args.max_new_tokens} new tokens each, "
          f"{sampling_text(sampling_record(sampling))}", file=sys.stderr)
    cfg = BenchConfig(
        model=args.model, questions=questions, methods=methods, out=Path(args.out), dtype=args.dtype,
        device=args.device, max_new_tokens=args.max_new_tokens, tree=args.tree, warmup=1,
        command=command_line(), threads=args.threads, overwrite=args.overwrite, sampling=sampling,
        leave_out="stop before it with --limit", quantize=args.quantize,
    )
    result = run_bench(cfg)
    print_report(result.summary, result.out)
    if not result.interrupted:
        explain_identical(cfg)
    return 130 if result.interrupted else 0


TREE_METHODS = ("jacobi", "retrieval", "recycling", "tr-jacobi")
CHECK_PROMPTS, CHECK_TOKENS = 2, 32  # the fp32 identity check: seconds, not a second benchmark


def explain_identical(cfg: BenchConfig, file=None) -> None:
    """Say why "identical to ar" is below 100% in bf16/fp16, and prove the claim it seems to contradict: the
    same methods in fp32 give ar's text exactly (a short check on the first prompts)."""
    file = file or sys.stdout
    methods = [m for m in cfg.methods if m in TREE_METHODS]
    if cfg.dtype == "fp32" or "ar" not in cfg.methods or not methods:
        return
    check = fp32_identity(cfg, methods)  # first: loading the fp32 model prints its own lines
    print(f"\nidentical to ar, in {cfg.dtype}: a tree step verifies several tokens in one forward, whose {cfg.dtype} "
          "rounding differs from a one-token step's; where two tokens' logits are nearly tied the other one can win, "
          "and the text goes on from there (each token still the model's top choice in that forward). In exact "
          "arithmetic the methods are lossless:", file=file)
    print(f"fp32 check: {check}", file=file)


def fp32_identity(cfg: BenchConfig, methods: list[str]) -> str:
    """Decode the first prompts with ar and ``methods`` in fp32 and count identical texts."""
    import torch

    from msn.bench import session
    from msn.decoding.engine import DecoderState, generate
    from msn.prompting import encode_chat, eos_ids

    fp32 = BenchConfig(**{**cfg.__dict__, "dtype": "fp32"})
    device = session.pick_device(cfg.device)
    model, tok = session._load(fp32, device)
    eos = eos_ids(model, tok)
    prompts = [q.turns[0] for q in cfg.questions[:CHECK_PROMPTS]]
    same = dict.fromkeys(methods, 0)
    for text in prompts:
        ids = encode_chat(tok, [{"role": "user", "content": text}]).to(device)
        kw = {"max_new_tokens": CHECK_TOKENS, "eos_token_id": eos, "tree": cfg.tree}
        if cfg.sampling is not None:
            kw.update(do_sample=True, seed=cfg.sampling.seed, **{k: v for k, v in vars(cfg.sampling).items()
                                                                 if k != "seed" and v is not None})
        ref = generate(model, ids, method="ar", state=DecoderState(), **kw).sequences
        for m in methods:
            same[m] += bool(torch.equal(generate(model, ids, method=m, state=DecoderState(), **kw).sequences, ref))
    return "; ".join(f"{m} gives ar's text on {n}/{len(prompts)} prompts" for m, n in same.items()) + \
        f" ({CHECK_TOKENS} tokens each, --dtype fp32 to benchmark so)"
