"""Helpers shared by several test files: data rows, a tiny chat-model folder, a fast training config, and the
hypothesis strategies and draft builders of the decoding tests. Fixtures built on them live in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import strategies as st

from msn.decoding.sources import Draft
from msn.decoding.tree import TreeTemplate

# ---------------------------------------------------------------------------------------------------------
# Data and model folders


def load_script(path: Path, name: str):
    """A script under benchmarks/ imported as module ``name`` (registered in sys.modules, so the modules it
    puts on the path, e.g. the reproduce driver's budgets.py and report.py, are importable afterwards)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object per line (a str row is written as is, e.g. a deliberately bad line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def counting_rows(n: int, length: int, prompt: str = "Count from {i}.") -> list[dict[str, str]]:
    """Prompt/response records whose response counts up from i: a pattern a tiny model learns quickly."""
    return [{"prompt": prompt.format(i=i), "response": " ".join(str(i + j) for j in range(length))} for i in range(n)]


def save_tiny_chat_model(path: Path, tok, seed: int = 0, tied: bool = True) -> Path:
    """A 2-layer random Llama with ``tok``'s vocabulary and special ids, saved with ``tok`` (its chat template
    included) as a normal HF model folder. ``tied=False``: untied output embeddings, so the random model does
    not just repeat its input token (and two seeds write different text)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Training


class Crash(Exception):
    """Raised from a callback to kill a training run mid-way."""


def prompt_response_samples(n: int = 6, seed: int = 0) -> list[dict]:
    """Random prompt of 5 ids, response of 8..15 ids (the targets): training samples for the noise tests."""
    import torch
    from conftest import TINY_VOCAB

    from msn.data import IGNORE

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, TINY_VOCAB, (5 + 8 + i,), generator=g)
        out.append({"input_ids": ids, "labels": torch.cat([torch.full((5,), IGNORE), ids[5:]])})
    return out


def fast(tiny_dir, data_file, out, **kw):
    """A ``TrainConfig`` for a run of a few seconds on the tiny model folder."""
    from msn.training.train import TrainConfig

    base = dict(
        model=str(tiny_dir), data=str(data_file), output=str(out), max_steps=2, batch_size=2, lr=1e-3,
        eval_steps=0, save_steps=100, logging_steps=1, max_length=64, seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------------------
# Draft fragments and random trees (test_trie, test_verify, test_cache, test_tree, test_decoding_equivalence)


def draft_from_paths(paths, scores=None, bucket=0) -> Draft:
    """A Draft holding every prefix of every token path (parents first). ``scores`` maps a full token path
    to its edge score (default 0.5); each node's tag is its token path."""
    draft, index = Draft(), {}
    for path in paths:
        for d in range(1, len(path) + 1):
            prefix = tuple(path[:d])
            if prefix not in index:
                parent = index[prefix[:-1]] if d > 1 else -1
                score = (scores or {}).get(prefix, 0.5)
                index[prefix] = draft.add(parent, prefix[-1], score, bucket, prefix)
    return draft


def by_score(name, bucket, score):
    """The merge's estimate function when the raw score is trusted."""
    return score


@st.composite
def random_drafts(draw, sources=("a", "b", "c"), max_nodes: int = 6, vocab: int = 3,
                  scores=st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0.0, 1.0)):
    """Per source a random draft fragment: each node hangs from the root or an earlier node of the same
    draft, with a token from a tiny vocabulary so identical siblings (within and across sources) are common."""
    out = {}
    for name in sources:
        draft = Draft()
        for i in range(draw(st.integers(0, max_nodes))):
            parent = draw(st.integers(-1, i - 1))
            draft.add(parent, draw(st.integers(0, vocab - 1)), draw(scores), draw(st.integers(0, 2)), i)
        out[name] = draft
    return out


def node_sequences(parents, tokens) -> list[tuple[int, ...]]:
    """Token path of every node (root excluded from the path) from parent links, by definition."""
    seqs = []
    for i in range(len(tokens)):
        chain, j = [], i
        while parents[j] >= 0:
            chain.append(tokens[j])
            j = parents[j]
        seqs.append(tuple(reversed(chain)))
    return seqs


def draft_sequences(draft: Draft) -> list[tuple[int, ...]]:
    seqs: list[tuple[int, ...]] = []
    for parent, token in zip(draft.parents, draft.tokens, strict=True):
        seqs.append((seqs[parent] if parent >= 0 else ()) + (token,))
    return seqs


def chain_of(parents, i) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = parents[i]
    return out



@st.composite
def tree_templates(draw, max_nodes: int = 12, max_depth: int = 4, max_rank: int = 4, max_retrieval: int = 5,
                   max_recycling: int = 6):
    """A random valid template: rank paths closed under prefixes, a retrieval chain of random depth and a
    random number of recycling nodes."""
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(0, max_nodes))):
        parents = [()] + [p for p in paths if len(p) < max_depth]
        parent = draw(st.sampled_from(parents))
        child = parent + (draw(st.integers(0, max_rank)),)
        if child not in paths:
            paths.append(child)
    retrieval = draw(st.integers(0, max_retrieval))
    recycling = draw(st.integers(0, max_recycling))
    return TreeTemplate(tuple(draw(st.permutations(paths))), retrieval, recycling=recycling)
