"""Line-numbered JSONL reading: every bad line is reported as ``file:line``, never skipped."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from msn.errors import InputError


def iter_jsonl(lines: Iterable[str], source: str) -> Iterator[tuple[Any, str, int, str]]:
    """Yield ``(object, "source:line", line_number, stripped_line)`` for each non-blank line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg} at column {e.colno}", where=where) from None
        yield obj, where, lineno, line.strip()
