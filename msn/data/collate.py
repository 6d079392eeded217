"""Batches: plain right-padding (:func:`pad_batch`) and fixed-size groups of samples (:func:`iter_batches`),
what evaluation and training both need. The MSN collator, which pads and then noises the target positions of a
training batch, is training's own: :mod:`msn.training.collator`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from msn.data.chat import IGNORE


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def pad_batch(
    features: Sequence[dict[str, Any]], pad_token_id: int = 0, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad samples into clean ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE`` on padding).

    A sample needs ``input_ids``; its targets are its ``labels`` if it has them, else TRL's
    ``assistant_masks`` or ``completion_mask``, else every token."""
    ids = [_as_tensor(f["input_ids"]).long().view(-1) for f in features]
    t = max(len(x) for x in ids)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    b = len(ids)
    input_ids = torch.full((b, t), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
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
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def iter_batches(samples: Iterable[dict[str, torch.Tensor]], batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
