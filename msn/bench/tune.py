"""``msn tune-tree``: size the draft tree to this device and model.

A tree only pays when the tokens it adds per step outweigh what verifying them costs, and that cost curve
differs wildly by device and dtype (flat up to ~16 tokens for bf16 on some CPUs, linear for fp32). We
measure both sides: the forward cost of verifying k tokens on a ~200-token past, and how often each node
of a large tree lies on the accepted path. Expected tokens/s of a subtree S is
(1 + sum of acceptance over S) / cost(|S| + 1); we grow S greedily by acceptance (a child only after its
parent), score every size and keep the best.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from msn.decoding.costs import measure_forward, remeasure
from msn.decoding.packed import resolve_pack
from msn.decoding.tree import TREE_PRESETS, TreeTemplate, resolve_tree
from msn.errors import InputError
from msn.flags import (
    add_device_argument,
    add_dtype_argument,
    add_quantize_argument,
    add_threads_argument,
)
from msn.outputs import read_small_json

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)

JACOBI, RETRIEVAL = "j", "r"  # NodeKey.kind (also the "kind" of each node in the measurement report)


class NodeKey(NamedTuple):
    """One node of a static template: a Jacobi node by its rank path, or the retrieval chain's node at a depth."""

    kind: str  # JACOBI or RETRIEVAL
    path: tuple[int, ...]  # the rank path, or (depth,) on the retrieval chain


@dataclass(frozen=True)
class Node:
    key: NodeKey
    parent: NodeKey | None  # None = the root
    prob: float  # share of decoding steps in which this node was on the accepted path

    def __post_init__(self) -> None:  # plain (kind, path) tuples are accepted for keys
        object.__setattr__(self, "key", NodeKey(*self.key))
        if self.parent is not None:
            object.__setattr__(self, "parent", NodeKey(*self.parent))


@dataclass
class Selection:
    nodes: list[Node]  # the chosen nodes, in the order they were added
    scores: list[float]  # expected tokens/s for the first k added nodes, k = 0..len(order)
    order: list[Node]  # every node, in greedy order

    @property
    def best_size(self) -> int:
        return len(self.nodes)

    @property
    def speedup(self) -> float:
        return self.scores[self.best_size] / self.scores[0]


def template_nodes(template: TreeTemplate) -> list[NodeKey]:
    """Keys in the engine's node order (root excluded): Jacobi paths as stored, then the retrieval chain."""
    keys = [NodeKey(JACOBI, p) for p in template.jacobi]
    keys += [NodeKey(RETRIEVAL, (d,)) for d in range(1, template.retrieval_depth + 1)]
    return keys


def parent_of(key: tuple[str, tuple[int, ...]]) -> NodeKey | None:
    kind, path = key
    if kind == JACOBI:
        return NodeKey(JACOBI, path[:-1]) if len(path) > 1 else None
    return NodeKey(RETRIEVAL, (path[0] - 1,)) if path[0] > 1 else None


def select_tree(nodes: Sequence[Node], cost: Callable[[int], float], max_nodes: int | None = None,
                chain_share: Sequence[float] | None = None) -> Selection:
    """Greedy growth by acceptance probability, parents first; keep the size maximising
    (1 + sum of probabilities) / expected cost. Pure: ``cost(n)`` is the time to verify n tokens.
    Measured acceptance never rises from parent to child, so each greedy prefix is the best parent-closed
    node set of its size, and the best prefix is the best tree for this cost curve.

    ``chain_share[d - 1]`` is the share of steps whose retrieval chain reached depth d: retrieval nodes
    are only in the forward pass on those steps (the engine drops nodes with no token), so they are
    charged only there. None: charge every node every step."""
    by_key = {n.key: n for n in nodes}
    for n in nodes:
        if n.parent is not None and n.parent not in by_key:
            raise InputError(f"tree node {n.key} has no parent {n.parent} among the measured nodes")
    index = {n.key: i for i, n in enumerate(nodes)}
    chosen: set[NodeKey] = set()
    order: list[Node] = []
    limit = len(nodes) if max_nodes is None else min(max_nodes, len(nodes))
    while len(order) < limit:
        frontier = [n for n in nodes if n.key not in chosen and (n.parent is None or n.parent in chosen)]
        if not frontier:
            break
        best = max(frontier, key=lambda n: (n.prob, -index[n.key]))
        order.append(best)
        chosen.add(best.key)
    scores, total, jacobi, depth = [1.0 / cost(1)], 1.0, 0, 0
    for n in order:
        total += n.prob
        if n.key.kind == JACOBI:
            jacobi += 1
        else:
            depth += 1
        scores.append(total / expected_cost(cost, jacobi, depth, chain_share))
    best_k = max(range(len(scores)), key=lambda k: (scores[k], -k))
    return Selection(order[:best_k], scores, order)


def expected_cost(cost: Callable[[int], float], jacobi: int, depth: int,
                  chain_share: Sequence[float] | None) -> float:
    """Mean forward cost of a tree with ``jacobi`` Jacobi nodes and a retrieval chain of ``depth``."""
    if chain_share is None or depth == 0:
        return cost(1 + jacobi + depth)
    reach = [1.0] + [chain_share[d] if d < len(chain_share) else 0.0 for d in range(depth)]  # P(len >= d)
    mean = 0.0
    for length in range(depth + 1):  # P(drafted chain length == length), capped at depth
        p = reach[length] - (reach[length + 1] if length < depth else 0.0)
        mean += p * cost(1 + jacobi + length)
    return mean


def to_template(nodes: Sequence[Node], name: str) -> TreeTemplate:
    jacobi = tuple(n.key.path for n in nodes if n.key.kind == JACOBI)
    depth = max((n.key.path[0] for n in nodes if n.key.kind == RETRIEVAL), default=0)
    return TreeTemplate(jacobi, depth, name=name)


def interpolate(costs: dict[int, float]) -> Callable[[int], float]:
    """Piecewise-linear cost between measured sizes, extended linearly past the ends."""
    xs = sorted(costs)
    ys = [costs[x] for x in xs]
    if len(xs) == 1:
        return lambda n: ys[0]

    def f(n: int) -> float:
        i = min(max(bisect.bisect_left(xs, n), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (n - x0) / (x1 - x0), 1e-9)

    return f


def measure_costs(model, sizes: Sequence[int] = DEFAULT_SIZES, past: int = 200, repeats: int = 5,
                  seed: int = 0) -> dict[int, float]:
    """Median seconds of one forward over k new tokens through the path decoding uses by default (see
    :func:`msn.decoding.costs.measure_forward`)."""
    return measure_forward(model, sizes, past, repeats, seed, packed=resolve_pack(model, None, False))


def measure_acceptance(model, tokenizer, template: TreeTemplate, prompts: Sequence[str],
                       max_new_tokens: int = 64) -> tuple[list[float], int, list[float]]:
    """Per template node (root excluded): share of steps it was on the accepted path; the step count; and
    per retrieval depth d, the share of steps whose retrieval chain reached depth d."""
    from msn.decoding import generate
    from msn.prompting import encode_chat, eos_ids

    eos = eos_ids(model, tokenizer)
    hits = torch.zeros(template.size + 1, dtype=torch.long)
    steps = 0
    reached = [0] * template.retrieval_depth
    for text in prompts:
        ids = encode_chat(tokenizer, [{"role": "user", "content": text}]).to(model.device)
        out = generate(model, ids, max_new_tokens=max_new_tokens, method="tr-jacobi", tree=template,
                       eos_token_id=eos)
        hits += out.node_hits.cpu()
        steps += out.steps
        for length in out.retrieval_lengths or []:
            for d in range(min(length, template.retrieval_depth)):
                reached[d] += 1
    share = [r / max(steps, 1) for r in reached]
    return [h / max(steps, 1) for h in hits[1:].tolist()], steps, share


def tune(model, tokenizer, prompts: Sequence[str], start: TreeTemplate, name: str,
         sizes: Sequence[int] = DEFAULT_SIZES, past: int = 200, repeats: int = 5,
         max_new_tokens: int = 64, log=None) -> tuple[TreeTemplate, dict]:
    log = log or (lambda s: None)
    sizes = sorted({k for k in sizes if k >= 1} | {1})
    log(f"measuring forward cost for {', '.join(map(str, sizes))} tokens on a {past}-token past ...")
    costs = measure_costs(model, sizes, past, repeats)
    log("  " + "  ".join(f"{k}: {1000 * v:.1f} ms" for k, v in costs.items()))
    latency, path = remeasure(model, packed=resolve_pack(model, None, False))
    log(f"auto tree t(n) remeasured ({path}): "
        + "  ".join(f"{n}: {1000 * t:.1f} ms" for n, t in zip(latency.sizes, latency.seconds, strict=True)))
    log(f"measuring acceptance per node of {start.name} ({start.size} nodes) on {len(prompts)} prompts ...")
    probs, steps, chain_share = measure_acceptance(model, tokenizer, start, prompts, max_new_tokens)
    nodes = [Node(k, parent_of(k), p) for k, p in zip(template_nodes(start), probs, strict=True)]
    sel = select_tree(nodes, interpolate(costs), max_nodes=max(sizes) - 1, chain_share=chain_share)
    tree = to_template(sel.nodes, name)
    report = {
        "costs_s": {str(k): v for k, v in costs.items()},
        "past": past,
        "steps": steps,
        "start_tree": start.to_dict(),
        "retrieval_chain_share_by_depth": chain_share,
        "node_acceptance": [{"node": list(n.key.path), "kind": n.key.kind, "prob": n.prob} for n in nodes],
        "expected_tokens_per_s_by_size": sel.scores,
        "best_size": sel.best_size,
        "expected_speedup": sel.speedup,
        "tree": tree.to_dict(),
    }
    return tree, report


def _is_tuned_tree(path: Path) -> bool:
    """A tree this command wrote: a template whose name it gave (``tuned-...``) and no field it does not write."""
    data = read_small_json(path)
    return (isinstance(data, dict) and str(data.get("name", "")).startswith("tuned-")
            and set(data) <= {"name", "jacobi", "retrieval_depth", "retrieval", "recycling"})


def _is_report(path: Path) -> bool:
    data = read_small_json(path)
    return isinstance(data, dict) and {"costs_s", "node_acceptance", "tree"} <= set(data)


def _check_own_file(path: Path, ours, what: str) -> None:
    """Replace only what tune-tree wrote: ``--out`` mistyped for a dataset must not destroy it."""
    if path.is_file() and not ours(path):
        raise InputError(f"{path} exists and is not {what}; choose another --out (tune-tree replaces only its own "
                         "files)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset, folder or checkpoint (default: smollm2-135m)")
    add_dtype_argument(p)
    add_device_argument(p, help="cpu, cuda or auto (default: auto)")
    add_quantize_argument(p)
    p.add_argument("--out", default=None, help="tree JSON to write (default: tree-<model>-<dtype>[-int4].json), "
                   "next to its <name>.measure.json; an existing file is replaced only if tune-tree wrote it")
    p.add_argument("--start-tree", default="official-68",
                   help="large static tree whose nodes are measured: a preset or a tree JSON file (default: "
                        "official-68)")
    p.add_argument("--prompts", type=int, default=4, help="built-in demo prompts decoded to measure acceptance")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="token counts to time")
    p.add_argument("--past", type=int, default=200, help="cache length while timing (default: 200)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per size; the median is used")
    add_threads_argument(p, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from msn.bench.questions import demo_questions
    from msn.flags import at_least, check_quantize_flag, pick_device
    from msn.models import load_model, parse_dtype

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise InputError("--sizes must list token counts >= 1")
    at_least(args, {"prompts": 1, "max_new_tokens": 1, "past": 1, "repeats": 1, "threads": 1})
    quantize = check_quantize_flag(args, pick_device(args.device))
    weights = args.dtype if quantize == "none" else f"{args.dtype}-{quantize}"
    out = Path(args.out or f"tree-{Path(args.model).name}-{weights}.json")
    from msn.outputs import atomic_write_text, check_output_file

    report_path = out.with_name(out.stem + ".measure.json")
    check_output_file(out, "--out")  # before measuring: a bad path must not throw the measurements away
    check_output_file(report_path, "--out")
    _check_own_file(out, _is_tuned_tree, "a tree file msn tune-tree wrote")
    _check_own_file(report_path, _is_report, "a measurement report msn tune-tree wrote")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    start = resolve_tree(args.start_tree, torch.device(device), parse_dtype(args.dtype))
    if not isinstance(start, TreeTemplate):
        raise InputError(f"--start-tree {args.start_tree!r} chooses its nodes per step, so it has no fixed nodes to "
                         f"measure; give a preset ({', '.join(TREE_PRESETS)}) or a tree JSON file")
    if start.recycling:
        raise InputError(f"--start-tree {args.start_tree!r} has {start.recycling} recycling nodes, which tune-tree "
                         "does not measure; give a tree without 'recycling'")
    name = f"tuned-{Path(args.model).name}-{weights}-{device}"
    prompts = [q.turns[0] for q in demo_questions()[: args.prompts]]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, quantize=quantize)
    tree, report = tune(model, tokenizer, prompts, start, name, sizes, args.past, args.repeats,
                        args.max_new_tokens, log=lambda s: print(s, file=sys.stderr))
    atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")  # atomic: never half a file
    if not tree.size:  # a tree file without draft nodes is refused wherever a tree is read
        print(f"msn tune-tree: no draft node pays on this device and model (measurements in {report_path}); "
              f"decode with --method ar, or keep --tree auto, which drafts only when it pays; {out} not written",
              file=sys.stderr)
        return 1
    tree.save(out)
    print(f"tree: {tree.size} nodes ({len(tree.jacobi)} Jacobi, retrieval depth {tree.retrieval_depth}), "
          f"expected {report['expected_speedup']:.2f}x over one-token steps (forward cost only)")
    print(f"wrote {out} (use: msn bench --tree {out}); measurements in {report_path}")
    return 0
