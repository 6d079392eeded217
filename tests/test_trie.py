"""The step's token trie: merging every source's drafts, choosing the nodes worth verifying, compacting them
and the calibration trials a verified step yields."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from helpers import by_score, chain_of, draft_from_paths, draft_sequences, node_sequences, random_drafts
from hypothesis import given, settings
from hypothesis import strategies as st

from msn.decoding import trie as trie_mod
from msn.decoding.sources import Draft

# ---------------------------------------------------------------------------------------------------------
# Helpers


def parent_closed(trie, nodes) -> bool:
    s = set(nodes)
    return 0 in s and all(trie.parents[i] in s for i in s if i)


# ---------------------------------------------------------------------------------------------------------
# merge


def test_identical_siblings_across_sources_merge():
    a = draft_from_paths([(7, 8), (9,)], scores={(7,): 0.3, (7, 8): 0.9})
    b = draft_from_paths([(7, 8, 4), (5,)], scores={(7,): 0.6, (7, 8): 0.2})
    trie = trie_mod.merge(1, {"a": a, "b": b}, by_score)
    seqs = node_sequences(trie.parents, trie.tokens)
    assert sorted(seqs) == sorted([(), (7,), (7, 8), (9,), (7, 8, 4), (5,)])
    assert len(trie) == 6 and trie.tokens[0] == 1
    n7, n78 = seqs.index((7,)), seqs.index((7, 8))
    assert trie.edge[n7] == 0.6 and trie.edge[n78] == 0.9, "the best edge estimate is kept"
    assert trie.proposers[n7] == [("a", 0, (7,)), ("b", 0, (7,))], "all proposers are kept"
    assert [(p.source, p.bucket, p.tag) for p in trie.proposers[n78]] == [("a", 0, (7, 8)), ("b", 0, (7, 8))]
    assert trie.proposers[seqs.index((9,))] == [("a", 0, (9,))]
    assert trie.children[0] == {7: n7, 9: seqs.index((9,)), 5: seqs.index((5,))}


def test_merge_uses_the_estimate_function():
    seen = []

    def estimate(name, bucket, score):
        seen.append((name, bucket, score))
        return 0.125

    trie = trie_mod.merge(3, {"x": draft_from_paths([(4, 5)], bucket="B")}, estimate)
    assert seen == [("x", "B", 0.5), ("x", "B", 0.5)]
    assert trie.edge == [1.0, 0.125, 0.125]
    assert trie.path_probs() == [1.0, 0.125, 0.125**2]


@settings(max_examples=200, deadline=None)
@given(random_drafts())
def test_merge_is_the_union_of_the_drafts(drafts):
    trie = trie_mod.merge(9, drafts, by_score)
    n = len(trie)
    assert trie.tokens[0] == 9 and trie.parents[0] == -1 and trie.depths[0] == 0
    assert all(0 <= trie.parents[i] < i for i in range(1, n)), "parents precede children"
    assert all(trie.depths[i] == trie.depths[trie.parents[i]] + 1 for i in range(1, n))
    for i in range(n):
        assert trie.children[i] == {trie.tokens[c]: c for c in range(1, n) if trie.parents[c] == i}
    seqs = node_sequences(trie.parents, trie.tokens)
    assert len(set(seqs)) == n, "identical siblings merged: every token path once"
    # reference: per token path, the max score and every proposer, from the drafts directly
    best: dict = {}
    proposers: dict = {}
    for name, draft in drafts.items():
        for seq, score, bucket, tag in zip(draft_sequences(draft), draft.scores, draft.buckets, draft.tags,
                                           strict=True):
            best[seq] = max(best.get(seq, 0.0), score)
            proposers.setdefault(seq, []).append((name, bucket, tag))
    assert set(seqs[1:]) == set(best)
    for i, seq in enumerate(seqs[1:], start=1):
        assert trie.edge[i] == best[seq]
        assert trie.proposers[i] == proposers[seq]
    q = trie.path_probs()
    for i in range(n):
        want = 1.0
        for j in chain_of(trie.parents, i) - {0}:
            want *= trie.edge[j]
        assert q[i] == pytest.approx(want)


# ---------------------------------------------------------------------------------------------------------
# select / choose_size


def rate(q, nodes, t):
    return (1.0 + sum(q[i] for i in nodes if i)) / t[len(nodes) - 1]


@settings(max_examples=150, deadline=None)
@given(random_drafts())
def test_select_without_a_curve_keeps_everything(drafts):
    trie = trie_mod.merge(0, drafts, by_score)
    kept, q = trie_mod.select(trie, None)
    assert kept == list(range(len(trie)))
    assert q == trie.path_probs()


@settings(max_examples=200, deadline=None)
@given(random_drafts(max_nodes=4), st.data())
def test_select_maximises_tokens_per_second_over_all_parent_closed_subsets(drafts, data):
    trie = trie_mod.merge(0, drafts, by_score)
    n = len(trie)
    # a random positive t(0..m), any shape (increasing or not), m possibly below the trie's size
    m = data.draw(st.integers(0, n - 1), label="m")
    t = data.draw(st.lists(st.floats(0.1, 5.0), min_size=m + 1, max_size=m + 1), label="t")
    kept, q = trie_mod.select(trie, t)
    assert kept == sorted(kept) and kept[0] == 0
    assert parent_closed(trie, kept)
    assert len(kept) - 1 <= m
    best = max(
        rate(q, (0, *sub), t)
        for k in range(m + 1)
        for sub in itertools.combinations(range(1, n), k)
        if parent_closed(trie, (0, *sub))
    )
    assert rate(q, kept, t) == pytest.approx(best, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(random_drafts(scores=st.sampled_from([0.0, 1.0, 0.5])), st.integers(0, 20))
def test_selected_set_is_parent_closed_even_with_ties(drafts, m):
    """Scores of 0 and 1 make many q equal along a path: ties must still keep parents before children."""
    trie = trie_mod.merge(0, drafts, by_score)
    kept, _ = trie_mod.select(trie, [1.0] * (m + 1))  # a flat curve: every q > 0 pays
    assert parent_closed(trie, kept)
    q = trie.path_probs()
    assert len(kept) - 1 == min(m, sum(1 for x in q[1:] if x > 0))


def test_choose_size_returns_zero_when_nothing_pays():
    q = [0.9] * 10
    assert trie_mod.choose_size(q, [1.0 + n for n in range(11)]) == 0  # each node costs a whole forward
    assert trie_mod.choose_size([], [1.0]) == 0
    assert trie_mod.choose_size(q, [1.0]) == 0  # t only covers n = 0


def test_choose_size_examples():
    q = [0.9, 0.8, 0.5, 0.1]
    assert trie_mod.choose_size(q, [1.0] * 5) == 4  # free nodes: take all
    assert trie_mod.choose_size(q, [1.0] * 3) == 2  # ... as far as t is known
    # t jumps after two nodes: (1 + 1.7) / 1 = 2.7 beats (1 + 2.3) / 2
    assert trie_mod.choose_size(q, [1.0, 1.0, 1.0, 2.0, 2.0]) == 2
    assert trie_mod.choose_size([0.9, 0.0], [1.0, 1.0, 1.0]) == 1  # a node with q = 0 never pays


# ---------------------------------------------------------------------------------------------------------
# compact / StepTree


@settings(max_examples=150, deadline=None)
@given(random_drafts(), st.data())
def test_compact_and_ancestors_follow_the_definition(drafts, data):
    trie = trie_mod.merge(4, drafts, by_score)
    q = trie.path_probs()
    # a random parent-closed subset: each node joins with its parent present
    kept = [0]
    for i in range(1, len(trie)):
        if trie.parents[i] in kept and data.draw(st.booleans()):
            kept.append(i)
    tree = trie_mod.compact(trie, kept, q)
    n = len(tree)
    assert n == len(kept) and tree.trie_ids == kept
    assert tree.tokens == [trie.tokens[i] for i in kept]
    assert tree.depths == [trie.depths[i] for i in kept]
    assert tree.q == [q[i] for i in kept]
    assert tree.parents[0] == -1
    assert all(0 <= tree.parents[i] < i for i in range(1, n))
    assert all(kept[tree.parents[i]] == trie.parents[kept[i]] for i in range(1, n))
    for i in range(n):
        assert tree.children[i] == {tree.tokens[c]: c for c in range(1, n) if tree.parents[c] == i}
    anc = tree.ancestors("cpu")
    assert anc.dtype == torch.bool and anc.shape == (n, n)
    for i in range(n):
        assert set(anc[i].nonzero().flatten().tolist()) == chain_of(tree.parents, i)
    # likeliest_below: best child by q, repeatedly, down to a leaf
    start = data.draw(st.integers(0, n - 1))
    below, node = [], start
    while tree.children[node]:
        node = max(tree.children[node].values(), key=lambda c: (tree.q[c], -c))
        below.append(node)
    assert tree.likeliest_below(start) == below


def test_root_only_tree():
    trie = trie_mod.merge(5, {"a": Draft()}, by_score)
    tree = trie_mod.compact(trie, *trie_mod.select(trie, None))
    assert tree.tokens == [5] and tree.parents == [-1] and tree.likeliest_below(0) == []
    assert tree.ancestors("cpu").tolist() == [[True]]


# ---------------------------------------------------------------------------------------------------------
# calibration_trials


@settings(max_examples=200, deadline=None)
@given(random_drafts(), st.data())
def test_calibration_trials_are_the_children_of_correct_nodes(drafts, data):
    trie = trie_mod.merge(0, drafts, by_score)
    # committed tokens: a walk down the trie, then anything (possibly leaving the trie at once)
    new, node = [], 0
    while trie.children[node] and data.draw(st.booleans()):
        node = data.draw(st.sampled_from(sorted(trie.children[node].values())))
        new.append(trie.tokens[node])
    new += data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4))
    got = Counter(trie_mod.calibration_trials(trie, new))
    seqs = node_sequences(trie.parents, trie.tokens)
    want = Counter()
    for c in range(1, len(trie)):
        d = len(seqs[c])
        if d <= len(new) and list(seqs[c][:-1]) == new[: d - 1]:  # parent correct, own truth known
            for proposer in trie.proposers[c]:
                want[proposer, list(seqs[c]) == new[:d]] += 1
    assert got == want
    path = trie_mod.correct_path(trie, new)
    assert path[0] == 0 and [seqs[i] for i in path] == [tuple(new[:d]) for d in range(len(path))]


def test_calibration_trials_stop_at_the_last_committed_depth():
    a = draft_from_paths([(7, 8, 9), (6,)])
    trie = trie_mod.merge(0, {"a": a}, by_score)
    trials = sorted((p[2], hit) for p, hit in trie_mod.calibration_trials(trie, [7]))
    # only depth 1 is known: (7,) correct, (6,) wrong; (7, 8) is below the last committed token
    assert trials == [((6,), False), ((7,), True)]
    trials = sorted((p[2], hit) for p, hit in trie_mod.calibration_trials(trie, [7, 8]))
    assert trials == [((6,), False), ((7,), True), ((7, 8), True)]
    trials = sorted((p[2], hit) for p, hit in trie_mod.calibration_trials(trie, [6, 1, 2]))
    assert trials == [((6,), True), ((7,), False)]
