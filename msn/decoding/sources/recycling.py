"""Token Recycling (Luo et al. 2024, arXiv 2408.08696): the model's past predictions, kept per token id.

Every verified forward computes, for each input token, the model's top-k next tokens; instead of throwing
them away, an adjacency table M[token] = those k tokens (and their probabilities) is overwritten with them.
Drafts follow the table from the root, best-first by the product of recorded probabilities. The table lives
as long as the model's decoder state, so it carries over between requests, training-free.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from msn.decoding.sources.base import Budget, Draft, DraftSource, VerifiedStep
from msn.decoding.verify import top_k_rows

K = 8  # successors kept per token id (the paper's k)
MAX_NODES, MAX_DEPTH = 48, 6  # what it proposes in auto mode; the engine picks the nodes worth verifying
PROMPT_ROWS = 64  # prefill rows recorded at most: the LM head over each costs ~1/3 of a prompt token's forward


class RecyclingSource(DraftSource):
    name = "recycling"
    top_k_needed = K
    per_request = False  # the table is what earlier steps and requests taught: every request reads and adds to it

    def __init__(self, k: int = K, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH,
                 prompt_rows: int = PROMPT_ROWS):
        self.k, self.max_nodes, self.max_depth = k, max_nodes, max_depth
        self.max_prompt_rows = prompt_rows
        self.next_ids: np.ndarray | None = None  # [V, k] int64, -1 = nothing recorded yet
        self.next_probs: np.ndarray | None = None  # [V, k] float32

    def _record(self, tokens: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> None:
        if self.next_ids is None:
            return
        rows = tokens.cpu().numpy()
        keep = rows < self.next_ids.shape[0]
        self.next_ids[rows[keep]] = ids[:, : self.k].cpu().numpy()[keep]
        self.next_probs[rows[keep]] = probs[:, : self.k].cpu().float().numpy()[keep]

    def _ensure(self, vocab: int) -> None:
        if self.next_ids is None or self.next_ids.shape[0] < vocab:
            self.next_ids = np.full((vocab, self.k), -1, dtype=np.int64)
            self.next_probs = np.zeros((vocab, self.k), dtype=np.float32)

    def prompt_rows(self, prompt: torch.Tensor) -> torch.Tensor | None:
        """The last occurrence of each token id (an earlier one's row would be overwritten anyway), the latest
        ``max_prompt_rows`` of them: a long prompt has hundreds of distinct ids, and their LM-head rows would
        add ~15% to its prefill, while copying from it is what retrieval drafts do better."""
        ids = prompt.cpu().numpy()[::-1]
        if not len(ids) or self.max_prompt_rows <= 0:
            return None
        _, first_from_end = np.unique(ids, return_index=True)
        latest = np.sort(first_from_end)[: self.max_prompt_rows]
        return torch.from_numpy(np.sort(len(ids) - 1 - latest)).to(prompt.device)

    def begin(self, prompt, prefill_logits, generator) -> None:
        if prefill_logits is not None and prefill_logits.logits.shape[0]:
            logits = prefill_logits.logits
            self._ensure(logits.shape[-1])
            vals, ids = top_k_rows(logits, min(self.k, logits.shape[-1]))
            self._record(prompt[prefill_logits.rows], ids, vals.softmax(-1))

    def propose(self, committed: torch.Tensor, budget: Budget) -> Draft:
        draft = Draft()
        if self.next_ids is None:
            return draft
        limit = budget.shape if budget.shape is not None else self.max_nodes
        if budget.shape is None and budget.max_nodes is not None:
            limit = min(limit, budget.max_nodes)
        max_depth = min(self.max_depth, budget.max_depth)
        root = int(committed[-1])
        if limit <= 0 or max_depth <= 0 or root >= self.next_ids.shape[0]:
            return draft
        # Best-first over paths: the heap holds (-path score, tie, parent node, token, edge prob, depth).
        heap: list[tuple[float, int, int, int, float, int]] = []
        tie = 0

        def push_children(parent: int, token: int, path: float, depth: int) -> None:
            nonlocal tie
            for t, p in zip(self.next_ids[token].tolist(), self.next_probs[token].tolist(), strict=True):
                if t >= 0:
                    heapq.heappush(heap, (-path * p, tie, parent, t, p, depth))
                    tie += 1

        push_children(-1, root, 1.0, 1)
        while heap and len(draft) < limit:
            neg, _, parent, tok, p, depth = heapq.heappop(heap)
            node = draft.add(parent, tok, p, (min(depth, 4), min(int(p * 10), 9)), ("recycling", len(draft)))
            if depth < max_depth:
                push_children(node, tok, -neg, depth + 1)
        return draft

    def observe(self, step: VerifiedStep) -> None:
        self._ensure(step.logits.shape[-1])
        self._record(torch.tensor(step.tokens), step.top_ids, step.top_probs)
