"""Which draft nodes a step may verify: ``auto`` (chosen per step by expected tokens per second, the
default) or a static template.

A static template fixes each source's part: Jacobi rank paths (``(0, 2)`` is "the top-1 Jacobi candidate at
depth 1, then the top-3 candidate at depth 2", Medusa style), the retrieval chain's depth and the number of
recycling nodes. Either way the step's candidates are merged into one token trie (msn/decoding/trie.py),
so identical siblings are verified once.
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


# Which draft sources each decoding method uses (``ar`` none: plain greedy decoding, our baseline).
METHOD_SOURCES: dict[str, tuple[str, ...]] = {
    "ar": (),
    "jacobi": ("jacobi",),
    "retrieval": ("retrieval",),
    "recycling": ("recycling",),
    "tr-jacobi": ("jacobi", "retrieval", "recycling"),
}
METHODS = tuple(METHOD_SOURCES)
TREE_HELP = ("'auto' (default: the nodes worth verifying, chosen per step from this model's measured forward "
             "latency), a preset (official-68, cpu-bf16-16, cpu-fp32-8) or a JSON file from msn tune-tree")
AUTO_MAX_NODES = 64  # the auto tree never verifies more (t(n) is measured up to here)


def _unknown_method(method: str) -> TreeError:
    return TreeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class AutoTree:
    """The per-step tree: every source of the method proposes, the engine keeps the nodes that pay."""

    sources: tuple[str, ...] = METHOD_SOURCES["tr-jacobi"]
    name: str = "auto"
    max_nodes: int = AUTO_MAX_NODES

    @property
    def size(self) -> int:
        """The most draft nodes one step may verify."""
        return self.max_nodes if self.sources else 0

    def for_method(self, method: str) -> AutoTree:
        if method not in METHOD_SOURCES:
            raise _unknown_method(method)
        return AutoTree(METHOD_SOURCES[method], "auto" if method == "tr-jacobi" else f"auto/{method}", self.max_nodes)

    def to_dict(self) -> dict:
        return {"name": self.name, "sources": list(self.sources), "max_nodes": self.max_nodes}


@dataclass(frozen=True)
class TreeTemplate:
    """Which draft nodes exist: Jacobi rank paths, a retrieval chain ``retrieval_depth`` nodes deep and
    ``recycling`` nodes followed best-first through the recycling table."""

    jacobi: tuple[tuple[int, ...], ...]
    retrieval_depth: int = 0
    name: str = "custom"
    recycling: int = 0

    def __post_init__(self) -> None:
        paths = tuple(tuple(int(r) for r in p) for p in self.jacobi)
        object.__setattr__(self, "jacobi", tuple(sorted(paths, key=len)))  # parents before children
        for key, limit in (("retrieval_depth", None), ("recycling", AUTO_MAX_NODES)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TreeError(f"tree field {key!r} must be an integer >= 0, got {value!r}")
            if limit is not None and value > limit:
                raise TreeError(f"tree field {key!r} must be <= {limit}, got {value}")
        _validate_paths(self.jacobi, self.retrieval_depth)

    @property
    def jacobi_depth(self) -> int:
        return max((len(p) for p in self.jacobi), default=0)

    @property
    def top_k(self) -> int:
        return max((r for p in self.jacobi for r in p), default=-1) + 1

    @property
    def depth(self) -> int:
        return max(self.jacobi_depth, self.retrieval_depth)

    @property
    def size(self) -> int:
        """Number of draft nodes (the forward pass verifies size + 1 tokens, the root included)."""
        return len(self.jacobi) + self.retrieval_depth + self.recycling

    @property
    def sources(self) -> tuple[str, ...]:
        parts = (("jacobi", self.jacobi), ("retrieval", self.retrieval_depth), ("recycling", self.recycling))
        return tuple(name for name, part in parts if part)

    def shape(self, source: str):
        """This template's part for one source (rank paths, chain depth, node count)."""
        return {"jacobi": self.jacobi, "retrieval": self.retrieval_depth, "recycling": self.recycling}[source]

    def for_method(self, method: str) -> TreeTemplate:
        """The part of this template a decoding method uses (a one-source method whose part is empty
        gets a part of the template's depth, so ``--method retrieval --tree cpu-fp32-8`` still drafts)."""
        if method == "ar":
            return TreeTemplate((), 0, name="ar")
        if method == "jacobi":
            return TreeTemplate(self.jacobi, 0, name=f"{self.name}/jacobi")
        if method == "retrieval":
            return TreeTemplate((), self.retrieval_depth or max(self.depth, 1), name=f"{self.name}/retrieval")
        if method == "recycling":
            count = self.recycling or min(max(self.size, 1), AUTO_MAX_NODES)
            return TreeTemplate((), 0, name=f"{self.name}/recycling", recycling=count)
        if method == "tr-jacobi":
            return self
        raise _unknown_method(method)

    def to_dict(self) -> dict:
        out = {"name": self.name, "jacobi": [list(p) for p in self.jacobi], "retrieval_depth": self.retrieval_depth}
        if self.recycling:
            out["recycling"] = self.recycling
        return out

    def save(self, path: str | os.PathLike) -> None:
        from msn.outputs import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict, where: str = "tree") -> TreeTemplate:
        """Accepts ``{"jacobi": [[0], [0, 0], ...], "retrieval_depth": 5}`` or explicit parent links
        ``{"nodes": [[parent, rank], ...]}`` (node i+1 is nodes[i], the root is 0, rank "r" = retrieval), either
        with an optional ``"recycling"`` node count. Files written before the field was named for what it is
        say ``"retrieval"``; they read the same. An unknown field or a tree without draft nodes is refused: a
        typo must not decode with a smaller tree than the one meant."""
        if not isinstance(data, dict):
            raise TreeError(f"{where}: expected a JSON object with 'jacobi' and 'retrieval_depth' (or 'nodes')")
        name = str(data.get("name", Path(where).stem))
        known = {"name", "description", "recycling", *(("nodes",) if "nodes" in data else
                                                       ("jacobi", "retrieval_depth", "retrieval"))}
        unknown = set(data) - known
        if unknown:
            also = (" ('nodes' gives the Jacobi nodes and the retrieval chain, rank 'r'; it takes no "
                    "'jacobi' or 'retrieval_depth' beside it)" if unknown & {"jacobi", "retrieval_depth", "retrieval"}
                    else "")
            raise TreeError(f"{where}: unknown field(s) {sorted(unknown)}{also}")
        if "retrieval" in data:  # the old name of retrieval_depth
            if "retrieval_depth" in data:
                raise TreeError(f"{where}: give 'retrieval_depth' only ('retrieval' is its old name)")
            data = {**{k: v for k, v in data.items() if k != "retrieval"}, "retrieval_depth": data["retrieval"]}
        if "nodes" in data:
            jacobi, retrieval = _paths_from_parents(data["nodes"], where)
            data = {**data, "jacobi": [list(p) for p in jacobi], "retrieval_depth": retrieval}
        jacobi = data.get("jacobi", [])
        if not isinstance(jacobi, list) or not all(isinstance(p, list) and p for p in jacobi):
            raise TreeError(f"{where}: field 'jacobi' must be a list of non-empty rank lists")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for p in jacobi for r in p):
            raise TreeError(f"{where}: field 'jacobi' ranks must be integers >= 0")
        counts = {}
        for key in ("retrieval_depth", "recycling"):
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TreeError(f"{where}: field {key!r} must be an integer >= 0, got {value!r}")
            counts[key] = value
        if counts["recycling"] > AUTO_MAX_NODES:
            raise TreeError(f"{where}: field 'recycling' must be <= {AUTO_MAX_NODES}")
        if not jacobi and not counts["retrieval_depth"] and not counts["recycling"]:
            raise TreeError(f"{where}: the tree has no draft nodes; give 'jacobi' rank paths (e.g. [[0], [0, 0]]), "
                            "a 'retrieval_depth' or 'recycling' nodes (or decode without drafts: --method ar)")
        return cls(tuple(tuple(p) for p in jacobi), counts["retrieval_depth"], name=name, recycling=counts["recycling"])

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
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and not isinstance(item[0], bool)):
            raise TreeError(f"{where}: nodes[{i - 1}] must be [parent_index, rank]")
        parent, rank = item
        if not 0 <= parent <= len(nodes):
            raise TreeError(f"{where}: nodes[{i - 1}] has parent {parent}, outside 0..{len(nodes)}")
        if not (rank == "r" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0)):
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


Tree = AutoTree | TreeTemplate


def default_tree(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AutoTree:
    """The per-step tree, sized from this model's measured t(n) on this device and dtype."""
    return AutoTree()


def resolve_tree(tree: Tree | str | os.PathLike | dict | None, device=None, dtype=None) -> Tree:
    """A tree from ``"auto"``/None (the default), a preset name, a JSON file, a dict or a template."""
    if tree is None or (isinstance(tree, str) and tree == "auto"):
        return default_tree(device, dtype)
    if isinstance(tree, AutoTree | TreeTemplate):
        return tree
    if isinstance(tree, dict):
        return TreeTemplate.from_dict(tree)
    if str(tree) in TREE_PRESETS:
        return TREE_PRESETS[str(tree)]
    if os.path.exists(tree) or str(tree).endswith(".json"):
        return TreeTemplate.load(tree)
    raise TreeError(
        f"unknown tree {str(tree)!r}: not 'auto', a preset ({', '.join(TREE_PRESETS)}) nor a JSON file"
    )
