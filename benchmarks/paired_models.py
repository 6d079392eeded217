"""Two (or more) models, one bench run: every question answered by every model and method in turn, so a
speed ratio between models is measured side by side, under the same load, and paired per question.

    python benchmarks/paired_models.py --models runs/reproduce-distill/train/general-sft \\
        runs/reproduce-distill/train/general-msn-L4x4 --methods ar,pld,jacobi,tr-jacobi --per-category 2 \\
        --dtype bf16 --threads 1 --out runs/paired-sft-msn

`msn bench` times one model per run; comparing two models then means comparing two runs, which is only fair
on a machine whose load stays the same between them. Here the models take turns on every question (the
order alternates between questions), so load drift hits both alike, and the report gives, per method, each
model's tokens/s and MAT, the ratio of every model to the first, and the paired per-question difference with
a 95% bootstrap interval. Answers are Spec-Bench records under OUT/answers/MODEL/METHOD.jsonl; rerunning the
same command resumes (questions every model and method answered are skipped). Each model and method keeps its
own decoder state (recycling table, calibration) over the run, as in `msn bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

from msn.bench import runner
from msn.bench.questions import load_questions, qid_key, select
from msn.bench.session import answered, check_answer_files
from msn.bench.stats import (
    answer_choices,
    append_answers,
    drafted_per_step,
    paired,
    per_question,
    tokens_per_s,
    tokens_per_step,
    write_report,
)
from msn.decoding.engine import DecoderState
from msn.decoding.sources import SOURCES
from msn.errors import InputError, MsnError
from msn.models import load_model
from msn.outputs import check_output_dir
from msn.prompting import eos_ids

# Per-question values compared between models; tree methods add each draft source's accepted drafts per step,
# which says where a MAT difference comes from (e.g. more Jacobi-drafted tokens vs more retrieval hits).
# "S alone" counts only the drafts no other source proposed: what S adds over the others.
DRAFTERS = {s: drafted_per_step(s) for s in SOURCES} | {f"{s} alone": drafted_per_step(s, sole=True) for s in SOURCES}
READ = {"tps": tokens_per_s, "mat": tokens_per_step} | DRAFTERS
DEPTHS = (1, 2, 3)  # the per-depth table: share of steps accepting at least d Jacobi drafts
DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def labels(models: list[str]) -> list[str]:
    """Short unique names for the answer folders: the last path part, numbered if two share it."""
    names = [Path(m.rstrip("/")).name or m for m in models]
    return [f"{i}-{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def depth_profile(path: Path) -> dict | None:
    """Pooled over every step of a tree method's answers: the share of steps that accepted at least d
    Jacobi-drafted tokens (is MSN's gain only the first draft, or deeper?) and draft nodes per step by source
    (what the tree spent). None for a method without per-step source records."""
    accepted: list[int] = []
    nodes: dict[str, int] = {}
    for _, choice in answer_choices(path):
        with contextlib.suppress(KeyError, TypeError):
            steps, drafted = choice["accepted_by_source"]["jacobi"], choice["nodes_by_source"]
            accepted += steps
            for source, per_step in drafted.items():
                nodes[source] = nodes.get(source, 0) + sum(per_step)
    if not accepted:
        return None
    n = len(accepted)
    return {"steps": n, "at_least": {d: sum(a >= d for a in accepted) / n for d in DEPTHS},
            "nodes_per_step": {s: v / n for s, v in nodes.items()}}


def summarize(out: Path, names: list[str], methods: list[str]) -> dict:
    """Per method: each model's mean tokens/s, MAT and (tree methods) accepted drafts per step by source, and
    every model against the first, paired."""
    summary: dict = {"models": names, "methods": {}}
    for m in methods:
        recs = {n: {key: per_question(out / "answers" / n / f"{m}.jsonl", fn) for key, fn in READ.items()}
                for n in names}
        entry = {n: {"questions": len(r["tps"]),
                     "tokens_per_s": statistics.fmean(r["tps"].values()) if r["tps"] else None,
                     "mat": statistics.fmean(r["mat"].values()) if r["mat"] else None,
                     "accepted_per_step": {s: statistics.fmean(r[s].values()) for s in DRAFTERS if r[s]}}
                 for n, r in recs.items()}
        for n in names:
            entry[n]["jacobi_depth"] = depth_profile(out / "answers" / n / f"{m}.jsonl")
        for n in names[1:]:
            entry[n]["vs_first"] = {key: paired(recs[n][key], recs[names[0]][key]) for key in READ
                                    if recs[n][key]}
        summary["methods"][m] = entry
    return summary


def render(summary: dict) -> str:
    names = summary["models"]
    lines = ["| method | model | tokens/s | MAT | vs " + names[0] + " (tokens/s, paired per question) |",
             "|---|---|---:|---:|---|"]
    for m, entry in summary["methods"].items():
        for n in names:
            e, vs = entry[n], (entry[n].get("vs_first") or {}).get("tps")
            cell = "–" if not vs else (f"{vs['ratio']:.2f}x, {vs['mean']:+.2f} tok/s [{vs['ci95'][0]:+.2f}, "
                                      f"{vs['ci95'][1]:+.2f}], {vs['wins']}/{vs['losses']} of {vs['n']}")
            tps = "n/a" if e["tokens_per_s"] is None else f"{e['tokens_per_s']:.2f}"
            mat = "n/a" if e["mat"] is None else f"{e['mat']:.2f}"
            lines.append(f"| {m} | {n} | {tps} | {mat} | {cell} |")
    sources = [s for s in DRAFTERS if any(s in e[n]["accepted_per_step"] for e in summary["methods"].values()
                                          for n in names)]
    if sources:
        lines += ["", "Accepted draft tokens per step, by the source that drafted them (tree methods; ratio to "
                  f"{names[0]}, paired per question)", "",
                  "| method | model | " + " | ".join(sources) + " |", "|---|---|" + "---:|" * len(sources)]
        for m, entry in summary["methods"].items():
            for n in names:
                per, vs = entry[n]["accepted_per_step"], entry[n].get("vs_first") or {}
                if per:
                    lines.append(f"| {m} | {n} | " + " | ".join(_source_cell(per.get(s), vs.get(s)) for s in sources)
                                 + " |")
    depth = [(m, n, e[n]["jacobi_depth"]) for m, e in summary["methods"].items() for n in names
             if e[n].get("jacobi_depth")]
    if depth:
        lines += ["", "Per depth (pooled steps): share of steps accepting at least d Jacobi-drafted tokens, and draft "
                  "nodes per step by source", "",
                  "| method | model | steps | " + " | ".join(f">= {k}" for k in DEPTHS) + " | nodes per step: "
                  + " / ".join(SOURCES) + " |", "|---|---|---:|" + "---:|" * len(DEPTHS) + "---|"]
        for m, n, d in depth:
            shares = " | ".join(f"{d['at_least'][k]:.3f}" for k in DEPTHS)
            per = " / ".join(f"{d['nodes_per_step'].get(s, 0.0):.2f}" for s in SOURCES)
            lines.append(f"| {m} | {n} | {d['steps']} | {shares} | {per} |")
    return "\n".join(lines)


def _source_cell(value: float | None, vs: dict | None) -> str:
    """'0.344 (1.29x [-0.01, +0.17])': a source's accepted drafts per step and its paired ratio to the first."""
    if value is None:
        return "n/a"
    if not vs or vs["ratio"] is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({vs['ratio']:.2f}x [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}])"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="two or more models (preset, folder or hub id)")
    p.add_argument("--methods", default="ar,tr-jacobi", help="comma-separated msn bench methods")
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS), help="Spec-Bench question.jsonl")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tree", default=None, help="auto (default), a preset or a JSON file")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        if len(args.models) < 2:
            raise InputError("--models needs at least two models to compare")
        methods = runner.parse_methods(args.methods)
        if not Path(args.questions).is_file():
            raise InputError("question file not found; pass --questions PATH", where=args.questions)
        questions = select(load_questions(args.questions), per_category=args.per_category, limit=args.limit)
        out = check_output_dir(args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    names = labels(args.models)
    files = {(n, m): out / "answers" / n / f"{m}.jsonl" for n in names for m in methods}
    try:  # a rerun into the same --out resumes only if its answers are to these very questions
        check_answer_files(list(files.values()), questions)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        loaded = [load_model(m, dtype=args.dtype, device="cpu") for m in args.models]
    except (OSError, ValueError, MsnError) as e:
        print(f"error: cannot load a model: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    eos = {n: eos_ids(model, tok) for (model, tok), n in zip(loaded, names, strict=True)}
    states = {(n, m): DecoderState() for n in names for m in methods}
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
    done = set.intersection(*(answered(f) for f in files.values()))
    for (model, tok), n in zip(loaded, names, strict=True):  # warm-up: one short answer per method
        for m in methods:
            q = questions[0]
            short = type(q)(q.question_id, q.category, q.turns[:1])
            runner.answer_question(model, tok, short, m, min(16, args.max_new_tokens), args.tree, eos[n], n,
                                   DecoderState())
    for i, q in enumerate(questions):
        if qid_key(q.question_id) in done:
            continue
        order = list(zip(loaded, names, strict=True))
        records = {}
        for (model, tok), n in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            for m in methods:
                records[n, m] = runner.answer_question(model, tok, q, m, args.max_new_tokens, args.tree, eos[n],
                                                       n, states[n, m])
        append_answers(files, records)
        print(f"[{i + 1}/{len(questions)}] {q.category} {q.question_id}", flush=True)
    summary = summarize(out, names, methods)
    summary.update({"model_paths": args.models, "dtype": args.dtype, "threads": torch.get_num_threads(),
                    "max_new_tokens": args.max_new_tokens, "questions_file": args.questions,
                    "command": " ".join(sys.argv)})
    write_report(out, summary, render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
