"""Benchmark questions in Spec-Bench's format, read strictly: a bad line is named, never skipped.

Spec-Bench (https://github.com/hemingkx/Spec-Bench) keeps its 480 questions in
``data/spec_bench/question.jsonl``: one JSON object per line with ``question_id``, ``category`` and
``turns`` (a list of user messages; MT-bench questions have two).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from msn.errors import InputError
from msn.jsonl import iter_jsonl

DEMO_PROMPTS = Path(__file__).with_name("prompts.jsonl")  # msn demo's twelve prompts, in this format
SPEC_BENCH_URL = "https://github.com/hemingkx/Spec-Bench/blob/main/data/spec_bench/question.jsonl"


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    where: str | None = field(default=None, compare=False)  # ``file:line``, for messages naming the question


def qid_key(question_id) -> str:
    """How answers are matched to questions: by the id's JSON, so 1 and "1" are two questions."""
    return json.dumps(question_id)


def parse_question(obj: object, where: str) -> Question:
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object with question_id, category, turns", where=where)
    for key in ("question_id", "category", "turns"):
        if key not in obj:
            raise InputError("missing required field", where=where, field=key)
    qid, category, turns = obj["question_id"], obj["category"], obj["turns"]
    if isinstance(qid, bool) or not isinstance(qid, int | str):
        raise InputError("must be an integer or a string", where=where, field="question_id")
    if not isinstance(category, str) or not category:
        raise InputError("must be a non-empty string", where=where, field="category")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise InputError("must be a non-empty list of non-empty strings", where=where, field="turns")
    return Question(qid, category, tuple(turns), where)


def read_questions(lines: Iterable[str], source: str) -> list[Question]:
    """Parse JSONL lines; errors name ``source:line``. Blank lines are allowed, duplicate ids are not."""
    out: list[Question] = []
    seen: dict[int | str, int] = {}
    for obj, where, lineno, _ in iter_jsonl(lines, source):
        q = parse_question(obj, where)
        if q.question_id in seen:
            raise InputError(
                f"duplicate question_id {q.question_id!r} (first on line {seen[q.question_id]})", where=where
            )
        seen[q.question_id] = lineno
        out.append(q)
    if not out:
        raise InputError("no questions in file", where=source)
    return out


def load_questions(path: str | os.PathLike) -> list[Question]:
    p = Path(path)
    if not p.is_file():
        raise InputError(
            f"question file not found; Spec-Bench's questions are at {SPEC_BENCH_URL} "
            "(download it and pass --questions PATH)",
            where=str(p),
        )
    with open(p, encoding="utf-8") as f:
        return read_questions(f, str(p))


def select(
    questions: Sequence[Question],
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    per_category: int | None = None,
) -> list[Question]:
    """Filter by category, then keep the first ``per_category`` of each and/or the first ``limit`` overall.
    File order is kept, so a run is reproducible and comparable with Spec-Bench's."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if per_category is not None and per_category < 1:
        raise InputError(f"--per-category must be >= 1, got {per_category}")
    known = list(dict.fromkeys(q.category for q in questions))
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise InputError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"the question file has: {', '.join(known)}")
        wanted = set(categories)
        questions = [q for q in questions if q.category in wanted]
    if per_category is not None:
        counts: dict[str, int] = {}
        kept = []
        for q in questions:
            counts[q.category] = counts.get(q.category, 0) + 1
            if counts[q.category] <= per_category:
                kept.append(q)
        questions = kept
    out = list(questions)
    return out[:limit] if limit is not None else out


def demo_questions(limit: int | None = None) -> list[Question]:
    """The built-in prompts of ``msn demo`` (and ``msn tune-tree``): Spec-Bench's kinds plus code."""
    return select(load_questions(DEMO_PROMPTS), limit=limit)
