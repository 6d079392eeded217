"""Decoder variants of one model, one run: an A/B of a draft-source setting, paired per question.

    python benchmarks/paired_variants.py --model qwen2.5-coder-0.5b --dtype bf16 --threads 1 \\
        --categories summarization,rag,extraction --per-category 5 \\
        --variants ar=ar retrieval=retrieval head=tr-jacobi rows64=tr-jacobi:recycling.max_prompt_rows=64 \\
        --out runs/ab-rows

Two `msn bench` runs side by side (one per code version) differ by core, by neighbour and by drift; a change
worth a few percent drowns in that. Here every variant answers every question in one process, in an order
that rotates between questions, each with its own decoder state (recycling table, calibration, latency
curve) as in `msn bench`. A variant is ``NAME=METHOD`` with optional ``:SOURCE.ATTR=VALUE,...`` settings on the
draft sources of its state (their constructor attributes, e.g. ``recycling.max_prompt_rows``) or on a decoding
module's switch, applied while that variant answers (``attention.enabled=False``). The report
compares each variant with the first tree variant (``--base``), paired per question: tokens/s ratio, median
per-question ratio, bootstrap interval, wins/losses. Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msn.bench import runner
from msn.bench.questions import load_questions, qid_key, select
from msn.bench.session import answered, check_answer_files
from msn.bench.stats import append_answers, paired, per_question, tokens_per_s, tokens_per_step, write_report
from msn.decoding import attention, cache, costs, verify
from msn.decoding.engine import DecoderState
from msn.errors import InputError
from msn.models import load_model
from msn.outputs import check_output_dir
from msn.prompting import eos_ids

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
MODULES = {"attention": attention, "cache": cache, "costs": costs, "verify": verify}  # process-wide switches a variant may set: module name -> module


@dataclass
class Variant:
    name: str
    method: str
    settings: dict[tuple[str, str], object] = field(default_factory=dict)  # (source, attribute) -> value

    def state(self) -> DecoderState:
        """A fresh decoder state with this variant's source settings (an unknown source or attribute is an
        error, never a silently ignored setting)."""
        state = DecoderState()
        for (source, attr), value in self.settings.items():
            src = MODULES.get(source) or state.sources.get(source)
            if src is None or not hasattr(src, attr):
                raise InputError(f"variant {self.name}: no setting {source}.{attr} (sources: "
                                 f"{', '.join(state.sources)}; switches: {', '.join(MODULES)})")
            if source not in MODULES:
                setattr(src, attr, value)
        return state

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The variant's module switches, for the ``with`` block; restored afterwards."""
        mine = {key: value for key, value in self.settings.items() if key[0] in MODULES}
        before = {(m, a): getattr(MODULES[m], a) for m, a in mine}
        try:
            for (m, a), value in mine.items():
                setattr(MODULES[m], a, value)
            yield
        finally:
            for (m, a), value in before.items():
                setattr(MODULES[m], a, value)


def parse_variant(spec: str) -> Variant:
    """``NAME=METHOD[:SOURCE.ATTR=VALUE,...]``; values are Python literals (64, 0.5, True)."""
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise InputError(f"--variants {spec!r}: expected NAME=METHOD[:SOURCE.ATTR=VALUE,...]")
    method, _, settings = rest.partition(":")
    runner.parse_methods(method)  # an unknown method fails here, with the list of known ones
    parsed: dict[tuple[str, str], object] = {}
    for item in filter(None, settings.split(",")):
        key, eq, raw = item.partition("=")
        source, dot, attr = key.partition(".")
        if not (eq and dot and source and attr):
            raise InputError(f"--variants {spec!r}: setting {item!r} is not SOURCE.ATTR=VALUE")
        try:
            parsed[source, attr] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise InputError(f"--variants {spec!r}: {raw!r} is not a Python literal (a number, True, ...)") from None
    return Variant(name, method, parsed)


def summarize(out: Path, variants: list[Variant], base: str) -> dict:
    """Per variant: mean tokens/s and MAT; against ``base``: tokens/s paired per question, and the median of
    the per-question ratios (robust to one slow outlier)."""
    tps = {v.name: per_question(out / "answers" / f"{v.name}.jsonl", tokens_per_s) for v in variants}
    mat = {v.name: per_question(out / "answers" / f"{v.name}.jsonl", tokens_per_step) for v in variants}
    rows = {}
    for v in variants:
        a, b = tps[v.name], tps[base]
        shared = sorted(set(a) & set(b))
        rows[v.name] = {
            "method": v.method, "settings": {f"{s}.{k}": x for (s, k), x in v.settings.items()},
            "questions": len(a), "tokens_per_s": statistics.fmean(a.values()) if a else None,
            "mat": statistics.fmean(mat[v.name].values()) if mat[v.name] else None,
            "vs_base": None if v.name == base else paired(a, b),
            "median_ratio": statistics.median(a[k] / b[k] for k in shared) if shared and v.name != base else None,
        }
    return {"base": base, "variants": rows}


def render(summary: dict) -> str:
    base = summary["base"]
    lines = [f"| variant | method | settings | tokens/s | MAT | vs {base}: tokens/s ratio, median per question, "
             "paired difference [95%], wins/losses |", "|---|---|---|---:|---:|---|"]
    for name, r in summary["variants"].items():
        vs = r["vs_base"]
        cell = "–" if not vs else (f"{vs['ratio']:.3f}x, median {r['median_ratio']:.3f}x, {vs['mean']:+.2f} tok/s "
                                   f"[{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}], {vs['wins']}/{vs['losses']} "
                                   f"of {vs['n']}")
        settings = ", ".join(f"{k}={x}" for k, x in r["settings"].items()) or "–"
        tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.2f}"
        mat = "n/a" if r["mat"] is None else f"{r['mat']:.2f}"
        lines.append(f"| {name} | {r['method']} | {settings} | {tps} | {mat} | {cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="preset, folder or hub id")
    p.add_argument("--variants", nargs="+", required=True, help="NAME=METHOD[:SOURCE.ATTR=VALUE,...], two or more")
    p.add_argument("--base", default=None, help="the variant the others are compared with (default: the first "
                   "variant whose method drafts with a tree, else the first)")
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS), help="Spec-Bench question.jsonl")
    p.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories (default: all)")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(s) for s in args.variants]
        names = [v.name for v in variants]
        if len(variants) < 2 or len(set(names)) != len(names):
            raise InputError("--variants needs two or more variants with distinct names")
        base = args.base or next((v.name for v in variants if v.method != "ar"), names[0])
        if base not in names:
            raise InputError(f"--base {base!r} is not one of the variants ({', '.join(names)})")
        states = {v.name: v.state() for v in variants}
        if not Path(args.questions).is_file():
            raise InputError("question file not found; pass --questions PATH", where=args.questions)
        cats = args.categories.split(",") if args.categories else None
        questions = select(load_questions(args.questions), categories=cats, per_category=args.per_category,
                           limit=args.limit)
        out = check_output_dir(args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    files = {v.name: out / "answers" / f"{v.name}.jsonl" for v in variants}
    try:  # a rerun into the same --out resumes only if its answers are to these very questions
        check_answer_files(list(files.values()), questions)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, dtype=args.dtype, device="cpu")
    eos = eos_ids(model, tok)
    files[base].parent.mkdir(parents=True, exist_ok=True)
    done = set.intersection(*(answered(f) for f in files.values()))
    q0 = questions[0]
    for v in variants:  # warm-up on a throwaway state: kernels, the latency curve, the packed weights
        with v.applied():
            runner.answer_question(model, tok, type(q0)(q0.question_id, q0.category, q0.turns[:1]), v.method,
                                   min(16, args.max_new_tokens), None, eos, v.name, v.state())
    for i, q in enumerate(questions):
        if qid_key(q.question_id) in done:
            continue
        shift = i % len(variants)
        records = {}
        for v in variants[shift:] + variants[:shift]:  # who goes first rotates
            with v.applied():
                records[v.name] = runner.answer_question(model, tok, q, v.method, args.max_new_tokens, None, eos,
                                                         v.name, states[v.name])
        append_answers(files, records)
        print(f"[{i + 1}/{len(questions)}] {q.category} {q.question_id}", flush=True)
    summary = summarize(out, variants, base)
    summary.update({"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                    "max_new_tokens": args.max_new_tokens, "questions_file": args.questions,
                    "command": " ".join(sys.argv)})
    write_report(out, summary, render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
