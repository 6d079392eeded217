"""Retrieval drafts (prompt lookup): what followed the longest earlier occurrence of the text's suffix.

An incremental n-gram index over prompt + output, so each step costs O(new tokens), not a rescan. For the
longest suffix (up to ``max_ngram`` ids) that occurred before, up to two chains are drafted: what followed
its earliest occurrence (the official rule) and, when it differs, what followed its most recent one
(repetitive output tends to repeat its latest form). Scores come from the match length; the engine
calibrates them per depth from what was accepted.
"""

from __future__ import annotations

import torch

from msn.decoding.sources.base import Budget, Draft, DraftSource, VerifiedStep

DEPTH = 16
PRIOR = {1: 0.2, 2: 0.4, 3: 0.6}  # edge acceptance before any evidence, by match length


def streak_bucket(accepted: int) -> int:
    """How far the last step's chain was accepted, coarsely: copying a long span makes the next chain likely."""
    return 0 if accepted == 0 else 1 if accepted < 3 else 2 if accepted < 8 else 3


class RetrievalIndex:
    """For each n-gram (n = 1..max_ngram): its earliest and latest occurrence with a following token."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram
        self.ids: list[int] = []
        self.first: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.last: dict[tuple[int, ...], int] = {}

    def extend(self, new_ids: list[int]) -> None:
        old = len(self.ids)
        self.ids.extend(new_ids)
        ids = self.ids
        # Continuations starting at positions old..len-1 now exist (the last token has none yet).
        for e in range(max(old, 1), len(ids)):
            for n in range(1, min(self.max_ngram, e) + 1):
                key = tuple(ids[e - n : e])
                self.first.setdefault(key, e)
                self.last[key] = e

    def match(self) -> tuple[int, int, int]:
        """(match length, earliest continuation start, latest continuation start); (0, -1, -1) if none."""
        ids = self.ids
        for n in range(min(self.max_ngram, len(ids)), 0, -1):
            key = tuple(ids[-n:])
            e = self.first.get(key)
            if e is not None:
                return n, e, self.last[key]
        return 0, -1, -1

    def draft(self, depth: int) -> list[int]:
        """The earliest-match chain (the official rule)."""
        n, e, _ = self.match()
        return self.ids[e : e + depth] if n else []


class RetrievalSource(DraftSource):
    name = "retrieval"

    def __init__(self, depth: int = DEPTH, branches: int = 2, max_ngram: int = 3):
        self.depth, self.branches, self.max_ngram = depth, branches, max_ngram
        self.index = RetrievalIndex(max_ngram)
        self.last_chain = 0  # tokens the chain(s) drafted in the last proposal (before the budget cut)
        self.chains: list[list[int]] = []  # the last proposal's chains
        self.streak = 0  # leading tokens of the last proposal's best chain that were committed

    def begin(self, prompt, prefill_logits, generator) -> None:
        self.index = RetrievalIndex(self.max_ngram)
        self.index.extend(prompt.tolist())
        self.chains, self.streak = [], 0

    def propose(self, committed: torch.Tensor, budget: Budget) -> Draft:
        static = budget.shape is not None
        depth = budget.shape if static else self.depth
        n, first, last = self.index.match()
        draft = Draft()
        self.last_chain, self.chains = 0, []
        if not n:
            return draft
        starts = [first] if static or self.branches == 1 or last == first else [first, last]
        score = PRIOR.get(n, 0.6)
        streak = streak_bucket(self.streak)
        for start in starts:
            found = self.index.ids[start : start + depth]
            chain = found[: max(budget.max_depth, 0)]
            self.chains.append(chain)
            self.last_chain = max(self.last_chain, len(found))
            parent = -1
            for d, tok in enumerate(chain, start=1):
                parent = draft.add(parent, tok, score, (min(d, 8), n, streak), ("retrieval", d) if start == first else None)
        return draft

    def observe(self, step: VerifiedStep) -> None:
        new = step.new_tokens
        self.streak = max((common_prefix(c, new) for c in self.chains), default=0)
        self.index.extend(new)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Leading items of ``a`` equal to ``b``'s (how far a chain was right)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
