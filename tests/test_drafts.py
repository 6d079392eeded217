"""Draft sources: the Jacobi candidate table and the incremental retrieval (prompt lookup) index."""

from __future__ import annotations

import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import msn
from msn.decoding import engine
from msn.decoding.drafts import JacobiTable, RetrievalIndex

# ---------------------------------------------------------------------------------------------------------
# Retrieval


def reference_draft(ids: list[int], depth: int, max_ngram: int = 3) -> list[int]:
    """Rescan: the longest suffix (<= max_ngram) that occurred earlier with a following token; earliest wins."""
    for n in range(min(max_ngram, len(ids)), 0, -1):
        suffix = ids[-n:]
        for j in range(len(ids) - n):  # j + n < len(ids): a following token exists
            if ids[j : j + n] == suffix:
                return ids[j + n : j + n + depth]
    return []


def index_of(ids: list[int], depth: int = 5) -> RetrievalIndex:
    r = RetrievalIndex(depth)
    r.extend(ids)
    return r


def test_longest_suffix_wins():
    # suffix (1, 2, 3) occurs once (followed by 7); the 2-gram (2, 3) occurs earlier (followed by 9)
    ids = [2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert index_of(ids, 3).draft() == [7, 8, 1]


def test_match_is_capped_at_three_tokens():
    # a 4-gram match exists only later; a 3-gram match occurs earlier: the 3-gram (earliest) wins
    ids = [5, 6, 7, 40, 4, 5, 6, 7, 50, 4, 5, 6, 7]
    assert index_of(ids, 2).draft() == [40, 4]


def test_earliest_match_wins():
    ids = [1, 2, 10, 11, 1, 2, 20, 21, 1, 2]
    assert index_of(ids, 2).draft() == [10, 11]


def test_no_match_and_short_chains():
    assert index_of([1, 2, 3], 4).draft() == []
    assert index_of([], 4).draft() == []
    assert index_of([4, 4], 4).draft() == [4]  # the continuation is cut at the end of the text
    assert index_of([1, 2, 9, 1, 2], 5).draft() == [9, 1, 2]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 4), max_size=6), max_size=8),
    st.integers(1, 6),
)
def test_incremental_index_equals_rebuild_and_rescan(chunks, depth):
    inc = RetrievalIndex(depth)
    text: list[int] = []
    for chunk in chunks:
        inc.extend(chunk)
        text += chunk
        assert inc.ids == text
        assert inc.draft() == index_of(text, depth).draft() == reference_draft(text, depth)
    assert inc.first == index_of(text, depth).first


# ---------------------------------------------------------------------------------------------------------
# Jacobi table


def test_reset_draws_from_the_prompt():
    prompt = torch.tensor([11, 12, 13])
    t = JacobiTable(4, 6, torch.Generator().manual_seed(0))
    t.reset(prompt)
    assert t.table.shape == (4, 6)
    assert set(t.table.flatten().tolist()) <= {11, 12, 13}


def test_fresh_topk_then_padding_noise_from_committed_ids():
    t = JacobiTable(4, 3, torch.Generator().manual_seed(0))
    logits = torch.randn(2, 50)
    committed = torch.tensor([7, 8, 9, 7])
    t.update(logits, committed)
    assert torch.equal(t.table[:2], logits.topk(3, dim=-1).indices)
    assert set(t.table[2:].flatten().tolist()) <= {7, 8, 9}
    # more rejected positions than depths: only the first `depth` are used
    many = torch.randn(6, 50)
    t.update(many, committed)
    assert torch.equal(t.table, many[:4].topk(3, dim=-1).indices)
    # none: all noise
    t.update(torch.zeros(0, 50), committed)
    assert t.table.shape == (4, 3) and set(t.table.flatten().tolist()) <= {7, 8, 9}


def test_noise_is_reproducible_with_a_seed():
    committed = torch.arange(100, 200)

    def tables(seed):
        t = JacobiTable(3, 5, torch.Generator().manual_seed(seed))
        t.reset(committed)
        out = [t.table.clone()]
        t.update(torch.randn(1, 300, generator=torch.Generator().manual_seed(9)), committed)
        return out + [t.table.clone()]

    a, b, c = tables(1), tables(1), tables(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert not torch.equal(a[0], c[0])


def test_engine_feeds_the_rejected_positions_of_the_best_path(monkeypatch):
    """With a single Jacobi chain the best path is the chain: after accepting n drafts, the table's fresh
    rows are the top-k of the tree logits at chain nodes n+1.. (their inputs were wrong)."""
    model = tiny_model("llama", seed=1)
    calls = []

    class Spy(JacobiTable):
        def update(self, rejected_logits, committed):
            calls.append(rejected_logits.clone())
            super().update(rejected_logits, committed)
            calls.append(self.table.clone())

    logits_seen = []
    h = model.register_forward_hook(lambda m, a, out: logits_seen.append(out.logits[0].clone()))
    monkeypatch.setattr(engine, "JacobiTable", Spy)
    try:
        out = msn.generate(
            model,
            torch.tensor([[5, 9, 14, 5, 9]]),
            max_new_tokens=12,
            method="jacobi",
            tree={"jacobi": [[0], [0, 0], [0, 0, 0]]},
            eos_token_id=[],
        )
    finally:
        h.remove()
    steps = out.accept_lengths
    assert len(calls) == 2 * len(steps)
    for s, n_new in enumerate(steps):
        logits = logits_seen[s + 1]  # forward 0 is the prefill
        accepted = n_new - 1
        remaining = 12 - sum(steps[:s])
        chain_len = min(3, remaining - 1)
        assert logits.shape[0] == chain_len + 1
        rejected = logits[accepted + 1 : chain_len + 1]
        torch.testing.assert_close(calls[2 * s], rejected, rtol=0, atol=0)
        table = calls[2 * s + 1]
        assert torch.equal(table[: rejected.shape[0], 0], rejected.argmax(-1))


def test_whole_decode_is_reproducible_with_a_seed():
    model = tiny_model("qwen2", seed=2)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    runs = [
        msn.generate(model, ids, max_new_tokens=20, method="jacobi", tree="official-68", seed=s)
        for s in (0, 0)
    ]
    assert runs[0].accept_lengths == runs[1].accept_lengths
    assert torch.equal(runs[0].sequences, runs[1].sequences)
