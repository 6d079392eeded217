"""Greedy acceptance and argmax, on synthetic tries and against a brute-force decode of every path of a
merged tree on real (tiny) models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model
from helpers import by_score, chain_of, draft_from_paths, draft_sequences, node_sequences, random_drafts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msn.decoding import trie as trie_mod
from msn.decoding import verify
from msn.decoding.cache import cache_keyword, new_cache
from msn.decoding.sources import Draft
from msn.decoding.trie import tree_mask as _tree_mask
from msn.decoding.verify import argmax_rows, greedy_accept, top_k_rows

# ---------------------------------------------------------------------------------------------------------
# greedy_accept, synthetic


def reference_accept(parents: list[int], tokens: list[int], predicted: list[int]) -> tuple[list[int], int]:
    """A node is accepted when every node on its path matches the argmax after its parent; the deepest
    accepted node's path is the answer and the bonus is the argmax after it."""
    ok = [all(tokens[c] == predicted[parents[c]] for c in chain_of(parents, i) - {0}) for i in range(len(tokens))]
    depth = [len(chain_of(parents, i)) - 1 for i in range(len(tokens))]
    deepest = max((i for i in range(len(tokens)) if ok[i]), key=lambda i: depth[i])
    path = sorted(chain_of(parents, deepest) - {0}, key=lambda i: depth[i])
    return path, predicted[deepest]


@settings(max_examples=300, deadline=None)
@given(random_drafts(), st.data())
def test_greedy_accept_matches_reference(drafts, data):
    trie = trie_mod.merge(0, drafts, by_score)
    tree = trie_mod.compact(trie, *trie_mod.select(trie, None))
    n = len(tree)
    predicted = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    acc = greedy_accept(tree.children, predicted)
    path, bonus = reference_accept(tree.parents, tree.tokens, predicted)
    assert (acc.accepted, acc.bonus) == (path, bonus)


def test_nothing_accepted_gives_root_argmax():
    children = [{7: 1, 8: 2}, {}, {}]
    acc = greedy_accept(children, [3, 3, 3])
    assert acc.accepted == [] and acc.bonus == 3


def test_the_root_token_is_never_accepted_as_a_draft():
    # root token 5, node 1 (token 7) predicts 5 next: a leaf, so 5 is the bonus, not a second accepted draft
    acc = greedy_accept([{7: 1}, {}], [7, 5])
    assert acc.accepted == [1] and acc.bonus == 5


def test_deep_path_through_the_matching_child():
    # root -> 1 (7) -> 3 (9) ; root -> 2 (8) -> 4 (9)
    children = [{7: 1, 8: 2}, {9: 3}, {9: 4}, {}, {}]
    assert greedy_accept(children, [8, 9, 9, 1, 2]).accepted == [2, 4]
    assert greedy_accept(children, [8, 9, 9, 1, 2]).bonus == 2
    assert greedy_accept(children, [7, 9, 9, 1, 2]).accepted == [1, 3]


# ---------------------------------------------------------------------------------------------------------
# argmax_rows


def test_argmax_rows_with_ties_at_different_positions():
    logits = torch.tensor(
        [
            [0.0, 5.0, 3.0, 5.0],  # tie between 1 and 3 -> 1
            [7.0, 1.0, 7.0, 7.0],  # triple tie -> 0
            [1.0, 2.0, 4.0, 4.0],  # tie at the end -> 2
            [9.0, 1.0, 2.0, 3.0],  # no tie
        ]
    )
    want = [1, 0, 2, 0]
    assert logits.argmax(-1).tolist() == want
    assert argmax_rows(logits) == want
    for k in (1, 2, 3, 4):
        assert argmax_rows(logits, *logits.topk(k, dim=-1)) == want
    # a top-k that lists the tied maxima in the other order (topk does not promise the first index)
    vals = torch.tensor([[5.0, 5.0], [7.0, 7.0], [4.0, 4.0], [9.0, 3.0]])
    ids = torch.tensor([[3, 1], [3, 2], [3, 2], [0, 3]])
    assert argmax_rows(logits, vals, ids) == want
    # without a tie the top-k's first id is used as is
    assert argmax_rows(logits[3:], vals[3:], ids[3:]) == [0]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_argmax_rows_equals_argmax(data):
    rows, vocab = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 9))
    values = data.draw(st.lists(st.integers(-2, 2), min_size=rows * vocab, max_size=rows * vocab))
    logits = torch.tensor(values, dtype=torch.float32).view(rows, vocab)  # few values: ties everywhere
    want = logits.argmax(-1).tolist()
    assert argmax_rows(logits) == want
    k = data.draw(st.integers(1, vocab))
    vals, ids = logits.topk(k, dim=-1)
    assert argmax_rows(logits, vals, ids) == want
    # shuffle equal values inside the top-k: still the first index of the maximum
    perm = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(i)) for i in range(rows)])
    same = vals.gather(1, perm) == vals
    ids2 = torch.where(same, ids.gather(1, perm), ids)
    assert argmax_rows(logits, vals, ids2) == want


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_blockwise_top_k_and_argmax_equal_torch_on_a_wide_vocabulary(data):
    """The block path (taken from 16 x k blocks wide) returns topk's values exactly and argmax's first index,
    with ties everywhere (few distinct values), across blocks and in the tail that fills no block."""
    rows, k = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 10))
    vocab = data.draw(st.sampled_from([16 * 10 * verify.BLOCK, 16 * 10 * verify.BLOCK + 77, 49_152, 50_001]))
    seed, spread = data.draw(st.integers(0, 10_000)), data.draw(st.sampled_from([2, 5, 1000]))
    logits = torch.randint(-spread, spread, (rows, vocab), generator=torch.Generator().manual_seed(seed)).float()
    if data.draw(st.booleans()):  # the row maximum also (or only) in the tail
        logits[:, -1] = logits.max() + data.draw(st.sampled_from([0.0, 1.0]))
    assert verify._blocked(logits, k), "the block path is the one under test"
    vals, ids = top_k_rows(logits, k)
    ref_vals, _ = logits.topk(k, dim=-1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(logits.gather(1, ids), vals), "ids point at their values"
    assert all(len(set(row)) == k for row in ids.tolist()), "k distinct columns"
    assert argmax_rows(logits) == logits.argmax(-1).tolist()
    assert argmax_rows(logits, vals, ids) == logits.argmax(-1).tolist()


def test_top_k_rows_is_torchs_own_below_the_block_width_or_switched_off(monkeypatch):
    logits = torch.randn(3, 1000)
    assert not verify._blocked(logits, 4)
    assert all(torch.equal(a, b) for a, b in zip(top_k_rows(logits, 4), logits.topk(4, dim=-1), strict=True))
    wide = torch.randn(2, 49_152)
    nan = torch.randn(3, 50_001)
    nan[0, 7], nan[1, -1], nan[2, 300], nan[2, -2] = float("nan"), float("nan"), float("nan"), float("nan")
    assert argmax_rows(nan) == nan.argmax(-1).tolist(), "NaN counts as the largest, as in torch's argmax"
    column_major = wide.t().contiguous().t()  # not a view of blocks: reshaped by a copy, same answer
    assert torch.equal(top_k_rows(column_major, 4)[0], wide.topk(4, dim=-1).values)
    assert argmax_rows(column_major) == wide.argmax(-1).tolist()
    monkeypatch.setattr(verify, "block_rows", False)
    assert not verify._blocked(wide, 4)
    assert all(torch.equal(a, b) for a, b in zip(top_k_rows(wide, 4), wide.topk(4, dim=-1), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Brute force against the model: a plain full forward over prompt + each path, no cache, no tree

_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=3)
    return _MODELS[family]


def greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def brute_force(model, prompt: list[int], seqs: list[list[int]]) -> tuple[int, list[int]]:
    """Longest accepted prefix over all node sequences and the committed tokens (accepted + bonus)."""
    best_len, best = -1, None
    leaves = {tuple(s) for s in seqs if not any(len(o) > len(s) and o[: len(s)] == s for o in seqs)}
    for s in map(list, sorted(leaves)):
        pred = model(torch.tensor([prompt + s])).logits[0, len(prompt) - 1 :].argmax(-1).tolist()
        a = 0
        while a < len(s) and s[a] == pred[a]:
            a += 1
        if a > best_len:
            best_len, best = a, s[:a] + [pred[a]]
    return best_len, best


def prefill(model, prompt):
    cache = new_cache(model)
    if len(prompt) > 1:
        model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, **{cache_keyword(model): cache})
    return cache


def tree_logits(model, cache, tokens, depths, ancestors, past):
    return model(
        input_ids=torch.tensor([tokens]),
        position_ids=(torch.tensor(depths) + past)[None],
        attention_mask=_tree_mask(ancestors, past, model.dtype),
        use_cache=True,
        **{cache_keyword(model): cache},
    ).logits[0]


@st.composite
def drafts_near_truth(draw, truth: list[int], sources=("jacobi", "retrieval", "recycling"), max_nodes: int = 5):
    """Per source a random fragment whose token at depth d is the true greedy token or a random one, so
    deep paths get accepted and identical siblings across sources are common."""
    out = {}
    for name in sources:
        draft, depth = Draft(), []
        for i in range(draw(st.integers(0, max_nodes))):
            parent = draw(st.integers(-1, i - 1))
            d = depth[parent] + 1 if parent >= 0 else 1
            if d > len(truth):
                continue
            tok = truth[d - 1] if draw(st.booleans()) else draw(st.integers(3, TINY_VOCAB - 1))
            draft.add(parent, tok, draw(st.sampled_from([0.1, 0.5, 0.9])), d, None)
            depth.append(d)
        out[name] = draft
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tree_acceptance_equals_brute_force(family, data):
    model = _model(family)
    prompt = data.draw(st.lists(st.integers(3, TINY_VOCAB - 1), min_size=1, max_size=10), label="prompt")
    truth = greedy_continuation(model, prompt, 5)  # drafts reach depth 4; all 4 accepted commit a 5th, the bonus
    trie = trie_mod.merge(prompt[-1], data.draw(drafts_near_truth(truth[:4]), label="drafts"), by_score)
    # verify everything, or only what a random t(n) curve pays for
    t = data.draw(st.none() | st.lists(st.floats(0.5, 2.0), min_size=1, max_size=len(trie)), label="t")
    tree = trie_mod.compact(trie, *trie_mod.select(trie, t))
    past = len(prompt) - 1
    logits = tree_logits(model, prefill(model, prompt), tree.tokens, tree.depths, tree.ancestors("cpu"), past)
    acc = greedy_accept(tree.children, argmax_rows(logits, *logits.topk(4, dim=-1)))

    seqs = [list(s) for s in node_sequences(tree.parents, tree.tokens)]
    want_len, want = brute_force(model, prompt, seqs)
    got = [tree.tokens[i] for i in acc.accepted] + [acc.bonus]
    assert len(acc.accepted) == want_len
    assert got == want
    assert got == truth[: len(got)], "the committed tokens are the greedy continuation"


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_merged_tree_gives_the_same_logits_as_unmerged(family):
    """Merging identical siblings changes the forward's size, not any node's logits nor the acceptance."""
    model = _model(family)
    prompt = [9, 17, 33, 9, 17]
    truth = greedy_continuation(model, prompt, 3)
    drafts = {
        "jacobi": draft_from_paths([tuple(truth), (truth[0], truth[1], 40), (truth[0], 41), (42, 43)]),
        "retrieval": draft_from_paths([tuple(truth)]),  # the chain repeats the top Jacobi path: fully merged
        "recycling": draft_from_paths([(truth[0], 41, 50), (42,)]),
    }
    trie = trie_mod.merge(prompt[-1], drafts, by_score)
    merged = trie_mod.compact(trie, *trie_mod.select(trie, None))
    past = len(prompt) - 1
    logits_m = tree_logits(model, prefill(model, prompt), merged.tokens, merged.depths, merged.ancestors("cpu"),
                           past)
    acc_m = greedy_accept(merged.children, argmax_rows(logits_m))

    # The same step without merging: every draft node separately, parents by definition.
    tokens, parents, seqs = [prompt[-1]], [-1], [()]
    for draft in drafts.values():
        offset = len(tokens)
        tokens += draft.tokens
        parents += [p + offset if p >= 0 else 0 for p in draft.parents]
        seqs += draft_sequences(draft)
    n = len(tokens)
    assert len(merged) == 9 < n == 15
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        anc[i, list(chain_of(parents, i))] = True
    depths = [len(s) for s in seqs]
    logits_u = tree_logits(model, prefill(model, prompt), tokens, depths, anc, past)
    merged_seqs = node_sequences(merged.parents, merged.tokens)
    index = [merged_seqs.index(s) for s in seqs]
    torch.testing.assert_close(logits_m[index], logits_u, rtol=1e-4, atol=1e-4)
    # acceptance on the unmerged tree: walk to the first child matching the argmax
    pred_u, node, got_u = logits_u.argmax(-1).tolist(), 0, []
    while (nxt := next((c for c in range(n) if parents[c] == node and tokens[c] == pred_u[node]), None)) is not None:
        got_u.append(tokens[nxt])
        node = nxt
    assert [merged.tokens[i] for i in acc_m.accepted] == got_u == truth
    assert acc_m.bonus == pred_u[node]
