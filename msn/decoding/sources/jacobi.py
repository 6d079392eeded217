"""Jacobi drafts: the model's own guesses further ahead, read from positions whose inputs were wrong.

After a step, the nodes below the last accepted one were rejected: their input tokens were wrong, so their
logits are predictions made from a noisy context, one position further ahead than the root's next token.
A denoising (MSN-trained) model makes exactly those predictions well. Their top-K per depth form the table
for the next step; depths with no fresh logits get "padding noise" (random committed ids), as in the paper.
Node (r1, .., rd) of a template is "rank r1 at depth 1, then rank r2 at depth 2, ..." (Medusa style).
"""

from __future__ import annotations

import torch

from msn.decoding.sources.base import Budget, Draft, DraftSource, VerifiedStep

DEPTH, TOP_K = 5, 10  # official table size
NOISE = "noise"  # calibration bucket of padding-noise nodes


class JacobiSource(DraftSource):
    name = "jacobi"

    def __init__(self, depth: int = DEPTH, top_k: int = TOP_K, shape: tuple[tuple[int, ...], ...] | None = None):
        from msn.decoding.tree import MC_SIM_7B_63

        self.depth, self.top_k = depth, top_k
        self.auto_shape = shape or tuple(p for p in MC_SIM_7B_63 if len(p) <= depth and max(p) < top_k)
        self.table = torch.zeros(depth, top_k, dtype=torch.long)
        self.probs = torch.zeros(depth, top_k)
        self.generator: torch.Generator | None = None

    @property
    def top_k_needed(self) -> int:
        return self.top_k

    def configure(self, shape: tuple[tuple[int, ...], ...] | None) -> None:
        """Size the table to a static template's rank paths (None: the official D x K for the auto tree)."""
        if shape is None:
            self.depth, self.top_k = DEPTH, TOP_K
        else:
            self.depth = max((len(p) for p in shape), default=0)
            self.top_k = max((r for p in shape for r in p), default=-1) + 1

    def _noise(self, committed: torch.Tensor, rows: int) -> torch.Tensor:
        pick = torch.randint(0, committed.numel(), (rows, self.top_k), generator=self.generator)
        return committed.cpu()[pick]

    def begin(self, prompt, prefill_logits, generator) -> None:
        self.generator = generator
        self.table = self._noise(prompt, self.depth)  # initial guesses: random prompt tokens (official)
        self.probs = torch.zeros(self.depth, self.top_k)

    def propose(self, committed: torch.Tensor, budget: Budget) -> Draft:
        # Auto: the official tree's paths, likeliest first, as many as the step is worth proposing.
        shape = budget.shape if budget.shape is not None else self.auto_shape[: budget.max_nodes]
        draft = Draft()
        table, probs = self.table.tolist(), self.probs.tolist()
        index: dict[tuple[int, ...], int] = {}
        for path in shape:  # parents before children (templates are sorted by length)
            d = len(path)
            if d > budget.max_depth or d > self.depth or path[-1] >= self.top_k:
                continue
            parent = index.get(path[:-1], -1) if d > 1 else -1
            if d > 1 and path[:-1] not in index:
                continue
            p = probs[d - 1][path[-1]]
            bucket = (d, NOISE) if p == 0.0 else (d, min(int(p * 10), 9))
            index[path] = draft.add(parent, table[d - 1][path[-1]], p, bucket, ("jacobi", path))
        return draft

    def observe(self, step: VerifiedStep) -> None:
        fresh = min(len(step.rejected), self.depth)
        tables, probs = [], []
        if fresh:
            rows = step.rejected[:fresh]
            ids, p = step.top_ids[rows, : self.top_k].cpu(), step.top_probs[rows, : self.top_k].cpu()
            short = self.top_k - ids.shape[1]
            if short > 0:  # a vocabulary smaller than K has fewer candidates: the rest of the row is padding noise
                ids = torch.cat([ids, self._noise(step.committed, fresh)[:, :short]], dim=1)
                p = torch.cat([p, torch.zeros(fresh, short, dtype=p.dtype)], dim=1)
            tables.append(ids)
            probs.append(p)
        if fresh < self.depth:
            tables.append(self._noise(step.committed, self.depth - fresh))
            probs.append(torch.zeros(self.depth - fresh, self.top_k))
        self.table, self.probs = torch.cat(tables), torch.cat(probs)
