"""Method A against method B in one `msn bench` run: tokens/s ratio overall and per category.

    python benchmarks/versus.py runs/v2-bf16-pc5 --a tr-jacobi --b pld [--floor ar:0.95]
    python benchmarks/versus.py runs/parts --a tr-jacobi --parts jacobi,retrieval,recycling

``--parts``: A against each of several methods in one table, paired per question: per category the median
per-question tokens/s ratio, the 95% bootstrap interval of the mean tokens/s difference, A's MAT against the
best of them, and the categories where A's median ratio is below 1 (issue 35: the union never loses to its
parts).

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

from msn.bench.stats import paired, tokens_per_s, tokens_per_step


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


def by_category(run: Path, method: str) -> dict[str, dict[str, tuple[float, float]]]:
    """category -> question id -> (tokens/s, MAT) of ``method``'s answers."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for line in (run / "answers" / f"{method}.jsonl").read_text().splitlines():
        r = json.loads(line)
        c = r["choices"][0]
        out.setdefault(r["category"], {})[str(r["question_id"])] = (tokens_per_s(c), tokens_per_step(c))
    return out


def parts_table(run: Path, a: str, parts: list[str]) -> str:
    """A against each method of ``parts``, per category and overall, paired per question (see the docstring)."""
    xa, xs = by_category(run, a), {b: by_category(run, b) for b in parts}
    head = " | ".join(f"{a} / {b}: median [95% CI tok/s diff] w/l" for b in parts)
    rows = [f"| category | n | {head} | MAT {a} | best MAT of the parts |", "|---|---:|" + "---|" * len(parts) + "---:|---:|"]
    below = {b: [] for b in parts}
    for cat in [*sorted(xa), "overall"]:
        qa = {q: v for c in xa for q, v in xa[c].items()} if cat == "overall" else xa[cat]
        cells = []
        best_mat = 0.0
        for b in parts:
            qb = {q: v for c in xs[b] for q, v in xs[b][c].items()} if cat == "overall" else xs[b].get(cat, {})
            common = sorted(set(qa) & set(qb))
            if not common:
                cells.append("-")
                continue
            med = statistics.median(qa[q][0] / qb[q][0] for q in common)
            stat = paired({q: qa[q][0] for q in common}, {q: qb[q][0] for q in common})
            lo, hi = stat["ci95"]
            cells.append(f"{med:.2f}x [{lo:+.2f}, {hi:+.2f}] {stat['wins']}/{stat['losses']}")
            best_mat = max(best_mat, statistics.mean(qb[q][1] for q in common))
            if med < 1.0 and cat != "overall":
                below[b].append(cat)
        mat = statistics.mean(v[1] for v in qa.values())
        rows.append(f"| {cat} | {len(qa)} | {' | '.join(cells)} | {mat:.2f} | {best_mat:.2f} |")
    rows.append("")
    rows += [f"categories where {a}'s median ratio to {b} is below 1: {len(v)} ({', '.join(v) or 'none'})"
             for b, v in below.items()]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="msn bench --out folder (holds summary.json)")
    p.add_argument("--a", default="tr-jacobi")
    p.add_argument("--b", default="pld")
    p.add_argument("--floor", default="ar:0.95", help="METHOD:SHARE, e.g. ar:0.95")
    p.add_argument("--parts", default=None, help="comma-separated methods: A against each, paired per question")
    args = p.parse_args()
    if args.parts:
        print(parts_table(Path(args.run), args.a, [m for m in args.parts.split(",") if m]))
        return
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
