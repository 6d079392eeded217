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


def argmax_rows(logits: torch.Tensor, top_vals: torch.Tensor | None = None,
                top_ids: torch.Tensor | None = None) -> list[int]:
    """Argmax per row, exactly as ``logits.argmax(-1)`` (first index on ties). With a top-k already
    computed we reuse it and fall back to argmax only on rows whose best two values tie."""
    if top_ids is None or top_ids.shape[-1] < 2:
        return logits.argmax(-1).tolist()
    pred = top_ids[:, 0].clone()
    ties = (top_vals[:, 0] == top_vals[:, 1]).nonzero().flatten()
    if ties.numel():
        pred[ties] = logits[ties].argmax(-1)
    return pred.tolist()


def greedy_accept(children: Sequence[dict[int, int]], predicted: Sequence[int]) -> Acceptance:
    """``children[i]`` maps token -> child node of node i; ``predicted[i]`` is the argmax after node i."""
    accepted, node = [], 0
    while (child := children[node].get(predicted[node])) is not None:
        accepted.append(child)
        node = child
    return Acceptance(accepted, predicted[node])
