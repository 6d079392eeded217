"""Where draft tokens come from: the Jacobi candidate table and prompt-lookup retrieval.

Drafters only propose; verification decides. So a bad draft costs speed, never correctness.
"""

from __future__ import annotations

import torch


class JacobiTable:
    """Top-K guesses per depth. Fresh guesses come from the logits at the rejected positions of the last
    step's best path: their inputs were wrong, so a denoising (MSN) model predicts further ahead there.
    Depths with no fresh logits get "padding noise": random tokens from the committed ids."""

    def __init__(self, depth: int, top_k: int, generator: torch.Generator):
        self.depth, self.top_k, self.generator = depth, top_k, generator
        self.table = torch.zeros(depth, top_k, dtype=torch.long)

    def _noise(self, committed: torch.Tensor, rows: int) -> torch.Tensor:
        pick = torch.randint(0, committed.numel(), (rows, self.top_k), generator=self.generator)
        return committed[pick.to(committed.device)]

    def reset(self, prompt: torch.Tensor) -> None:
        """Initial guesses: random tokens from the prompt (official)."""
        self.table = self._noise(prompt, self.depth)

    def update(self, rejected_logits: torch.Tensor, committed: torch.Tensor) -> None:
        """``rejected_logits`` [r, V]: logits at the best path's rejected nodes, in depth order."""
        fresh = min(rejected_logits.shape[0], self.depth)
        parts = []
        if fresh:
            parts.append(rejected_logits[:fresh].topk(self.top_k, dim=-1).indices)
        if fresh < self.depth:
            parts.append(self._noise(committed, self.depth - fresh))
        self.table = torch.cat(parts) if len(parts) > 1 else parts[0]


class RetrievalIndex:
    """Prompt lookup as an incremental n-gram index: each step costs O(new tokens), not a rescan.

    For each n-gram (n = 1..max_ngram) we remember its earliest occurrence that has at least one following
    token. The draft is what followed the longest suffix of the text that occurred before (earliest wins).
    """

    def __init__(self, depth: int, max_ngram: int = 3):
        self.depth, self.max_ngram = depth, max_ngram
        self.ids: list[int] = []
        self.first: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it

    def extend(self, new_ids: list[int]) -> None:
        old = len(self.ids)
        self.ids.extend(new_ids)
        # Continuations starting at positions old..len-1 now exist (the last token has none yet).
        for e in range(max(old, 1), len(self.ids)):
            for n in range(1, min(self.max_ngram, e) + 1):
                self.first.setdefault(tuple(self.ids[e - n : e]), e)

    def draft(self) -> list[int]:
        ids = self.ids
        for n in range(min(self.max_ngram, len(ids)), 0, -1):
            e = self.first.get(tuple(ids[-n:]))
            if e is not None and e < len(ids):
                return ids[e : e + self.depth]
        return []
