"""Merge the answer folders of several ``msn bench`` runs (e.g. categories split over two processes) into
one report: answers concatenated per method (first answer per question wins), summary recomputed.

    python benchmarks/bench_merge.py --out runs/bench-fp32-merged runs/bench-fp32 runs/bench-fp32-single
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msn.bench.plot import plot_speedup
from msn.bench.summary import answers_path, read_answers, summarize, write_summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    metas = [json.loads((r / "summary.json").read_text()) for r in args.runs]
    methods = metas[0]["method_order"]
    merged: dict[str, list[dict]] = {}
    for m in methods:
        seen, recs = set(), []
        for r in args.runs:
            for rec in read_answers(answers_path(r, m)):
                if rec["question_id"] not in seen:
                    seen.add(rec["question_id"])
                    recs.append(rec)
        merged[m] = recs
    (args.out / "answers").mkdir(parents=True, exist_ok=True)
    for m, recs in merged.items():
        answers_path(args.out, m).write_text("".join(json.dumps(x) + "\n" for x in recs))
    meta = {k: v for k, v in metas[0].items() if k not in ("methods", "questions", "categories", "baseline")}
    meta["command"] = " ; ".join(str(x.get("command")) for x in metas)
    meta["merged_from"] = [f"{r} ({x.get('status')})" for r, x in zip(args.runs, metas, strict=True)]
    meta["status"] = "merged: " + "; ".join(meta["merged_from"])
    summary = summarize(merged, meta=meta)
    write_summary(args.out, summary)
    plot_speedup(summary, args.out / "speedup.png")
    print(f"{summary['questions']} questions -> {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
