"""``msn bench``: Spec-Bench compatible speed benchmark, every method side by side in one run.

All inputs are checked before the model loads, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from msn.bench import questions as qs
from msn.bench.flags import BENCH_SEED_HELP, check_run_flags
from msn.bench.runner import BENCH_METHODS, DEFAULT_METHODS
from msn.bench.session import BenchConfig, command_line, run_bench
from msn.bench.summary import print_report
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

DEFAULT_QUESTIONS = os.environ.get("MSN_SPEC_BENCH", "data/spec_bench/question.jsonl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset, local folder or hub id (default: smollm2-135m)")
    p.add_argument("--questions", default=DEFAULT_QUESTIONS,
                   help=f"Spec-Bench question.jsonl (default: $MSN_SPEC_BENCH or {DEFAULT_QUESTIONS}); "
                        f"get it from {qs.SPEC_BENCH_URL}")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, run interleaved; choose from {', '.join(BENCH_METHODS)} "
                        f"(default: {','.join(DEFAULT_METHODS)}); speedups are relative to ar")
    add_dtype_argument(p)
    add_device_argument(p)
    add_quantize_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="per turn (default: 128)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--limit", type=int, default=None, help="first K questions (after --categories)")
    group.add_argument("--per-category", type=int, default=None, help="first K questions of each category")
    p.add_argument("--categories", default=None, help="comma-separated categories to keep (default: all)")
    p.add_argument("--tree", default=None, help=TREE_HELP)
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up questions (default: 1)")
    add_threads_argument(p)
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench); a rerun into the "
                   "same folder resumes, skipping questions already answered")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the bench in --out (deletes only the files a bench writes there)")
    add_sampling_arguments(p, seed_help=BENCH_SEED_HELP)


def validate(args: argparse.Namespace) -> tuple[list[qs.Question], list[str]]:
    """Every user error, before any model is loaded."""
    methods = check_run_flags(args)
    sampling_settings(args)
    check_quantize_flag(args, pick_device(args.device))
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    questions = qs.select(qs.load_questions(args.questions), categories, args.limit, args.per_category)
    return questions, methods


def run(args: argparse.Namespace) -> int:
    questions, methods = validate(args)
    cfg = BenchConfig(
        model=args.model, questions=questions, methods=methods, out=Path(args.out), dtype=args.dtype,
        device=args.device, max_new_tokens=args.max_new_tokens, tree=args.tree, warmup=args.warmup,
        command=command_line(), threads=args.threads, overwrite=args.overwrite, sampling=sampling_settings(args),
        quantize=args.quantize,
    )
    result = run_bench(cfg)
    print_report(result.summary, result.out)
    if result.interrupted:
        print(f"msn bench: interrupted; finished questions are in {result.out}", file=sys.stderr)
        return 130
    return 0
