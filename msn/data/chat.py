"""Chat -> tokens: a conversation rendered turn by turn and tokenized piece by piece, so we know exactly which
tokens belong to assistant turns: those are the labels (everything else is ``IGNORE``) and the only
positions noise may touch. Then whole datasets of such samples, for ``Trainer`` and for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from msn.data.builtin import BUILTIN_DATASETS, iter_records
from msn.errors import InputError
from msn.prompting import chat_text

IGNORE = -100  # the label of a position that is not a target


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
    samples, sources, dropped, too_long = [], [], 0, 0
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
            too_long += 1
            continue
        samples.append(sample)
        sources.append(rec.where)
    if not samples:  # then every record read was dropped
        raise InputError(_no_samples(spec, split, dropped, too_long, max_length), where=str(spec))
    return TokenizedDataset(samples, str(spec), True, dropped, sources)


def _no_samples(spec, split: str, seen: int, too_long: int, max_length: int | None) -> str:
    """Why ``spec`` gave no sample: an empty file, a split no record falls in, or records cut to no target --
    only the last is about ``max_length``."""
    if seen == 0 and (split == "all" or next(iter(iter_records(spec, "all")), None) is None):
        return "no usable samples: the data file is empty (no records); add one JSON record per line"
    if seen == 0:
        return (f"no usable samples: none of its records falls in the {split} split (chosen by a hash of each "
                "record); give more records")
    within = f"within max_length={max_length}" if max_length is not None else "to train on"
    if too_long == seen:
        fix = "; raise --max-length or shorten the prompts" if max_length is not None else ""
        return f"no usable samples in the {split} split: all {seen} records have no assistant token {within}{fix}"
    return (f"no usable samples in the {split} split: {seen - too_long} of {seen} records were unusable, the "
            f"other {too_long} have no assistant token {within}")


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
