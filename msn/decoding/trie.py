"""One step's token tree: every source's candidates merged into a trie, the nodes worth verifying chosen.

Merging identical siblings means at most one child of a node can equal the model's choice, so the correct
nodes form one path and E[accepted drafts] = sum over nodes of P(node and its ancestors are correct) =
sum of q, q = product of calibrated edge estimates along the path. q never grows down a path, so the top n
nodes by q form a tree, and the step verifies the n that maximises (1 + sum of the top n q) / t(n)
(method.md §7); n = 0 is a plain one-token step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from msn.decoding.sources.base import Draft


class Proposer(NamedTuple):
    """Who proposed a trie node: the source, the bucket its estimate is calibrated in, its template tag."""

    source: str
    bucket: Any
    tag: Any


@dataclass
class Trie:
    """All candidates of a step; node 0 is the root. Nodes are created parents first."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    edge: list[float] = field(default_factory=lambda: [1.0])  # calibrated P(accepted | parent accepted)
    proposers: list[list[Proposer]] = field(default_factory=lambda: [[]])

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, parent: int, token: int) -> int:
        node = self.children[parent].get(token)
        if node is None:
            node = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.children.append({})
            self.edge.append(0.0)
            self.proposers.append([])
            self.children[parent][token] = node
        return node

    def path_probs(self) -> list[float]:
        """q per node: the product of edge estimates along its path. Each edge is calibrated on its own, so
        siblings' estimates can sum past 1; capping them (siblings are exclusive events) was measured and
        made trees smaller and decoding slower (docs/results.md §11), so they are left as they are."""
        q = [1.0] * len(self.tokens)
        for i in range(1, len(q)):
            q[i] = q[self.parents[i]] * self.edge[i]
        return q


def merge(root: int, drafts: Mapping[str, Draft], estimate: Callable[[str, Any, float], float]) -> Trie:
    """Merge every source's fragment into one trie; a node proposed twice keeps its best edge estimate."""
    trie = Trie([root])
    for name, draft in drafts.items():
        at = [0] * len(draft)
        for i, (parent, token, score, bucket, tag) in enumerate(
            zip(draft.parents, draft.tokens, draft.scores, draft.buckets, draft.tags, strict=True)
        ):
            node = trie.child(at[parent] if parent >= 0 else 0, token)
            at[i] = node
            trie.edge[node] = max(trie.edge[node], estimate(name, bucket, score))
            trie.proposers[node].append(Proposer(name, bucket, tag))
    return trie


def choose_size(q_sorted: Sequence[float], t: Sequence[float]) -> int:
    """The n maximising (1 + sum of the first n q) / t(n); ``t`` covers n = 0..len(q_sorted) or fewer."""
    best_n, best, total = 0, 1.0 / t[0], 1.0
    for n in range(1, min(len(q_sorted), len(t) - 1) + 1):
        total += q_sorted[n - 1]
        rate = total / t[n]
        if rate > best:
            best_n, best = n, rate
    return best_n


def ranked(trie: Trie) -> tuple[list[int], list[float]]:
    """Draft node ids by path probability, best first (ties: parents, the lower ids, first; a node's q never
    exceeds its parent's, so every prefix of the order is a tree), and q for every trie node."""
    q = trie.path_probs()
    return sorted(range(1, len(trie)), key=lambda i: (-q[i], i)), q


def select(trie: Trie, t: Sequence[float] | None, n: int | None = None) -> tuple[list[int], list[float]]:
    """Kept node ids (sorted, root first) and q for every trie node. ``t`` None: keep every node, or the ``n``
    likeliest when ``n`` is given (a batch sized the trees of all its requests together)."""
    order, q = ranked(trie)
    if t is None and n is None:
        return list(range(len(trie))), q
    if n is None:
        n = choose_size([q[i] for i in order], t)
    return [0, *sorted(order[:n])], q


@dataclass
class StepTree:
    """The verified part of the trie, compacted: node 0 is the root, parents precede children."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    children: list[dict[int, int]]
    q: list[float]
    trie_ids: list[int]  # compact node -> trie node

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors(self, device) -> torch.Tensor:
        """[n, n] bool: node i attends to node j when j is i or an ancestor of i."""
        n = len(self.tokens)
        parent = torch.tensor([max(p, 0) for p in self.parents], device=device)
        anc = torch.eye(n, dtype=torch.bool, device=device)
        rows, cur = torch.arange(n, device=device), torch.arange(n, device=device)
        for _ in range(max(self.depths)):
            cur = parent[cur]
            anc[rows, cur] = True
        return anc

    def likeliest_below(self, node: int) -> list[int]:
        """The most probable continuation below ``node`` (best child by q, repeatedly)."""
        out = []
        while self.children[node]:
            node = max(self.children[node].values(), key=lambda c: self.q[c])
            out.append(node)
        return out


def tree_mask(ancestors: torch.Tensor, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask [1, 1, n, past + n]: 0 where attention is allowed, dtype-min elsewhere.
    (A bool mask is silently wrong on the eager backend; the float one is exact on sdpa and eager.)"""
    n = ancestors.shape[0]
    mask = torch.zeros(1, 1, n, past + n, dtype=dtype, device=ancestors.device)
    mask[0, 0, :, past:].masked_fill_(~ancestors, torch.finfo(dtype).min)
    return mask


def compact(trie: Trie, kept: list[int], q: list[float]) -> StepTree:
    new_id = {old: i for i, old in enumerate(kept)}
    children: list[dict[int, int]] = [{} for _ in kept]
    parents = [-1] * len(kept)
    for i, old in enumerate(kept[1:], start=1):
        p = new_id[trie.parents[old]]
        parents[i] = p
        children[p][trie.tokens[old]] = i
    return StepTree(
        tokens=[trie.tokens[i] for i in kept],
        parents=parents,
        depths=[trie.depths[i] for i in kept],
        children=children,
        q=[q[i] for i in kept],
        trie_ids=kept,
    )


def correct_path(trie: Trie, new_tokens: Sequence[int]) -> list[int]:
    """Trie nodes (root first) along the committed tokens, as far as the trie has them."""
    path, node = [0], 0
    for t in new_tokens:
        node = trie.children[node].get(t, -1)
        if node < 0:
            break
        path.append(node)
    return path


def calibration_trials(trie: Trie, new_tokens: Sequence[int]):
    """(proposer, hit) for every candidate whose parent was correct and whose own truth is known:
    children of correct nodes up to the depth of the last committed token."""
    path = correct_path(trie, new_tokens)
    on_path = set(path)
    for w in path:
        if trie.depths[w] >= len(new_tokens):
            break
        for c in trie.children[w].values():
            hit = c in on_path
            for proposer in trie.proposers[c]:
                yield proposer, hit
