"""Draft sources: the incremental retrieval (prompt lookup) index and source, the Jacobi table and the
recycling adjacency table, alone and as the engine drives them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import msn
from msn.decoding.costs import Latency
from msn.decoding.engine import DecoderState, decoder_state
from msn.decoding.sources import (
    Budget,
    JacobiSource,
    PromptLogits,
    RecyclingSource,
    RetrievalSource,
    VerifiedStep,
)
from msn.decoding.sources.jacobi import NOISE
from msn.decoding.sources.retrieval import PRIOR, RetrievalIndex, streak_bucket


def verified(tokens=(0,), *, rejected=(), new_tokens=(), committed=(0,), top_ids=None, top_probs=None,
             vocab: int = 50, accepted=()) -> VerifiedStep:
    n = len(tokens)
    return VerifiedStep(
        tokens=list(tokens), parents=[-1] + [i - 1 for i in range(1, n)], logits=torch.zeros(n, vocab),
        top_ids=top_ids, top_probs=top_probs, accepted=list(accepted), rejected=list(rejected),
        new_tokens=list(new_tokens), committed=torch.tensor(list(committed)), generator=torch.Generator(),
    )


def draft_paths(draft) -> list[tuple[int, ...]]:
    seqs: list[tuple[int, ...]] = []
    for parent, token in zip(draft.parents, draft.tokens, strict=True):
        assert parent < len(seqs), "parents before children"
        seqs.append((seqs[parent] if parent >= 0 else ()) + (token,))
    return seqs


# ---------------------------------------------------------------------------------------------------------
# Retrieval index


def reference_match(ids: list[int], max_ngram: int = 3) -> tuple[int, int, int]:
    """Rescan: the longest suffix (<= max_ngram) that occurred earlier with a following token; its earliest
    and latest continuation starts."""
    for n in range(min(max_ngram, len(ids)), 0, -1):
        suffix = ids[-n:]
        starts = [j + n for j in range(len(ids) - n) if ids[j : j + n] == suffix]
        if starts:
            return n, starts[0], starts[-1]
    return 0, -1, -1


def reference_draft(ids: list[int], depth: int, max_ngram: int = 3) -> list[int]:
    n, first, _ = reference_match(ids, max_ngram)
    return ids[first : first + depth] if n else []


def index_of(ids: list[int], max_ngram: int = 3) -> RetrievalIndex:
    r = RetrievalIndex(max_ngram)
    r.extend(ids)
    return r


def test_longest_suffix_wins():
    # suffix (1, 2, 3) occurs once (followed by 7); the 2-gram (2, 3) occurs earlier (followed by 9)
    ids = [2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert index_of(ids).draft(3) == [7, 8, 1]
    assert index_of(ids).match() == (3, 7, 7)


def test_match_is_capped_at_max_ngram():
    # a 4-gram match exists only later; a 3-gram match occurs earlier: the 3-gram (earliest) wins
    ids = [5, 6, 7, 40, 4, 5, 6, 7, 50, 4, 5, 6, 7]
    assert index_of(ids).draft(2) == [40, 4]
    assert index_of(ids, max_ngram=4).draft(2) == [50, 4]


def test_earliest_match_wins_and_latest_is_known():
    ids = [1, 2, 10, 11, 1, 2, 20, 21, 1, 2]
    assert index_of(ids).draft(2) == [10, 11]
    assert index_of(ids).match() == (2, 2, 6)


def test_no_match_and_short_chains():
    assert index_of([1, 2, 3]).draft(4) == []
    assert index_of([1, 2, 3]).match() == (0, -1, -1)
    assert index_of([]).draft(4) == []
    assert index_of([4, 4]).draft(4) == [4]  # the continuation is cut at the end of the text
    assert index_of([1, 2, 9, 1, 2]).draft(5) == [9, 1, 2]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), max_size=6), max_size=8), st.integers(1, 6), st.integers(1, 4))
def test_incremental_index_equals_rebuild_and_rescan(chunks, depth, max_ngram):
    inc = RetrievalIndex(max_ngram)
    text: list[int] = []
    for chunk in chunks:
        inc.extend(chunk)
        text += chunk
        assert inc.ids == text
        assert inc.match() == index_of(text, max_ngram).match() == reference_match(text, max_ngram)
        assert inc.draft(depth) == reference_draft(text, depth, max_ngram)
    rebuilt = index_of(text, max_ngram)
    assert (inc.first, inc.last) == (rebuilt.first, rebuilt.last)


# ---------------------------------------------------------------------------------------------------------
# Retrieval source


def retrieval(prompt: list[int], **kw) -> RetrievalSource:
    src = RetrievalSource(**kw)
    src.begin(torch.tensor(prompt), None, torch.Generator())
    return src


def test_retrieval_proposes_earliest_then_latest_chain():
    prompt = [1, 2, 10, 11, 12, 1, 2, 20, 21, 1, 2]
    src = retrieval(prompt)
    draft = src.propose(torch.tensor(prompt), Budget(max_depth=100))
    first, last = prompt[2:], prompt[7:]
    paths = draft_paths(draft)
    assert paths == [tuple(first[:d]) for d in range(1, len(first) + 1)] + [
        tuple(last[:d]) for d in range(1, len(last) + 1)
    ], "two chains from the root: the earliest match's, then the latest's"
    assert draft.scores == [PRIOR[2]] * len(draft)
    # bucket: (depth capped at 8, match length, streak of the last step's chain: none yet)
    assert draft.buckets == [(min(d, 8), 2, 0) for d in range(1, len(first) + 1)] + [
        (min(d, 8), 2, 0) for d in range(1, len(last) + 1)
    ]
    assert draft.tags == [("retrieval", d) for d in range(1, len(first) + 1)] + [None] * len(last)
    assert src.last_chain == len(first)


def test_retrieval_bucket_carries_how_far_the_last_chain_was_accepted():
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 5, 6, 7]
    src = retrieval(prompt)
    draft = src.propose(torch.tensor(prompt), Budget(max_depth=100))
    assert draft.tokens[:3] == [8, 9, 10] and {b[2] for b in draft.buckets} == {0}
    step = type("Step", (), {"new_tokens": [8, 9, 10, 11, 12, 99]})()  # 5 chain tokens committed, then a miss
    src.observe(step)
    assert src.streak == 5
    again = src.propose(torch.tensor(prompt + step.new_tokens), Budget(max_depth=100))
    assert {b[2] for b in again.buckets} <= {streak_bucket(5)} and streak_bucket(5) == 2
    assert [streak_bucket(a) for a in (0, 1, 2, 3, 7, 8, 16)] == [0, 1, 1, 2, 2, 3, 3]


def test_retrieval_one_chain_when_earliest_is_latest():
    prompt = [7, 1, 2, 3, 9, 1, 2, 3]
    draft = retrieval(prompt).propose(torch.tensor(prompt), Budget(max_depth=100))
    assert draft.tokens == [9, 1, 2, 3] and draft.parents == [-1, 0, 1, 2]
    assert draft.scores == [PRIOR[3]] * 4
    # branches=1: only the earliest chain even when the latest differs
    prompt = [1, 2, 10, 11, 1, 2, 20, 1, 2]
    draft = retrieval(prompt, branches=1).propose(torch.tensor(prompt), Budget(max_depth=100))
    assert draft.tokens == prompt[2:]


def test_retrieval_chain_is_at_most_16_deep_and_cut_at_the_budget():
    unit = [3, 4, 5, 6, 7]
    prompt = unit * 6
    src = retrieval(prompt)
    draft = src.propose(torch.tensor(prompt), Budget(max_depth=100))
    # earliest match of (5, 6, 7) continues at 5 (16 tokens kept), the latest at 25 (5 tokens to the end)
    assert draft.tokens == prompt[5:21] + prompt[25:] and src.last_chain == 16
    assert draft.parents == [-1, *range(15), -1, *range(16, 20)]
    cut = src.propose(torch.tensor(prompt), Budget(max_depth=3))
    assert cut.tokens == prompt[5:8] + prompt[25:28] and src.last_chain == 16, "last_chain: before the cut"
    assert len(src.propose(torch.tensor(prompt), Budget(max_depth=0))) == 0


def test_retrieval_static_depth_gives_one_chain():
    prompt = [1, 2, 10, 11, 12, 1, 2, 20, 21, 1, 2]
    src = retrieval(prompt)
    draft = src.propose(torch.tensor(prompt), Budget(max_depth=100, shape=4))
    assert draft.tokens == [10, 11, 12, 1] and draft.parents == [-1, 0, 1, 2]
    assert draft.tags == [("retrieval", d) for d in range(1, 5)]
    assert src.propose(torch.tensor(prompt), Budget(max_depth=2, shape=4)).tokens == [10, 11]


def test_retrieval_no_match_and_observe_extends_the_index():
    prompt = [1, 2, 3]
    src = retrieval(prompt)
    assert len(src.propose(torch.tensor(prompt), Budget(max_depth=10))) == 0 and src.last_chain == 0
    src.observe(verified(new_tokens=[4, 2]))
    assert src.index.ids == [1, 2, 3, 4, 2]
    assert src.propose(torch.tensor(src.index.ids), Budget(max_depth=10)).tokens == [3, 4, 2]
    # begin() starts a new index
    src.begin(torch.tensor([8, 9]), None, torch.Generator())
    assert src.index.ids == [8, 9]


# ---------------------------------------------------------------------------------------------------------
# Jacobi source


def jacobi(depth: int, top_k: int, prompt, seed: int = 0, shape=None) -> JacobiSource:
    src = JacobiSource(depth, top_k, shape=shape)
    src.begin(torch.tensor(prompt), None, torch.Generator().manual_seed(seed))
    return src


def test_begin_draws_from_the_prompt():
    src = jacobi(4, 6, [11, 12, 13])
    assert src.table.shape == (4, 6) and src.probs.shape == (4, 6)
    assert set(src.table.flatten().tolist()) <= {11, 12, 13}
    assert not src.probs.any()


def test_observe_takes_topk_at_rejected_rows_then_padding_noise():
    src = jacobi(4, 3, [1])
    n, k = 6, 5
    top_ids = torch.arange(n * k).view(n, k) + 100
    top_probs = torch.rand(n, k)
    committed = [7, 8, 9, 7]
    src.observe(verified(range(n), rejected=[4, 2], committed=committed, top_ids=top_ids, top_probs=top_probs))
    assert torch.equal(src.table[:2], top_ids[[4, 2], :3])
    assert torch.equal(src.probs[:2], top_probs[[4, 2], :3])
    assert set(src.table[2:].flatten().tolist()) <= {7, 8, 9} and not src.probs[2:].any()
    # more rejected positions than depths: only the first `depth` are used
    src.observe(verified(range(n), rejected=[5, 4, 3, 2, 1], committed=committed, top_ids=top_ids,
                         top_probs=top_probs))
    assert torch.equal(src.table, top_ids[[5, 4, 3, 2], :3])
    # none: all noise
    src.observe(verified(range(n), rejected=[], committed=committed, top_ids=top_ids, top_probs=top_probs))
    assert src.table.shape == (4, 3) and set(src.table.flatten().tolist()) <= {7, 8, 9}
    assert not src.probs.any()


def test_noise_is_reproducible_with_a_seed():
    committed = list(range(100, 200))

    def tables(seed):
        src = jacobi(3, 5, committed, seed)
        out = [src.table.clone()]
        src.observe(verified(range(2), rejected=[1], committed=committed, top_ids=torch.ones(2, 5, dtype=torch.long),
                             top_probs=torch.ones(2, 5)))
        return out + [src.table.clone()]

    a, b, c = tables(1), tables(1), tables(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1][1:], c[1][1:])


def test_propose_follows_the_shape_and_the_budget():
    src = jacobi(3, 3, [1])
    src.configure(((0,), (1,), (0, 0), (0, 2), (0, 0, 0)))
    assert (src.depth, src.top_k, src.top_k_needed) == (3, 3, 3)
    src.table = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32]])
    src.probs = torch.tensor([[0.5, 0.25, 0.0], [0.95, 0.0, 0.1], [0.0, 0.0, 0.0]])
    shape = ((0,), (1,), (0, 0), (0, 2), (0, 0, 0))
    draft = src.propose(torch.tensor([1]), Budget(max_depth=10, shape=shape))
    assert draft_paths(draft) == [(10,), (11,), (10, 20), (10, 22), (10, 20, 30)]
    assert draft.scores == [0.5, 0.25, pytest.approx(0.95), pytest.approx(0.1), 0.0]
    assert draft.buckets == [(1, 5), (1, 2), (2, 9), (2, 1), (3, NOISE)]
    assert draft.tags == [("jacobi", p) for p in shape]
    cut = src.propose(torch.tensor([1]), Budget(max_depth=1, shape=shape))
    assert draft_paths(cut) == [(10,), (11,)]
    assert len(src.propose(torch.tensor([1]), Budget(max_depth=0, shape=shape))) == 0
    # ranks beyond the table or depths beyond it are skipped (with everything below them)
    wide = ((0,), (5,), (5, 0), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    assert draft_paths(src.propose(torch.tensor([1]), Budget(max_depth=10, shape=wide))) == [
        (10,), (10, 20), (10, 20, 30)
    ]


def test_auto_mode_uses_the_official_table():
    src = JacobiSource()
    src.configure(None)
    assert (src.depth, src.top_k) == (5, 10)
    src.begin(torch.arange(3, 60), None, torch.Generator().manual_seed(0))
    draft = src.propose(torch.tensor([1]), Budget(max_depth=100))
    assert len(draft) == 63  # the whole mc_sim_7b_63 template
    assert {t[1] for t in draft.tags} == set(src.auto_shape)
    capped = src.propose(torch.tensor([1]), Budget(max_depth=100, max_nodes=7))
    assert [t[1] for t in capped.tags] == list(src.auto_shape[:7]), "the official tree's likeliest paths first"
    assert len(src.propose(torch.tensor([1]), Budget(max_depth=100, max_nodes=0))) == 0
    src.configure(((0,), (0, 0)))
    assert (src.depth, src.top_k) == (2, 1)


# ---------------------------------------------------------------------------------------------------------
# Recycling source


def recycling_with(table: dict[int, list[tuple[int, float]]], vocab: int = 20, k: int = 3, **kw) -> RecyclingSource:
    src = RecyclingSource(k=k, **kw)
    src._ensure(vocab)
    for tok, succ in table.items():
        for j, (t, p) in enumerate(succ):
            src.next_ids[tok, j], src.next_probs[tok, j] = t, p
    return src


def test_observe_records_topk_successors_per_input_token_last_write_wins():
    src = RecyclingSource(k=2)
    assert len(src.propose(torch.tensor([5]), Budget(max_depth=5))) == 0, "nothing recorded yet"
    ids = torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.9, 0.05, 0.05]])
    src.observe(verified([5, 6, 3], top_ids=ids, top_probs=probs))
    assert src.next_ids.shape == (50, 2)
    assert src.next_ids[5].tolist() == [7, 8] and src.next_ids[6].tolist() == [10, 11]
    assert src.next_ids[3].tolist() == [13, 14]
    np.testing.assert_allclose(src.next_probs[5], [0.6, 0.3])
    assert (src.next_ids[[0, 1, 2, 4, 49]] == -1).all(), "untouched rows stay empty"
    # a later step overwrites; within a step, the later row of a repeated token wins
    src.observe(verified([6, 5, 6], top_ids=ids.flip(0), top_probs=probs.flip(0)))
    assert src.next_ids[6].tolist() == [7, 8] and src.next_ids[5].tolist() == [10, 11]
    assert src.next_ids[3].tolist() == [13, 14]


def test_begin_records_the_prefill_predictions():
    src = RecyclingSource(k=2)
    prompt = torch.tensor([4, 9, 4, 7])
    rows = src.prompt_rows(prompt[:-1])
    assert rows.tolist() == [1, 2], "the last occurrence of each token id, sorted (4's first row is overwritten)"
    logits = torch.randn(2, 30)
    src.begin(prompt, PromptLogits(rows, logits), torch.Generator())
    vals, ids = logits.topk(2, dim=-1)
    assert src.next_ids[9].tolist() == ids[0].tolist() and src.next_ids[4].tolist() == ids[1].tolist()
    np.testing.assert_allclose(src.next_probs[9], vals[0].softmax(-1).numpy(), rtol=1e-6)
    assert (src.next_ids[7] == -1).all(), "the last prompt token has no prefill prediction"


def test_prompt_rows_keep_the_latest_distinct_ids_of_a_long_prompt():
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    assert RecyclingSource().prompt_rows(prompt).tolist() == [2, 3, 5, 6, 7, 9, 10], "each id's last occurrence"
    assert RecyclingSource(prompt_rows=3).prompt_rows(prompt).tolist() == [7, 9, 10]
    assert RecyclingSource(prompt_rows=5).prompt_rows(prompt).tolist() == [5, 6, 7, 9, 10], "the latest five"
    assert RecyclingSource(prompt_rows=0).prompt_rows(prompt) is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_computes_logits_only_where_a_source_asked(family, monkeypatch):
    """The table built from the prompt equals the one built from every prompt position's logits."""
    model = tiny_model(family, seed=3)
    prompt = torch.tensor([[5, 6, 5, 8, 9, 6, 10, 5, 11]])
    tables, original = [], RecyclingSource.begin

    def spy(self, prompt, prefill_logits, generator):
        original(self, prompt, prefill_logits, generator)
        tables.append(self.next_ids.copy())

    monkeypatch.setattr(RecyclingSource, "begin", spy)
    msn.generate(model, prompt, max_new_tokens=1, method="recycling", state=DecoderState())
    with torch.inference_mode():
        full = model(prompt[:, :-1]).logits[0].float()
    expected = RecyclingSource()
    expected._ensure(full.shape[-1])
    vals, ids = full.topk(8, dim=-1)
    for pos, tok in enumerate(prompt[0, :-1].tolist()):  # later rows overwrite earlier ones
        expected.next_ids[tok] = ids[pos].numpy()
    assert len(tables) == 1
    # the best two per row (lower ranks may swap on near-ties: a matmul over fewer rows rounds differently)
    assert np.array_equal(tables[0][:, :2], expected.next_ids[:, :2])


def all_paths(src: RecyclingSource, root: int, max_depth: int) -> list[float]:
    """Path probability of every path through the table from ``root``, up to max_depth."""
    out, frontier = [], [(root, 1.0)]
    for _ in range(max_depth):
        nxt = []
        for tok, q in frontier:
            for t, p in zip(src.next_ids[tok].tolist(), src.next_probs[tok].tolist(), strict=True):
                if t >= 0:
                    nxt.append((t, q * p))
        out += [q for _, q in nxt]
        frontier = nxt
    return out


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_propose_is_best_first_by_path_probability(data):
    vocab, k = 6, 3
    table = {}
    for tok in range(vocab):
        succ = data.draw(st.lists(st.integers(0, vocab - 1), max_size=k, unique=True))
        table[tok] = [(t, data.draw(st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0]))) for t in succ]
    max_nodes, max_depth = data.draw(st.integers(0, 12)), data.draw(st.integers(1, 4))
    src = recycling_with(table, vocab, k, max_nodes=max_nodes, max_depth=max_depth)
    budget_depth = data.draw(st.integers(0, 5))
    static = data.draw(st.none() | st.integers(0, 12))
    root = data.draw(st.integers(0, vocab - 1))
    draft = src.propose(torch.tensor([9, root]), Budget(max_depth=budget_depth, shape=static))
    limit = max_nodes if static is None else static
    depth_cap = min(max_depth, budget_depth)
    paths = draft_paths(draft)  # also checks parents before children
    q = []
    for i, (parent, tok, p) in enumerate(zip(draft.parents, draft.tokens, draft.scores, strict=True)):
        prev = draft.tokens[parent] if parent >= 0 else root
        assert dict(table[prev])[tok] == pytest.approx(p), "follows the table"
        q.append((q[parent] if parent >= 0 else 1.0) * p)
        assert draft.tags[i] == ("recycling", i)
    assert all(len(s) <= depth_cap for s in paths)
    assert q == sorted(q, reverse=True), "best first"
    reference = sorted(all_paths(src, root, depth_cap), reverse=True)[:limit]
    assert q == pytest.approx(reference), "the `limit` most probable paths"


def test_propose_respects_max_nodes_and_depth():
    table = {1: [(2, 0.75), (3, 0.25)], 2: [(1, 0.75), (4, 0.125)], 3: [(1, 0.5)], 4: [(1, 1.0)]}
    src = recycling_with(table, 10, 2, max_nodes=5, max_depth=3)
    draft = src.propose(torch.tensor([1]), Budget(max_depth=10))
    # path probabilities .75, .5625, .421875, .25, .140625 (then (3, 1) .125, (2, 4) .09375, ...)
    assert draft_paths(draft) == [(2,), (2, 1), (2, 1, 2), (3,), (2, 1, 3)]
    assert draft.scores == [0.75, 0.75, 0.75, 0.25, 0.25]
    assert draft.buckets == [(1, 7), (2, 7), (3, 7), (1, 2), (3, 2)]
    assert draft_paths(src.propose(torch.tensor([1]), Budget(max_depth=1))) == [(2,), (3,)]
    assert len(src.propose(torch.tensor([1]), Budget(max_depth=10, shape=2))) == 2
    assert len(src.propose(torch.tensor([5]), Budget(max_depth=10))) == 0, "nothing recorded for 5"
    # the engine's cap on what is worth proposing: the likeliest first, 0 is none, a static shape ignores it
    assert draft_paths(src.propose(torch.tensor([1]), Budget(max_depth=10, max_nodes=3))) == [(2,), (2, 1), (2, 1, 2)]
    assert len(src.propose(torch.tensor([1]), Budget(max_depth=10, max_nodes=0))) == 0
    assert len(src.propose(torch.tensor([1]), Budget(max_depth=10, max_nodes=50))) == 5, "its own max_nodes"
    assert len(src.propose(torch.tensor([1]), Budget(max_depth=10, shape=2, max_nodes=1))) == 2


def test_recycling_table_lives_across_requests():
    model = tiny_model("llama", seed=4)
    state = decoder_state(model)
    assert decoder_state(model) is state
    src = state.sources["recycling"]
    assert src.next_ids is None
    ids = torch.tensor([[5, 9, 14, 5, 9, 20, 21]])
    msn.generate(model, ids, max_new_tokens=8, method="recycling", tree={"recycling": 4}, eos_token_id=[])
    assert src is decoder_state(model).sources["recycling"]
    before = src.next_ids.copy()
    recorded = [t for t in range(before.shape[0]) if (before[t] >= 0).any()]
    assert recorded
    # a one-token prompt has no prefill: its first step drafts only from what the earlier request recorded
    tok = recorded[0]
    out = msn.generate(model, torch.tensor([[tok]]), max_new_tokens=3, method="recycling", tree={"recycling": 4},
                       eos_token_id=[])
    assert out.tree_sizes[0] == 4 and out.nodes_by_source["recycling"][0] == 4
    ref = msn.generate(model, torch.tensor([[tok]]), max_new_tokens=3, method="ar")
    assert torch.equal(out.sequences, ref.sequences)
    seen = set(out.sequences[0].tolist())
    untouched = [t for t in recorded if t not in seen]
    assert all((src.next_ids[t] == before[t]).all() for t in untouched)
    # a model of its own has its own (empty) table
    fresh = tiny_model("llama", seed=4)
    out = msn.generate(fresh, torch.tensor([[tok]]), max_new_tokens=3, method="recycling", tree={"recycling": 4},
                       eos_token_id=[])
    assert out.tree_sizes[0] == 0


# ---------------------------------------------------------------------------------------------------------
# The engine and the sources


def test_engine_feeds_jacobi_the_rejected_positions_of_the_best_path(monkeypatch):
    """With a single Jacobi chain the best path is the chain: after accepting n drafts, the table's fresh
    rows are the top-k of the tree logits at chain nodes n+1.. (their inputs were wrong)."""
    model = tiny_model("llama", seed=1)
    steps_seen = []
    original = JacobiSource.observe

    def spy(self, step):
        original(self, step)
        steps_seen.append((step, self.table.clone()))

    logits_seen = []
    h = model.register_forward_hook(lambda m, a, out: logits_seen.append(out.logits[0].float().clone()))
    monkeypatch.setattr(JacobiSource, "observe", spy)
    try:
        out = msn.generate(model, torch.tensor([[5, 9, 14, 5, 9]]), max_new_tokens=12, method="jacobi",
                           tree={"jacobi": [[0], [0, 0], [0, 0, 0]]}, eos_token_id=[])
    finally:
        h.remove()
    lengths = out.accept_lengths
    assert len(steps_seen) == len(lengths) and len(logits_seen) == len(lengths) + 1  # + the prefill
    for s, ((step, table), n_new) in enumerate(zip(steps_seen, lengths, strict=True)):
        logits = logits_seen[s + 1]
        accepted = n_new - 1
        chain_len = min(3, 12 - sum(lengths[:s]) - 1)
        assert logits.shape[0] == chain_len + 1 == len(step.tokens)
        torch.testing.assert_close(step.logits, logits, rtol=0, atol=0)
        assert step.parents == list(range(-1, chain_len))
        assert step.accepted == list(range(1, accepted + 1))
        assert step.rejected == list(range(accepted + 1, chain_len + 1))
        assert step.new_tokens == out.sequences[0, 5 + sum(lengths[:s]) : 5 + sum(lengths[: s + 1])].tolist()
        assert torch.equal(step.committed, out.sequences[0, : 5 + sum(lengths[: s + 1])])
        assert torch.equal(step.top_ids, logits.topk(1, dim=-1).indices)
        fresh = len(step.rejected)
        assert torch.equal(table[:fresh, 0], logits[step.rejected].argmax(-1))
        assert set(table[fresh:].flatten().tolist()) <= set(step.committed.tolist())
    assert any(step.rejected for step, _ in steps_seen), "precondition: some steps have rejected nodes"


def test_engine_caps_what_sources_propose_by_the_curve(monkeypatch):
    """Auto tree: each step's budget carries the curve's proposal cap at that step's past, and a steep curve
    makes the recycling and Jacobi fragments that small; the text stays greedy's."""
    model = tiny_model("llama", seed=1)
    state = DecoderState()
    steep = Latency({0: 0.010, 3: 0.020, 64: 0.200})  # twice a plain step at 3 nodes
    state.latencies["packed"] = state.latencies["eager"] = steep
    seen = []
    for cls in (RecyclingSource, JacobiSource):
        original = cls.propose

        def spy(self, committed, budget, original=original):
            draft = original(self, committed, budget)
            seen.append((budget.max_nodes, steep.proposal_cap(len(committed) - 1), len(draft)))
            return draft

        monkeypatch.setattr(cls, "propose", spy)
    ids = torch.tensor([[5, 9, 14, 5, 9, 14, 2, 7]])
    out = msn.generate(model, ids, max_new_tokens=16, eos_token_id=[], state=state)
    assert seen and all(cap == want and size <= cap for cap, want, size in seen)
    assert min(cap for cap, _, _ in seen) <= 4, "the cap binds (the sources' own limits are 48 and 63)"
    ref = msn.generate(model, ids, max_new_tokens=16, method="ar", eos_token_id=[])
    assert torch.equal(out.sequences, ref.sequences)


def test_engine_top_probs_are_renormalised_over_k(monkeypatch):
    model = tiny_model("qwen2", seed=1)
    steps = []
    original = RecyclingSource.observe
    monkeypatch.setattr(RecyclingSource, "observe", lambda self, step: (steps.append(step), original(self, step)))
    msn.generate(model, torch.tensor([[5, 9, 14, 5, 9]]), max_new_tokens=6, method="tr-jacobi",
                 tree={"jacobi": [[0], [1]], "recycling": 3}, eos_token_id=[])
    assert steps
    for step in steps:
        k = step.top_ids.shape[1]
        assert k == 8  # recycling's k, more than the Jacobi table needs
        vals, ids = step.logits.topk(k, dim=-1)
        assert torch.equal(step.top_ids, ids)
        torch.testing.assert_close(step.top_probs, vals.softmax(-1))


def test_whole_decode_is_reproducible_with_a_seed(monkeypatch):
    model = tiny_model("qwen2", seed=2)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    tables = []
    original = JacobiSource.begin

    def spy(self, prompt, prefill_logits, generator):
        original(self, prompt, prefill_logits, generator)
        tables.append(self.table.clone())

    monkeypatch.setattr(JacobiSource, "begin", spy)
    runs = [msn.generate(model, ids, max_new_tokens=20, method="jacobi", tree="official-68", seed=s)
            for s in (0, 0, 1)]
    assert runs[0].accept_lengths == runs[1].accept_lengths
    assert runs[0].tree_sizes == runs[1].tree_sizes
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].sequences, runs[2].sequences), "the seed never changes the output"
    assert torch.equal(tables[0], tables[1])
    assert not torch.equal(tables[0], tables[2]), "another seed draws other padding noise"
    assert all(set(t.flatten().tolist()) <= set(ids[0].tolist()) for t in tables)



@pytest.mark.parametrize("sample", [{}, {"do_sample": True, "temperature": 0.8, "seed": 5}], ids=["greedy", "sampled"])
def test_jacobi_on_a_vocabulary_smaller_than_its_top_k(sample):
    """Issue 36 item 10: a vocab-8 model has 8 candidates where the table holds 10; the rest is padding noise
    (it crashed in torch.cat), and every method that includes Jacobi still gives ar's text."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 6]])
    ref = msn.generate(model, ids, max_new_tokens=20, method="ar", eos_token_id=[], **sample).sequences
    for method in ("jacobi", "tr-jacobi"):
        out = msn.generate(model, ids, max_new_tokens=20, method=method, eos_token_id=[], **sample)
        assert torch.equal(out.sequences, ref), method
    source = JacobiSource()
    source.begin(ids[0], None, torch.Generator().manual_seed(0))
    source.observe(verified((0, 1, 2), rejected=(1, 2), committed=(3, 4, 5), vocab=8,
                            top_ids=torch.arange(8).repeat(3, 1), top_probs=torch.full((3, 8), 0.125)))
    assert source.table.shape == source.probs.shape == (5, 10)
    assert source.table[:2, :8].tolist() == [list(range(8))] * 2 and source.probs[:2, 8:].eq(0).all()
