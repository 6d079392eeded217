"""Is depth-2 Jacobi acceptance limited by the decoder or by the model? (docs/results.md section 14i)

    python benchmarks/jacobi_depth.py --models runs/s17/train/sft runs/s17/train/ahead-w4 --tree cpu-bf16-16 \
        --per-category 1 --dtype fp32 --threads 1 --out runs/jacobi-depth.json

Pure ``jacobi``, greedy, first turns. At every step it reads the Jacobi table the step drafted from and, once
the answer is known, where the true tokens sat in it: the rank of the true next token in the depth-1 row and,
on steps where that one was in the table, the rank of the token after it in the depth-2 row, split by whether
that row came from the previous step's logits ("fresh": the verified chain reached two below the accepted
node) or from padding noise. If the truth is rarely in a fresh depth-2 row, no tree shape helps: the model's
second-position denoising is the limit. Acceptance only; nothing here is timed.
"""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import dataclass, field

import torch

from msn.bench.questions import load_questions, select
from msn.decoding.engine import DecoderState, generate
from msn.decoding.sources.jacobi import JacobiSource
from msn.models import load_model
from msn.prompting import encode_chat, eos_ids


@dataclass
class Drafted:
    """What one step's Jacobi table held: the table, how many of its rows were fresh, and where the step stood
    (``length`` committed tokens, so the depth-d target is ``sequence[length - 1 + d]``)."""

    table: list[list[int]]
    fresh: int
    length: int


class RecordingJacobi(JacobiSource):
    """The Jacobi source, unchanged, keeping a copy of every table it drafts from."""

    def __init__(self):
        super().__init__()
        self.drafted: list[Drafted] = []
        self.fresh = 0

    def observe(self, step) -> None:
        self.fresh = min(len(step.rejected), self.depth)
        super().observe(step)

    def begin(self, prompt, prefill_logits, generator) -> None:
        self.drafted, self.fresh = [], 0
        super().begin(prompt, prefill_logits, generator)

    def propose(self, committed, budget):
        self.drafted.append(Drafted(self.table.tolist(), self.fresh, int(committed.numel())))
        return super().propose(committed, budget)


@dataclass
class DepthStats:
    steps: int = 0
    accepted: collections.Counter = field(default_factory=collections.Counter)  # steps by Jacobi drafts accepted (2: 2+)
    drafted_accepted: int = 0  # Jacobi drafts accepted in all
    depth1: collections.Counter = field(default_factory=collections.Counter)  # rank of the truth (-1: absent)
    depth2: dict[str, collections.Counter] = field(
        default_factory=lambda: {"fresh": collections.Counter(), "noise": collections.Counter()})

    def add(self, drafted: list[Drafted], sequence: list[int], accepted: list[int]) -> None:
        """One answer: its steps' tables, the final sequence, and the Jacobi drafts each step accepted."""
        for d, a in zip(drafted, accepted, strict=True):
            if d.length + 1 >= len(sequence):  # the last step: nothing beyond the bonus to score
                continue
            self.steps += 1
            self.accepted[min(a, 2)] += 1
            self.drafted_accepted += a
            r1 = _rank(d.table[0], sequence[d.length])
            self.depth1[r1] += 1
            if r1 >= 0 and len(d.table) > 1:
                self.depth2["fresh" if d.fresh >= 2 else "noise"][_rank(d.table[1], sequence[d.length + 1])] += 1

    def summary(self) -> dict:
        in1 = self.steps - self.depth1[-1]
        n = max(self.steps, 1)
        out = {"steps": self.steps, "jacobi accepted per step": self.drafted_accepted / n, "accepted >= 1": (self.accepted[1] + self.accepted[2]) / n,
               "accepted >= 2": self.accepted[2] / n, "depth1 in table": in1 / n, "depth1 top1": self.depth1[0] / n}
        both = sum(sum(c.values()) for c in self.depth2.values())
        out["depth2 row fresh share"] = sum(self.depth2["fresh"].values()) / max(both, 1)
        for kind, c in self.depth2.items():
            n = sum(c.values())
            out[f"depth2 {kind}: steps"] = n
            out[f"depth2 {kind}: in table"] = (n - c[-1]) / max(n, 1)
            out[f"depth2 {kind}: top1"] = c[0] / max(n, 1)
        return out


def _rank(row: list[int], token: int) -> int:
    return row.index(token) if token in row else -1


def measure(model, tokenizer, questions, tree: str, max_new_tokens: int) -> DepthStats:
    source = RecordingJacobi()
    state = DecoderState()
    state.sources["jacobi"] = source
    eos, stats = eos_ids(model, tokenizer), DepthStats()
    for q in questions:
        ids = encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}])
        out = generate(model, ids, max_new_tokens=max_new_tokens, method="jacobi", tree=tree, eos_token_id=eos,
                       state=state)
        stats.add(source.drafted, out.sequences[0].tolist(), out.accepted_by_source["jacobi"])
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--tree", default="cpu-bf16-16", help="a static template (auto would vary what is verified)")
    p.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file with each model's summary and rank counts")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    questions = select(load_questions(a.questions), per_category=a.per_category)
    results = {}
    for path in a.models:
        model, tokenizer = load_model(path, dtype=a.dtype)
        stats = measure(model, tokenizer, questions, a.tree, a.max_new_tokens)
        results[path] = {"summary": stats.summary(), "depth1 ranks": dict(stats.depth1),
                         "depth2 ranks": {k: dict(v) for k, v in stats.depth2.items()}}
        print(path, json.dumps(stats.summary()), flush=True)
    with open(a.out, "w") as f:
        json.dump({"questions": len(questions), "tree": a.tree, "models": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
