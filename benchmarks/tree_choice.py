"""The auto tree at work: what choosing the tree costs per step, and how big the chosen trees are.

(This replaces benchmarks/profile_decode.py: its non-model share is the "non-model" column here.)

    python benchmarks/tree_choice.py --model smollm2-135m --dtype bf16 --questions 6 --threads 1 \
        --plot docs/img/auto-tree-sizes.png

Tree-choice time = time in the engine's propose (every source's candidates, merged into the trie) and choose
(calibrated path probabilities, the n that maximises expected tokens/s) steps; non-model time = wall time
minus time inside ``model.forward``. Both as a share of wall time, per question, median over questions.
The plot shows the chosen number of draft nodes per step and how they split between sources.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

import msn
from msn.decoding import engine

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


class Timers:
    """Wraps named engine steps and the model forward with perf_counter accumulators."""

    def __init__(self, model):
        self.total = {"propose": 0.0, "choose": 0.0, "forward": 0.0}
        for name in ("propose", "choose"):
            original = getattr(engine._Decoder, name)
            setattr(engine._Decoder, name, self._timed(name, original))
        forward = model.forward

        def timed_forward(*a, **k):
            t0 = time.perf_counter()
            try:
                return forward(*a, **k)
            finally:
                self.total["forward"] += time.perf_counter() - t0

        timed_forward.__signature__ = inspect.signature(forward)  # keeps the cache keyword
        model.forward = timed_forward

    def _timed(self, name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[name] += time.perf_counter() - t0

        return wrapper

    def reset(self):
        for k in self.total:
            self.total[k] = 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--method", default="tr-jacobi")
    p.add_argument("--tree", default=None, help="auto (default), a preset or a JSON file")
    p.add_argument("--questions-file", default=str(DEFAULT_QUESTIONS))
    p.add_argument("--questions", type=int, default=6, help="how many questions (spread over the file)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plot", default=None, help="write the per-step tree sizes plot here (PNG)")
    p.add_argument("--json", default=None, help="write per-question numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = msn.load_model(args.model, dtype=args.dtype)
    rows = [json.loads(line) for line in open(args.questions_file)]
    picks = rows[:: max(len(rows) // args.questions, 1)][: args.questions]
    timers = Timers(model)
    results = []
    for q in picks:
        ids = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        msn.generate(model, ids, max_new_tokens=8, method=args.method, tree=args.tree)  # warm-up (+ first t(n))
        timers.reset()
        out = msn.generate(model, ids, max_new_tokens=args.max_new_tokens, method=args.method, tree=args.tree)
        choice = timers.total["propose"] + timers.total["choose"]
        row = {
            "category": q["category"], "new_tokens": out.new_tokens, "steps": out.steps, "mat": out.mean_accepted,
            "wall": out.wall_time, "choice_share": choice / out.wall_time,
            "non_model_share": (out.wall_time - timers.total["forward"]) / out.wall_time,
            "tree_sizes": out.tree_sizes, "nodes_by_source": out.nodes_by_source,
            "accepted_by_source": out.accepted_by_source,
        }
        results.append(row)
        print(f"{q['category']:>15}: {out.new_tokens} tokens, {out.steps} steps, MAT {out.mean_accepted:.2f}, "
              f"{out.new_tokens / out.wall_time:.1f} tok/s, tree choice {row['choice_share']:.1%}, "
              f"non-model {row['non_model_share']:.1%}, "
              f"mean tree {statistics.mean(out.tree_sizes or [0]):.1f} nodes, "
              + ", ".join(f"{k} {statistics.mean(v or [0]):.1f}" for k, v in out.nodes_by_source.items()))
    print(f"median tree-choice share {statistics.median(r['choice_share'] for r in results):.1%}, "
          f"median non-model share {statistics.median(r['non_model_share'] for r in results):.1%} "
          f"({args.model}, {args.dtype}, {args.method}, {torch.get_num_threads()} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot, f"{args.model} {args.dtype} {args.method}, auto tree")


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.6 * len(results) + 0.8), sharex=True, squeeze=False)
    colors = {"jacobi": "tab:blue", "retrieval": "tab:orange", "recycling": "tab:green"}
    for ax, r in zip(axes[:, 0], results, strict=True):
        steps = range(len(r["tree_sizes"]))
        bottom = [0] * len(r["tree_sizes"])
        for name, counts in r["nodes_by_source"].items():  # a merged node counts for each source
            ax.bar(steps, counts, bottom=bottom, color=colors.get(name), width=1.0, label=name)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.step(steps, r["tree_sizes"], where="mid", color="black", linewidth=0.8, label="tree size")
        ax.set_ylabel(r["category"][:10], fontsize=8)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("decoding step")
    fig.suptitle(f"draft nodes verified per step ({title})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
