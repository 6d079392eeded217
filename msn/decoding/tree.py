"""Draft trees: a static template of (depth, rank) paths, turned once into tensors, filled per step.

A template node is a path of candidate ranks: ``(0, 2)`` is "the top-1 Jacobi candidate at depth 1, then
the top-3 candidate at depth 2" (Medusa style: a node's token depends only on its depth and rank). The
retrieval chain is a separate branch of ``retrieval`` nodes, one per depth. Each step the tokens are filled
in, invalid nodes (no retrieval match, past the token budget) are dropped and identical siblings merged,
so the forward pass never computes the same prefix twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from msn.errors import MsnError


class TreeError(MsnError):
    """An invalid tree template."""


# Medusa's "mc_sim_7b_63" (63 Jacobi nodes over a top-10 table); the official MSN release adds a 5-deep
# retrieval chain on top: 68 nodes + root.
MC_SIM_7B_63: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
    (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip


@dataclass(frozen=True)
class TreeTemplate:
    """Which draft nodes exist: Jacobi rank paths plus a retrieval chain of ``retrieval`` nodes."""

    jacobi: tuple[tuple[int, ...], ...]
    retrieval: int = 0
    name: str = "custom"

    def __post_init__(self) -> None:
        paths = tuple(tuple(int(r) for r in p) for p in self.jacobi)
        object.__setattr__(self, "jacobi", tuple(sorted(paths, key=len)))  # parents before children
        _validate_paths(self.jacobi, self.retrieval)

    @property
    def jacobi_depth(self) -> int:
        return max((len(p) for p in self.jacobi), default=0)

    @property
    def top_k(self) -> int:
        return max((r for p in self.jacobi for r in p), default=-1) + 1

    @property
    def depth(self) -> int:
        return max(self.jacobi_depth, self.retrieval)

    @property
    def size(self) -> int:
        """Number of draft nodes (the forward pass verifies size + 1 tokens, the root included)."""
        return len(self.jacobi) + self.retrieval

    def for_method(self, method: str) -> TreeTemplate:
        """The part of this template a decoding method uses."""
        if method == "ar":
            return TreeTemplate((), 0, name="ar")
        if method == "jacobi":
            return TreeTemplate(self.jacobi, 0, name=f"{self.name}/jacobi")
        if method == "retrieval":
            return TreeTemplate((), self.retrieval or max(self.depth, 1), name=f"{self.name}/retrieval")
        if method == "tr-jacobi":
            return self
        raise MsnError(f"unknown method {method!r}; choose one of ar, jacobi, retrieval, tr-jacobi")

    def to_dict(self) -> dict:
        return {"name": self.name, "jacobi": [list(p) for p in self.jacobi], "retrieval": self.retrieval}

    def save(self, path: str | os.PathLike) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict, where: str = "tree") -> TreeTemplate:
        """Accepts ``{"jacobi": [[0], [0, 0], ...], "retrieval": 5}`` or explicit parent links
        ``{"nodes": [[parent, rank], ...]}`` (node i+1 is nodes[i], the root is 0, rank "r" = retrieval)."""
        if not isinstance(data, dict):
            raise TreeError(f"{where}: expected a JSON object with 'jacobi' and 'retrieval' (or 'nodes')")
        name = str(data.get("name", Path(where).stem))
        if "nodes" in data:
            jacobi, retrieval = _paths_from_parents(data["nodes"], where)
            return cls(jacobi, retrieval, name=name)
        unknown = set(data) - {"name", "jacobi", "retrieval", "description"}
        if unknown:
            raise TreeError(f"{where}: unknown field(s) {sorted(unknown)}")
        jacobi = data.get("jacobi", [])
        if not isinstance(jacobi, list) or not all(isinstance(p, list) and p for p in jacobi):
            raise TreeError(f"{where}: field 'jacobi' must be a list of non-empty rank lists")
        if not all(isinstance(r, int) and r >= 0 for p in jacobi for r in p):
            raise TreeError(f"{where}: field 'jacobi' ranks must be integers >= 0")
        retrieval = data.get("retrieval", 0)
        if not isinstance(retrieval, int) or retrieval < 0:
            raise TreeError(f"{where}: field 'retrieval' must be an integer >= 0")
        return cls(tuple(tuple(p) for p in jacobi), retrieval, name=name)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TreeTemplate:
        p = Path(path)
        if not p.is_file():
            raise TreeError(f"{p}: tree file not found")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise TreeError(f"{p}:{e.lineno}: malformed JSON: {e.msg}") from None
        return cls.from_dict(data, where=str(p))


def _validate_paths(paths: Sequence[tuple[int, ...]], retrieval: int, max_depth: int = 16) -> None:
    seen = set(paths)
    if len(seen) != len(paths):
        dup = next(p for p in paths if list(paths).count(p) > 1)
        raise TreeError(f"tree template lists the node {list(dup)} twice")
    for p in paths:
        if len(p) > max_depth:
            raise TreeError(f"tree node {list(p)} has depth {len(p)} > the maximum draft depth {max_depth}")
        if len(p) > 1 and p[:-1] not in seen:
            raise TreeError(
                f"tree node {list(p)} has no parent {list(p[:-1])}: a gap in depth (every prefix must be a node)"
            )
    if retrieval > max_depth:
        raise TreeError(f"retrieval depth {retrieval} > the maximum draft depth {max_depth}")


def _paths_from_parents(nodes: list, where: str) -> tuple[tuple[tuple[int, ...], ...], int]:
    if not isinstance(nodes, list):
        raise TreeError(f"{where}: field 'nodes' must be a list of [parent, rank] pairs")
    parents, ranks = [-1], [None]
    for i, item in enumerate(nodes, start=1):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)):
            raise TreeError(f"{where}: nodes[{i - 1}] must be [parent_index, rank]")
        parent, rank = item
        if not 0 <= parent <= len(nodes):
            raise TreeError(f"{where}: nodes[{i - 1}] has parent {parent}, outside 0..{len(nodes)}")
        if not (rank == "r" or (isinstance(rank, int) and rank >= 0)):
            raise TreeError(f"{where}: nodes[{i - 1}] rank must be an integer >= 0 or 'r'")
        parents.append(parent)
        ranks.append(rank)
    paths: list[tuple[int, ...]] = []
    retrieval = 0
    for i in range(1, len(parents)):
        chain, seen, j = [], set(), i
        while j != 0:
            if j in seen:
                raise TreeError(f"{where}: nodes form a cycle through node {i} (node indices count from 1)")
            seen.add(j)
            chain.append(ranks[j])
            j = parents[j]
        chain.reverse()
        if "r" in chain:
            if any(r != "r" for r in chain):
                raise TreeError(f"{where}: node {i} mixes retrieval and Jacobi ranks on one path")
            retrieval = max(retrieval, len(chain))
        else:
            paths.append(tuple(chain))
    n_retrieval = sum(1 for r in ranks[1:] if r == "r")
    if n_retrieval != retrieval:
        raise TreeError(f"{where}: retrieval nodes must form a single chain from the root")
    return tuple(paths), retrieval


TREE_PRESETS: dict[str, TreeTemplate] = {
    # The official release: 63-node Medusa template over the top-10 table + 5-deep retrieval chain.
    "official-68": TreeTemplate(MC_SIM_7B_63, 5, name="official-68"),
    # ~16 drafted tokens: on a 2-core CPU a bf16 forward over 17 tokens costs little more than over one.
    "cpu-bf16-16": TreeTemplate(
        ((0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 0, 0, 0), (0, 0, 1)),
        5,
        name="cpu-bf16-16",
    ),
    # fp32 on CPU pays for every extra token: a thin tree.
    "cpu-fp32-8": TreeTemplate(((0,), (0, 0), (1,), (0, 0, 0)), 4, name="cpu-fp32-8"),
}


def default_tree(device: torch.device | str, dtype: torch.dtype) -> TreeTemplate:
    """The preset sized to what one forward over many tokens costs on this device and dtype."""
    if torch.device(device).type == "cuda":
        return TREE_PRESETS["official-68"]
    if dtype in (torch.bfloat16, torch.float16):
        return TREE_PRESETS["cpu-bf16-16"]
    return TREE_PRESETS["cpu-fp32-8"]


def resolve_tree(tree: TreeTemplate | str | os.PathLike | None, device, dtype) -> TreeTemplate:
    """A template from a preset name, a JSON file, a template, or None (the device default)."""
    if tree is None:
        return default_tree(device, dtype)
    if isinstance(tree, TreeTemplate):
        return tree
    if isinstance(tree, dict):
        return TreeTemplate.from_dict(tree)
    if str(tree) in TREE_PRESETS:
        return TREE_PRESETS[str(tree)]
    if os.path.exists(tree) or str(tree).endswith(".json"):
        return TreeTemplate.load(tree)
    raise TreeError(f"unknown tree {str(tree)!r}: not a preset ({', '.join(TREE_PRESETS)}) nor a JSON file")


@dataclass
class TreeBuffers:
    """A template as tensors. Node 0 is the root; nodes are ordered so parents precede children.

    ``source[i]`` indexes the flattened draft vector ``[jacobi_table.flatten(), retrieval_chain]``;
    ``paths`` lists root-to-leaf node indices padded with -1 (never a real index: see method.md).
    """

    template: TreeTemplate
    depth: torch.Tensor  # [N] long
    parent: torch.Tensor  # [N] long, root -1
    source: torch.Tensor  # [N] long, root -1
    ancestors: torch.Tensor  # [N, N] bool, a node is its own ancestor
    paths: torch.Tensor  # [P, depth + 1] long

    @property
    def num_nodes(self) -> int:
        return self.depth.numel()


def build_buffers(template: TreeTemplate, device: torch.device | str = "cpu") -> TreeBuffers:
    k, d_jacobi = max(template.top_k, 1), template.jacobi_depth
    index = {(): 0}
    depth, parent, source = [0], [-1], [-1]
    for p in template.jacobi:
        index[p] = len(depth)
        depth.append(len(p))
        parent.append(index[p[:-1]])
        source.append((len(p) - 1) * k + p[-1])
    prev = 0
    for d in range(1, template.retrieval + 1):
        depth.append(d)
        parent.append(prev)
        source.append(d_jacobi * k + d - 1)
        prev = len(depth) - 1
    n = len(depth)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        anc[i, i] = True
        if parent[i] >= 0:
            anc[i] |= anc[parent[i]]
    is_parent = set(parent)
    leaves = [i for i in range(n) if i not in is_parent]
    width = max(depth) + 1
    paths = torch.full((len(leaves), width), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        chain = anc[leaf].nonzero().flatten()  # ancestors in index order == depth order
        paths[row, : chain.numel()] = chain
    dev = torch.device(device)
    return TreeBuffers(
        template,
        torch.tensor(depth, device=dev),
        torch.tensor(parent, device=dev),
        torch.tensor(source, device=dev),
        anc.to(dev),
        paths.to(dev),
    )


@dataclass
class StepTree:
    """One step's tree after filling tokens, dropping invalid nodes and merging identical siblings."""

    tokens: torch.Tensor  # [n] input ids, root first
    depth: torch.Tensor  # [n] position offsets from the root
    ancestors: torch.Tensor  # [n, n] bool attention pattern among the step's tokens
    paths: torch.Tensor  # [P, width] indices into tokens, -1 padded
    compact_of: torch.Tensor  # [N] template node -> index into tokens (-1 when dropped as invalid)


def fill_tree(
    buf: TreeBuffers, root_token: int, drafts: torch.Tensor, max_depth: int | None = None
) -> StepTree:
    """Fill the template from ``drafts`` (flat: Jacobi table then retrieval chain; -1 = no token).

    Nodes deeper than ``max_depth`` (the remaining token budget) and nodes under a missing token are
    dropped; a node whose (parent, token) equals an earlier sibling's is merged into it.
    """
    n = buf.num_nodes
    tokens = torch.empty(n, dtype=torch.long, device=drafts.device)
    tokens[0] = root_token
    if n > 1:
        tokens[1:] = drafts[buf.source[1:]]
    ok = tokens >= 0
    if max_depth is not None:
        ok &= buf.depth <= max_depth
    valid = ~(buf.ancestors & ~ok).any(1)  # a node is valid when it and all its ancestors are

    # Merge identical siblings (e.g. a retrieval token equal to a Jacobi candidate): canon[i] is the
    # first node with the same canonical parent and the same token.
    tok_list, par_list, valid_list = tokens.tolist(), buf.parent.tolist(), valid.tolist()
    canon = list(range(n))
    first: dict[tuple[int, int], int] = {}
    for i in range(1, n):
        if valid_list[i]:
            canon[i] = first.setdefault((canon[par_list[i]], tok_list[i]), i)
    canon_t = torch.tensor(canon, device=tokens.device)
    keep = valid & (canon_t == torch.arange(n, device=tokens.device))
    compact = torch.full((n,), -1, dtype=torch.long, device=tokens.device)
    compact[keep] = torch.arange(int(keep.sum()), device=tokens.device)
    compact_of = torch.where(valid, compact[canon_t], -1)

    # Ancestors of a kept node, with each ancestor replaced by its canonical twin.
    rows = buf.ancestors[keep]  # [m, N]
    anc = torch.zeros(rows.shape[0], int(keep.sum()), dtype=torch.bool, device=tokens.device)
    r_idx, c_idx = rows.nonzero(as_tuple=True)
    anc[r_idx, compact_of[c_idx]] = True

    paths = buf.paths
    mapped = torch.where(paths >= 0, compact_of[paths.clamp(min=0)], -1)
    return StepTree(tokens[keep], buf.depth[keep], anc, mapped, compact_of)
