"""Greedy verification: the longest path whose every token is what the model itself would have chosen."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Acceptance:
    path: int  # row of ``paths`` that won
    accepted: torch.Tensor  # indices (into the step's tokens) of accepted draft nodes, root excluded
    bonus: int  # the model's own next token after the last accepted node


def greedy_accept(tokens: torch.Tensor, predicted: torch.Tensor, paths: torch.Tensor) -> Acceptance:
    """``predicted[i]`` is the argmax after node i. A node is accepted when its token equals the argmax of
    its parent and its parent is accepted. Ties between equally long paths go to the first path."""
    node, parent = paths[:, 1:], paths[:, :-1]
    matches = (node >= 0) & (tokens[node.clamp(min=0)] == predicted[parent.clamp(min=0)])
    lengths = matches.long().cumprod(dim=1).sum(dim=1)
    best = int(lengths.argmax())
    n = int(lengths[best])
    accepted = paths[best, 1 : n + 1]
    bonus = int(predicted[paths[best, n]])
    return Acceptance(best, accepted, bonus)
