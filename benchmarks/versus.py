"""Method A against method B in one `msn bench` run: tokens/s ratio overall and per category.

    python benchmarks/versus.py runs/v2-bf16-pc5 --a tr-jacobi --b pld [--floor ar:0.95]

Both methods ran interleaved per question in the same run, so their ratio is measured side by side. The
overall ratio is of the mean per-answer speeds (Spec-Bench's convention, as in summary.json). ``--floor``
also lists the categories where A is below that share of a third method's speed.

In bf16 two methods do not always write the same text (a tree forward shifts near-ties), and a text that
falls into a loop is drafted almost whole by prompt lookup: such an answer's tokens/s says more about the
text than the decoder. So the ratio is also given over the questions where A and B wrote identical text,
with the per-question median, read from the answer files.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def answers(run: Path, method: str) -> dict:
    """question id -> (turn texts, tokens/s of the answer)."""
    out = {}
    for line in (run / "answers" / f"{method}.jsonl").read_text().splitlines():
        r = json.loads(line)
        c = r["choices"][0]
        out[r["question_id"]] = (c["turns"], sum(c["new_tokens"]) / sum(c["wall_time"]))
    return out


def same_text(run: Path, a: str, b: str) -> str:
    """The A / B speed ratio over all questions and over those where both wrote identical text."""
    xa, xb = answers(run, a), answers(run, b)
    qs = [q for q in xa if q in xb]
    same = [q for q in qs if xa[q][0] == xb[q][0]]
    parts = []
    for label, group in (("all", qs), ("identical text", same)):
        if group:
            mean = statistics.mean(xa[q][1] for q in group) / statistics.mean(xb[q][1] for q in group)
            med = statistics.median(xa[q][1] / xb[q][1] for q in group)
            parts.append(f"{label}: {len(group)} questions, {mean:.2f}x (median per question {med:.2f}x)")
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="msn bench --out folder (holds summary.json)")
    p.add_argument("--a", default="tr-jacobi")
    p.add_argument("--b", default="pld")
    p.add_argument("--floor", default="ar:0.95", help="METHOD:SHARE, e.g. ar:0.95")
    args = p.parse_args()
    s = json.loads((Path(args.run) / "summary.json").read_text())
    methods = s["methods"]
    floor_m, floor_v = args.floor.split(":")
    a, b, f = methods[args.a], methods[args.b], methods[floor_m]
    ratio = a["overall"]["tokens_per_s"] / b["overall"]["tokens_per_s"]
    print(f"{s.get('model')} {s.get('dtype')}, {s['questions']} questions: {args.a} / {args.b} = {ratio:.2f}x overall")
    print(f"| category | {args.a} / {args.b} | {args.a} / {floor_m} |\n|---|---:|---:|")
    below, under = [], []
    for cat in s["categories"]:
        ta, tb, tf = (m["categories"][cat]["tokens_per_s"] for m in (a, b, f))
        print(f"| {cat} | {ta / tb:.2f}x | {ta / tf:.2f}x |")
        if ta < tb:
            below.append(cat)
        if ta < float(floor_v) * tf:
            under.append(cat)
    print(f"categories where {args.a} < {args.b}: {len(below)} ({', '.join(below) or 'none'}); "
          f"below {floor_v} x {floor_m}: {len(under)} ({', '.join(under) or 'none'})")
    print(f"{args.a} / {args.b}: {same_text(Path(args.run), args.a, args.b)}")


if __name__ == "__main__":
    main()
