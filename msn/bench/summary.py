"""Summary math over answer files, with Spec-Bench's conventions.

Per answer, speed = sum of new tokens / sum of wall time over its turns; a method's tokens/s is the mean of
its answers' speeds (Spec-Bench's ``speed.py``), speedup = that mean / the baseline's over the same
questions, MAT = mean accepted tokens per decoding step (bonus included; pooled over all steps: the mean of
every answer's ``accept_lengths``, which every method records, transformers' prompt lookup too), and
identical_rate = share of questions whose every turn's text equals the baseline's. For tree methods, per
draft source: accepted draft tokens per step it drafted (a token several sources drafted counts for each)
and its nodes per step in the verified tree: where the speed-up comes from. Only questions that
every method finished count, so an interrupted run still compares like with like.

A sampled bench (``sampling`` in the summary's settings) still reports identical_rate for msn's methods: they
sample with the same per-position noise for a seed, so they should give ``ar``'s text. Methods that sample
with a random stream of their own (``pld``, through transformers) give another sample of the same
distribution: their identical_rate is None and the report says why instead of showing a misleading share.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from msn.bench.questions import qid_key
from msn.errors import InputError

BASELINE = "ar"
METRICS = ("tokens_per_s", "speedup", "mat", "identical_rate")
OWN_RANDOM_STREAM = ("pld",)  # sample through transformers' generator, not msn's coupled noise


def sampling_text(sampling: Mapping | None) -> str:
    """``greedy`` or ``sampled: temperature=0.7, top_p=0.9, seed=0`` (the settings that are on)."""
    if not sampling:
        return "greedy"
    on = ", ".join(f"{k}={v}" for k, v in sampling.items() if v is not None)
    return f"sampled: {on}"


def not_comparable(summary: Mapping) -> list[str]:
    """Methods whose identical-to-baseline share means nothing in this summary (sampled with their own
    random stream)."""
    return [m for m in summary.get("methods", {}) if summary.get("sampling") and m in OWN_RANDOM_STREAM]


def answers_path(out_dir: str | os.PathLike, method: str) -> Path:
    return Path(out_dir) / "answers" / f"{method}.jsonl"


def read_answers(path: str | os.PathLike) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"malformed JSON: {e.msg}", where=f"{path}:{lineno}") from None
    return records


def _choice(rec: dict) -> dict:
    return rec["choices"][0]


def answer_speed(rec: dict) -> float:
    c = _choice(rec)
    wall = sum(c["wall_time"])
    return sum(c["new_tokens"]) / wall if wall > 0 else 0.0


def _mat(recs: Sequence[dict]) -> tuple[float | None, str | None]:
    """Pooled mean accepted length (Spec-Bench: the mean of all answers' ``accept_lengths``) and where it came
    from. Every method records per-step lengths, pld included; answer files written before pld did (they
    have ``accept_lengths: null``) fall back to new tokens / forward passes, marked ``"steps"``."""
    lengths: list[int] = []
    tokens = steps = 0
    have_lengths = have_steps = True
    for r in recs:
        c = _choice(r)
        if c.get("accept_lengths") is None:
            have_lengths = False
        else:
            lengths.extend(c["accept_lengths"])
        s = c.get("decoding_steps")
        if s is None or any(x is None for x in s):
            have_steps = False
        else:
            steps += sum(s)
            tokens += sum(c["new_tokens"])
    if have_lengths and lengths:
        return sum(lengths) / len(lengths), "accept_lengths"
    if have_steps and steps:
        return tokens / steps, "steps"
    return None, None


def _source_per_step(recs: Sequence[dict], field: str) -> float | None:
    """Pooled accepted draft tokens per step from one source; None unless every answer records it."""
    values = [_choice(r).get(field) for r in recs]
    if not values or any(v is None for v in values):
        return None
    steps = sum(len(v) for v in values)
    return sum(map(sum, values)) / steps if steps else None


def _by_source_per_step(recs: Sequence[dict], field: str) -> dict[str, float] | None:
    """Per source: pooled per-step mean of ``field`` (a name -> per-step list map); None unless all record it."""
    values = [_choice(r).get(field) for r in recs]
    if not values or any(v is None for v in values):
        return None
    steps = sum(len(next(iter(v.values()), [])) for v in values)
    names = sorted({n for v in values for n in v})
    return {n: sum(sum(v.get(n, [])) for v in values) / steps for n in names} if steps else None


def _group_stats(recs: Sequence[dict], base: Sequence[dict] | None, compare_text: bool = True) -> dict:
    speeds = [answer_speed(r) for r in recs]
    tps = sum(speeds) / len(speeds)
    mat, mat_from = _mat(recs)
    out: dict = {
        "tokens_per_s": tps,
        "speedup": None,
        "mat": mat,
        "mat_from": mat_from,
        "identical_rate": None,
        "jacobi_per_step": _source_per_step(recs, "jacobi_accepted"),
        "retrieval_per_step": _source_per_step(recs, "retrieval_accepted"),
        "drafted_per_step": _by_source_per_step(recs, "accepted_by_source"),
        "nodes_per_step": _by_source_per_step(recs, "nodes_by_source"),
        "sole_per_step": _by_source_per_step(recs, "sole_by_source"),  # drafts no other source drafted
        "answers": len(recs),
        "new_tokens": sum(sum(_choice(r)["new_tokens"]) for r in recs),
        "wall_time": sum(sum(_choice(r)["wall_time"]) for r in recs),
    }
    if base is not None:
        base_speeds = [answer_speed(r) for r in base]
        base_tps = sum(base_speeds) / len(base_speeds)
        out["speedup"] = tps / base_tps if base_tps > 0 else None
        if compare_text:
            same = sum(_choice(r)["turns"] == _choice(b)["turns"] for r, b in zip(recs, base, strict=True))
            out["identical_rate"] = same / len(recs)
    return out


def summarize(answers: Mapping[str, Sequence[dict]], baseline: str = BASELINE, meta: Mapping | None = None) -> dict:
    """``{"methods": {m: {"overall": {...}, "categories": {c: {...}}}}, "questions": n, ...meta}``. With
    ``meta["sampling"]`` set, methods with their own random stream get no identical_rate."""
    if not answers:
        raise InputError("no answers to summarize")
    by_method = {m: {r["question_id"]: r for r in recs} for m, recs in answers.items()}
    first = next(iter(answers.values()))
    common = [r["question_id"] for r in first if all(r["question_id"] in d for d in by_method.values())]
    categories = list(dict.fromkeys(by_method[next(iter(answers))][q]["category"] for q in common))
    has_base = baseline in by_method
    methods: dict[str, dict] = {}
    sampled = bool((meta or {}).get("sampling"))
    if common:
        for m, recs in by_method.items():
            def pick(qids, recs=recs):
                return [recs[q] for q in qids]

            base = by_method[baseline] if has_base else None
            text = not (sampled and m in OWN_RANDOM_STREAM)
            entry = {"overall": _group_stats(pick(common), pick(common, base) if base else None, text),
                     "categories": {}}
            for cat in categories:
                qids = [q for q in common if recs[q]["category"] == cat]
                entry["categories"][cat] = _group_stats(pick(qids), pick(qids, base) if base else None, text)
            methods[m] = entry
    summary = dict(meta or {})
    summary.update({"baseline": baseline if has_base else None, "questions": len(common),
                    "categories": categories, "methods": methods})
    if sampled:
        summary["identical_not_comparable"] = not_comparable(summary)
    return summary


def summarize_dir(out_dir: str | os.PathLike, methods: Sequence[str], baseline: str = BASELINE,
                  meta: Mapping | None = None, question_ids: Sequence | None = None) -> dict:
    """The summary of ``methods``' answers in ``out_dir``; with ``question_ids``, of those questions only (a
    run's selection: the folder may hold answers to questions an earlier run selected)."""
    answers = {m: read_answers(answers_path(out_dir, m)) for m in methods}
    if question_ids is not None:
        wanted = {qid_key(q) for q in question_ids}
        answers = {m: [r for r in recs if qid_key(r.get("question_id")) in wanted] for m, recs in answers.items()}
    return summarize(answers, baseline, meta)


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def overall_table(summary: Mapping) -> str:
    base = summary.get("baseline") or BASELINE
    lines = [f"| method | tokens/s | speedup | MAT | identical to {base} | accepted drafts per step by source "
             "(nodes per step; of the drafts, those no other source drafted) |", "|---|---:|---:|---:|---:|---|"]
    own_stream = not_comparable(summary)
    for m, e in summary["methods"].items():
        o = e["overall"]
        sources = _sources_cell(o)
        same = ("– (own random stream)" if m in own_stream else
                _fmt(None if o['identical_rate'] is None else 100 * o['identical_rate'], '.0f', '%'))
        lines.append(
            f"| {m} | {_fmt(o['tokens_per_s'], '.1f')} | {_fmt(o['speedup'], '.2f', 'x')} | "
            f"{_fmt(o['mat'], '.2f')} | {same} | {sources} |"
        )
    return "\n".join(lines)


def _sources_cell(o: Mapping) -> str:
    drafted, nodes, sole = o.get("drafted_per_step"), o.get("nodes_per_step") or {}, o.get("sole_per_step")
    if drafted:
        alone = (lambda n: f"; {sole.get(n, 0):.2f} alone") if sole else (lambda n: "")  # older answers: no sole
        return ", ".join(f"{n} {v:.2f} ({nodes.get(n, 0):.1f}{alone(n)})" for n, v in drafted.items()
                         if v or nodes.get(n))
    j, r = o.get("jacobi_per_step"), o.get("retrieval_per_step")  # answers from before per-source maps
    return "–" if j is None or r is None else f"jacobi {j:.2f}, retrieval {r:.2f}"


def category_table(summary: Mapping) -> str:
    methods = list(summary["methods"])
    head = "| category | n | " + " | ".join(methods) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(methods)]
    for cat in summary["categories"]:
        cells = []
        for m in methods:
            s = summary["methods"][m]["categories"][cat]
            cells.append(f"{_fmt(s['speedup'], '.2f', 'x')} ({s['tokens_per_s']:.1f} t/s, MAT {_fmt(s['mat'], '.2f')})")
        n = summary["methods"][methods[0]]["categories"][cat]["answers"]
        lines.append(f"| {cat} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(summary: Mapping) -> str:
    title = f"# msn bench: {summary.get('model', '?')} ({summary.get('dtype', '?')}, {summary.get('device', '?')})"
    info = [f"- decoding: {sampling_text(summary.get('sampling'))}"] if "sampling" in summary else []
    for key, label in (("command", "command"), ("questions", "questions"), ("max_new_tokens", "max new tokens"),
                       ("tree", "tree"), ("device_name", "device"), ("torch_threads", "torch threads"),
                       ("started", "started"), ("finished", "finished"),
                       ("load_average_start", "1-min load average at start"),
                       ("load_average_end", "1-min load average at end"), ("status", "status")):
        if summary.get(key) is not None:
            value = f"`{summary[key]}`" if key == "command" else summary[key]
            info.append(f"- {label}: {value}")
    parts = [title, "", *info, "", "## Overall", "", overall_table(summary), "",
             "## Per category: speedup vs " + str(summary.get("baseline") or BASELINE) + " (tokens/s, MAT)", "",
             category_table(summary), "",
             "Speed = new tokens / wall time (prefill included) per answer, averaged over answers; "
             "MAT = mean accepted tokens per decoding step, bonus token included (Spec-Bench conventions); "
             "accepted drafts per step by source = accepted draft tokens per step each source drafted (a token "
             "several sources drafted counts for each), in brackets that source's draft nodes per step.", ""]
    if summary.get("sampling"):
        parts += [_sampling_note(summary), ""]
    approx = [m for m, e in summary["methods"].items() if e["overall"].get("mat_from") == "steps"]
    if approx:
        parts += [f"MAT of {', '.join(approx)}: new tokens / forward passes (its answer files record no "
                  "per-step accept lengths), an approximation.", ""]
    return "\n".join(parts)


def _sampling_note(summary: Mapping) -> str:
    base = summary.get("baseline") or BASELINE
    note = (f"Sampled: each turn of a question has its own seed, derived from the run's seed, the same for every "
            f"method; msn's methods sample with one coupled noise per position, so for a seed each should give "
            f"{base}'s text (the identical column; exactly so in fp32, while in bf16/fp16 a tree forward can "
            f"move a near-tie, as in greedy decoding).")
    own = not_comparable(summary)
    if own:
        note += (f" {', '.join(own)} samples through transformers with its own random stream: its text is another "
                 f"sample of the same distribution, so its identical share is not reported.")
    return note


def write_summary(out_dir: str | os.PathLike, summary: Mapping) -> None:
    from msn.outputs import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", to_markdown(summary))


def print_report(summary: dict, out: Path, file=None) -> None:
    """What ``msn bench`` and ``msn demo`` print at the end: the tables, then where the report is."""
    file = file or sys.stdout
    print(f"\n{summary.get('model')} ({summary.get('dtype')}, {summary.get('device')}), "
          f"{summary['questions']} questions, {sampling_text(summary.get('sampling'))}, "
          f"status: {summary.get('status')}\n", file=file)
    print(overall_table(summary), file=file)
    if summary.get("sampling") and not_comparable(summary):
        print(f"({', '.join(not_comparable(summary))}: sampled by transformers with its own random stream, so its "
              "text is not expected to equal ar's)", file=file)
    print("\nper category: speedup vs ar (tokens/s, MAT)\n", file=file)
    print(category_table(summary), file=file)
    print(f"\nreport: {out / 'summary.md'}  (summary.json, speedup.png, answers/*.jsonl)", file=file)
