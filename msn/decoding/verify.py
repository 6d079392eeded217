"""Acceptance rules: which of the verified tree's nodes the model agrees with.

Greedy: walk down from the root, each time to the child whose token is the model's argmax there. Identical
siblings are merged before the forward, so at most one child can match and the walk is unique. The step
commits the accepted nodes plus the bonus token (the model's own choice after the last accepted node).
A sampling rule (method.md §8) replaces this function and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Acceptance:
    accepted: list[int]  # accepted node indices along the path, root excluded
    bonus: int  # the model's own next token after the last accepted node


BLOCK = 256  # columns per block of the block-wise top-k and argmax below
block_rows = True  # switch (A/B): False = torch's own topk / argmax over the whole row


def _blocked(logits: torch.Tensor, k: int) -> bool:
    """Worth going through blocks: a CPU (torch's CUDA top-k is fast already) and a vocabulary many blocks wide."""
    return block_rows and logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[-1] >= 16 * k * BLOCK


def _as_blocks(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[n, blocks, BLOCK] over the columns that fill whole blocks (a view for a row-contiguous tensor), and where
    the tail that fills none starts."""
    n, vocab = logits.shape
    end = vocab // BLOCK * BLOCK
    return logits[:, :end].reshape(n, end // BLOCK, BLOCK), end


def _best_blocks(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k blocks with the highest maxima, as candidate values [n, k * BLOCK (+ tail)] and their columns."""
    (n, vocab), (body, end) = logits.shape, _as_blocks(logits)
    best = body.amax(-1).topk(k, dim=-1).indices.sort(-1).values  # block order kept: earlier columns first
    cand = body.gather(1, best[:, :, None].expand(n, k, BLOCK)).view(n, k * BLOCK)
    cols = (best[:, :, None] * BLOCK + torch.arange(BLOCK, device=logits.device)).view(n, k * BLOCK)
    if end < vocab:  # the tail that fills no block is always a candidate
        tail = torch.arange(end, vocab, device=logits.device).expand(n, -1)
        cand, cols = torch.cat([cand, logits[:, end:]], 1), torch.cat([cols, tail], 1)
    return cand, cols


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits.topk(k, dim=-1)``'s values exactly, 3-4x faster on a CPU for a wide vocabulary: torch's CPU topk
    and argmax read ~4 GB/s (60 µs per 49k-wide row), its max over blocks is vectorised. Any value among a row's
    k best lies in a block whose maximum is among the k best block maxima (fewer than k values exceed the k-th),
    so the top-k of those k blocks is the row's. Among equal values the ids may differ from torch's (its order
    there is unspecified too); :func:`argmax_rows` settles a tie at the top exactly."""
    if not _blocked(logits, k):
        return logits.topk(k, dim=-1)
    cand, cols = _best_blocks(logits, k)
    vals, at = cand.topk(k, dim=-1)
    return vals, cols.gather(1, at)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` exactly (the first index of the maximum), through the block maxima where faster:
    the first block whose maximum is the row's holds the row's first maximum."""
    if not _blocked(logits, 1):
        return logits.argmax(-1)
    body, end = _as_blocks(logits)
    first = body.amax(-1).argmax(-1)  # argmax: the first block on ties
    inside = body[torch.arange(body.shape[0], device=logits.device), first].argmax(-1)
    best = first * BLOCK + inside
    if end < logits.shape[-1]:  # a tail that fills no block wins only when strictly greater (argmax: NaN is largest)
        tail = logits[:, end:]
        tail_best = tail.argmax(-1)
        t, b = tail.gather(1, tail_best[:, None])[:, 0], logits.gather(1, best[:, None])[:, 0]
        later = (t > b) | (t.isnan() & ~b.isnan())
        best = torch.where(later, tail_best + end, best)
    return best


def argmax_rows(logits: torch.Tensor, top_vals: torch.Tensor | None = None,
                top_ids: torch.Tensor | None = None) -> list[int]:
    """Argmax per row, exactly as ``logits.argmax(-1)`` (first index on ties). With a top-k already
    computed we reuse it and fall back to argmax only on rows whose best two values tie."""
    if top_ids is None or top_ids.shape[-1] < 2:
        return _argmax(logits).tolist()
    pred = top_ids[:, 0].clone()
    ties = (top_vals[:, 0] == top_vals[:, 1]).nonzero().flatten()
    if ties.numel():
        pred[ties] = _argmax(logits[ties])
    return pred.tolist()


def greedy_accept(children: Sequence[dict[int, int]], predicted: Sequence[int]) -> Acceptance:
    """``children[i]`` maps token -> child node of node i; ``predicted[i]`` is the argmax after node i."""
    accepted, node = [], 0
    while (child := children[node].get(predicted[node])) is not None:
        accepted.append(child)
        node = child
    return Acceptance(accepted, predicted[node])
