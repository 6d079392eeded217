"""How many draft tokens could a drafting rule give at most, on the model's own greedy text?

    python benchmarks/draft_headroom.py --model smollm2-135m --dtype bf16 --per-category 2 \\
        --questions ../shared/data/spec_bench/question.jsonl --out runs/headroom.json

Before building a drafter, this tells whether it can pay: each question's first turn is decoded once (greedy),
then one teacher-forced forward gives the model's top-k prediction after every token. The texts are replayed
position by position with the tables shared across questions, as a decoder state is; at each position each
rule proposes chains (up to ``--depth`` tokens) and scores the longest prefix of the true continuation any of
them holds: an oracle choice among the rule's own chains, so an upper bound for a tree holding them all, with
the tree's size (distinct prefixes) reported beside it. Recycling tables here learn only from the accepted
path's rows (the decoder's also see rejected nodes). Rules (``+`` joins them into one tree):

- ``retrieval``: what followed the earliest occurrence of the longest suffix match (prompt lookup's rule);
  ``retrieval2``: and the latest occurrence too (msn's source); ``retrieval-all``: every occurrence of the
  longest match; ``retrieval-any``: every occurrence of every match length.
- ``recycling``: the top-1 chain through the table of each token's last recorded top-k (msn's source drafts a
  best-first tree through it); ``recycling-pair``: the same table keyed by the last two tokens, falling back to
  one token where the pair was never seen.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass

import torch

from msn.decoding.sources.recycling import RecyclingSource
from msn.decoding.sources.retrieval import common_prefix as accepted
from msn.outputs import atomic_write_text

DEFAULT_QUESTIONS = "../shared/data/spec_bench/question.jsonl"
DEFAULT_RULES = ("retrieval", "retrieval2", "retrieval-all", "retrieval-any", "recycling", "recycling-pair",
                 "retrieval2+recycling", "retrieval2+recycling-pair", "retrieval-any+recycling")
BASE_RULES = {"retrieval", "retrieval2", "retrieval-all", "retrieval-any", "recycling", "recycling-pair"}


@dataclass
class Text:
    """One decoded turn: ``ids`` prompt + answer; ``top[i]`` the model's k best next ids after ``ids[: i + 1]``."""

    category: str
    prompt_len: int
    ids: list[int]
    top: list[list[int]]


def tree_nodes(chains: list[list[int]]) -> int:
    """Nodes of the trie holding every chain (shared prefixes counted once)."""
    return len({tuple(c[:d]) for c in chains for d in range(1, len(c) + 1)})


class Replay:
    """The tables a decoder state would hold, fed one text position at a time."""

    def __init__(self, depth: int = 6, max_ngram: int = 3):
        self.depth, self.max_ngram = depth, max_ngram
        self.after: dict[int, list[int]] = {}  # token -> its last recorded top-k
        self.after_pair: dict[tuple[int, int], list[int]] = {}
        self.hist: list[int] = []
        self.starts: dict[tuple[int, ...], list[int]] = defaultdict(list)  # n-gram -> continuation starts

    def begin(self, prompt: list[int]) -> None:
        self.hist, self.starts = [], defaultdict(list)
        for t in prompt:
            self.extend(t)

    def extend(self, token: int) -> None:
        self.hist.append(token)
        e = len(self.hist) - 1  # the n-grams ending before the new token now have a continuation
        for n in range(1, min(self.max_ngram, e) + 1):
            self.starts[tuple(self.hist[e - n : e])].append(e)

    def record(self, i: int, ids: list[int], top: list[int]) -> None:
        self.after[ids[i]] = top
        if i:
            self.after_pair[ids[i - 1], ids[i]] = top

    def chains(self, rule: str) -> list[list[int]]:
        out = []
        for part in rule.split("+"):
            out += self._retrieval(part) if part.startswith("retrieval") else self._recycling(part)
        return out

    def _retrieval(self, rule: str) -> list[list[int]]:
        h, chains = self.hist, []
        for n in range(min(self.max_ngram, len(h) - 1), 0, -1):
            starts = self.starts.get(tuple(h[-n:]))
            if not starts:
                continue
            pick = {"retrieval": starts[:1], "retrieval2": sorted({starts[0], starts[-1]})}.get(rule, starts)
            chains += [h[s : s + self.depth] for s in pick]
            if rule != "retrieval-any":
                break
        return chains

    def _recycling(self, rule: str) -> list[list[int]]:
        prev, cur, chain = self.hist[-2] if len(self.hist) > 1 else -1, self.hist[-1], []
        for _ in range(self.depth):
            top = (self.after_pair.get((prev, cur)) if rule == "recycling-pair" else None) or self.after.get(cur)
            if not top:
                break
            prev, cur = cur, top[0]
            chain.append(cur)
        return [chain] if chain else []


def check_rules(spec: str) -> list[str]:
    """``--rules``: comma-separated, each base rules joined by ``+``; an unknown one is refused in one line."""
    rules = [r for r in spec.split(",") if r]
    for rule in rules:
        unknown = [p for p in rule.split("+") if p not in BASE_RULES]
        if unknown:
            raise SystemExit(f"--rules: unknown rule {unknown[0]!r} in {rule!r}; choose from "
                             f"{', '.join(sorted(BASE_RULES))}, joined with '+'")
    if not rules:
        raise SystemExit("--rules is empty: give at least one rule, e.g. retrieval2+recycling")
    return rules


def replay(texts: list[Text], rules: list[str], depth: int = 6) -> dict:
    """Per rule: mean accepted draft tokens and tree nodes per answer position, overall and per category."""
    table, recycling = Replay(depth), RecyclingSource()  # the source picks the prompt rows its prefill records
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # accepted, nodes, positions
    for text in texts:
        ids, top, L = text.ids, text.top, text.prompt_len
        table.begin(ids[:L])
        rows = recycling.prompt_rows(torch.tensor(ids[: L - 1], dtype=torch.long))
        for i in rows.tolist() if rows is not None else []:
            table.record(i, ids, top[i])
        for i in range(L - 1, len(ids) - 1):
            truth = ids[i + 1 : i + 1 + depth]
            for rule in rules:
                chains = table.chains(rule)
                got, nodes = max((accepted(c, truth) for c in chains), default=0), tree_nodes(chains)
                for key in ((rule, "overall"), (rule, text.category)):
                    s = sums[key]
                    s[0] += got
                    s[1] += nodes
                    s[2] += 1
            table.record(i, ids, top[i])
            if i + 1 < len(ids) - 1:
                table.extend(ids[i + 1])
    out: dict = {}
    for (rule, cat), (acc, nodes, n) in sums.items():
        out.setdefault(rule, {})[cat] = {"accepted": acc / n, "nodes": nodes / n, "positions": int(n)}
    return out


def decode_texts(model, tok, questions, max_new_tokens: int, k: int = 8) -> list[Text]:
    from rich.progress import track

    from msn.decoding.engine import generate
    from msn.prompting import encode_chat, eos_ids

    texts = []
    for q in track(questions, description="decoding"):
        prompt = encode_chat(tok, [{"role": "user", "content": q.turns[0]}])
        seq = generate(model, prompt, max_new_tokens=max_new_tokens, method="retrieval",
                       eos_token_id=eos_ids(model, tok)).sequences
        with torch.inference_mode():
            top = model(seq).logits[0].float().topk(k, -1).indices.tolist()
        texts.append(Text(q.category, prompt.shape[1], seq[0].tolist(), top))
    return texts


def render(result: dict) -> str:
    cats = sorted({c for per in result.values() for c in per} - {"overall"})
    lines = ["| rule | accepted / position | tree nodes | " + " | ".join(cats) + " |",
             "|---|---:|---:|" + "---:|" * len(cats)]
    for rule, per in result.items():
        o = per["overall"]
        lines.append(f"| {rule} | {o['accepted']:.3f} | {o['nodes']:.1f} | "
                     + " | ".join(f"{per[c]['accepted']:.2f}" if c in per else "-" for c in cats) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--questions", default=DEFAULT_QUESTIONS)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--rules", default=",".join(DEFAULT_RULES))
    p.add_argument("--out", default=None, help="a .json file for the table (atomic write)")
    a = p.parse_args(argv)
    from msn.bench.questions import load_questions, select
    from msn.models import load_model
    from msn.outputs import check_output_file

    out = check_output_file(a.out) if a.out else None
    rules = check_rules(a.rules)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=a.dtype)
    texts = decode_texts(model, tok, select(load_questions(a.questions), per_category=a.per_category),
                         a.max_new_tokens)
    result = replay(texts, rules, a.depth)
    print(render(result))
    if out is not None:
        atomic_write_text(out, json.dumps({"args": vars(a), "rules": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
