"""Conversation records: every supported JSON shape normalised to chat messages, JSONL read strictly.

A record is ``{"messages": [{"role", "content"}, ...]}``, ShareGPT's ``{"conversations": [{"from",
"value"}, ...]}`` or ``{"prompt", "response"}``; a bad line raises ``InputError`` naming ``file:line`` and the
field at fault.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msn.errors import InputError
from msn.jsonl import iter_jsonl

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


@dataclass
class Record:
    """One conversation, normalised to ``[{"role", "content"}]``. ``key`` fixes its train/held-out split."""

    messages: list[dict[str, str]]
    where: str
    key: str


def normalize_record(obj: Any, where: str, strict: bool = True) -> list[dict[str, str]] | None:
    """Turn one JSON record of any supported shape into chat messages; ``strict`` raises, else returns None."""

    def bad(msg: str, fld: str | None = None):
        if strict:
            raise InputError(msg, where=where, field=fld)
        return None

    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        turns, role_key, text_key, fld = obj["messages"], "role", "content", "messages"
    elif "conversations" in obj:
        turns, role_key, text_key, fld = obj["conversations"], "from", "value", "conversations"
    elif "prompt" in obj and "response" in obj:
        p, r = obj["prompt"], obj["response"]
        for name, v in (("prompt", p), ("response", r)):
            if not isinstance(v, str):
                return bad(f"expected a string, got {type(v).__name__}", name)
        if not r:
            return bad("empty response: nothing to train on", "response")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
    else:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        return bad(
            f"unknown record shape (keys: {keys}); expected 'messages', 'conversations' or 'prompt'+'response'"
        )
    if not isinstance(turns, list):
        return bad(f"expected a list of turns, got {type(turns).__name__}", fld)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            return bad(f"turn {i} needs {role_key!r} and {text_key!r}", f"{fld}[{i}]")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            return bad(f"turn {i} has unknown role {turn[role_key]!r}", f"{fld}[{i}].{role_key}")
        if not isinstance(turn[text_key], str):
            return bad(f"turn {i} content is not a string", f"{fld}[{i}].{text_key}")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return bad("conversation has no assistant turn", fld)
    return messages


def read_jsonl(path: str | os.PathLike) -> Iterator[Record]:
    """Yield the records of a JSONL file; any bad line raises ``InputError`` naming ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise InputError("data file not found" if not p.exists() else "not a file", where=str(p))
    with open(p, encoding="utf-8") as f:
        try:
            for obj, where, _, raw in iter_jsonl(f, str(p)):
                yield Record(normalize_record(obj, where), where, raw)
        except UnicodeDecodeError as e:
            raise InputError(f"not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as UTF-8 JSONL",
                             where=str(p)) from None
