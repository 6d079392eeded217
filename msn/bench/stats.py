"""Paired comparison of two things measured on the same questions (two models, two methods).

Each model writes its own answers, so a mean over questions mixes "faster decoding" with "easier text";
pairing by question and giving a bootstrap interval says whether a difference is larger than that
question-to-question noise. Shared by the reproduce report and benchmarks/paired_models.py.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from msn.outputs import atomic_write_text


def tokens_per_s(choice: dict) -> float:
    """New tokens / wall seconds over all turns of one answer's choice."""
    return sum(choice["new_tokens"]) / sum(choice["wall_time"])


def tokens_per_step(choice: dict) -> float:
    """New tokens / decoding steps (forwards) over all turns: the answer's MAT."""
    return sum(choice["new_tokens"]) / sum(choice["decoding_steps"])


def drafted_per_step(source: str, sole: bool = False) -> Callable[[dict], float]:
    """Accepted draft tokens per step that ``source`` drafted, over all turns of a tree method's answer: the
    share of MAT one draft source earns (a token two sources drafted counts for each); ``sole``: only tokens
    no other source drafted, what the source adds over the others. Answers from before the per-source maps
    carry ``jacobi_accepted`` / ``retrieval_accepted`` only; those are read for the shared credit."""
    key = "sole_by_source" if sole else "accepted_by_source"

    def value(choice: dict) -> float:
        legacy = key not in choice and not sole
        steps = choice[f"{source}_accepted"] if legacy else choice[key][source]
        return sum(steps) / len(steps)
    return value


def answer_choices(path: Path) -> Iterator[tuple[str, dict]]:
    """(question_id, first choice) per line of one Spec-Bench answer JSONL; a torn or foreign line is
    skipped, a missing file gives nothing."""
    try:
        text = path.read_text()
    except OSError:
        return
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            qid, choice = str(rec["question_id"]), rec["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        yield qid, choice


def per_question(path: Path, value: Callable[[dict], float]) -> dict[str, float]:
    """question_id -> ``value`` of its answer's first choice; an answer without the fields ``value`` reads
    (an older bench) is skipped."""
    out: dict[str, float] = {}
    for qid, choice in answer_choices(path):
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, ZeroDivisionError):
            out[qid] = value(choice)
    return out


def paired(a: dict[str, float], b: dict[str, float], resamples: int = 2000) -> dict[str, Any] | None:
    """Per-question differences a - b on the questions both have: mean, 95% bootstrap interval (seeded, so a
    report is reproducible), wins/losses, and the ratio of the sums; None when they share no question."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    d = [a[k] - b[k] for k in keys]
    rng = random.Random(0)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(resamples))
    total_b = sum(b[k] for k in keys)
    return {"n": len(d), "mean": sum(d) / len(d),
            "ci95": (means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]),
            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d),
            "ratio": sum(a[k] for k in keys) / total_b if total_b else None}


def append_answers(files: Mapping[Any, Path], records: Mapping[Any, dict]) -> None:
    """One question's answer records, each appended to its file; called once every side answered it, so a
    resumed run skips whole questions and the sides stay paired."""
    for key, rec in records.items():
        with open(files[key], "a") as f:
            f.write(json.dumps(rec) + "\n")


def write_report(out: Path, summary: dict, table: str) -> None:
    """summary.json and summary.md (the table), written atomically; the table is printed too."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", table + "\n")
    print(table)
