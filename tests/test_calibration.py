"""Calibration beyond one bucket: a candidate given its likeliest sibling (trie.merge's rivals) and the trials
beyond a step's cut that later steps settle (calibrate.Pending) — issue 35's tree spent nodes on alternatives
that were never right beside a copying chain, and ramped copying chains slowly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from helpers import by_score, draft_from_paths

import msn
from msn.decoding import calibrate, costs
from msn.decoding import trie as trie_mod
from msn.decoding.calibrate import Calibrator, Pending
from msn.decoding.costs import Latency
from msn.decoding.engine import DecoderState


def test_each_candidate_with_siblings_is_keyed_by_its_likeliest_siblings_estimate():
    chain = draft_from_paths([(7, 8)], scores={(7,): 0.9, (7, 8): 0.8})
    alternatives = draft_from_paths([(5,), (6,), (7,)], scores={(5,): 0.3, (6,): 0.1, (7,): 0.2})
    trie = trie_mod.merge(1, {"retrieval": chain, "recycling": alternatives}, by_score)
    node = {trie.tokens[i]: i for i in trie.children[0].values()}
    assert trie.rival[node[5]] == trie_mod.rival_bucket(0.9) == 3, "beside the chain's 0.9"
    assert trie.rival[node[7]] == trie_mod.rival_bucket(0.3) == 1, "the likeliest itself: its runner-up"
    assert trie.rival[trie.children[node[7]][8]] is None, "an only child has no rival"
    seen = []
    trie_mod.merge(1, {"retrieval": chain, "recycling": alternatives},
                   lambda source, bucket, score: seen.append((source, bucket, round(score, 3))) or score)
    assert ("recycling", (0, 3), 0.3) in seen, "given the rival, starting from the bucket's own estimate"


def test_alternatives_beside_a_copying_chain_learn_that_they_lose():
    """Recycling's candidate is right half the time alone, never beside a 0.9 chain: per bucket it would stay
    at ~0.5 in both places; given its rival it learns both."""
    cal = Calibrator()
    for i in range(400):
        beside_chain = i % 2 == 0
        drafts = {"recycling": draft_from_paths([(5,)], scores={(5,): 0.5})}
        if beside_chain:
            drafts["retrieval"] = draft_from_paths([(7,)], scores={(7,): 0.9})
        trie = trie_mod.merge(1, drafts, cal.estimate)
        truth = [7] if beside_chain else [5 if i % 4 == 1 else 3]
        for (source, bucket, _), rival, hit in trie_mod.calibration_trials(trie, truth + [0]):
            cal.record(source, bucket, hit)
            if rival is not None:
                cal.record(source, (bucket, rival), hit)
    alone = trie_mod.merge(1, {"recycling": draft_from_paths([(5,)], scores={(5,): 0.5})}, cal.estimate)
    beside = trie_mod.merge(1, {"recycling": draft_from_paths([(5,)], scores={(5,): 0.5}),
                                "retrieval": draft_from_paths([(7,)], scores={(7,): 0.9})}, cal.estimate)
    five = beside.children[0][5]
    assert alone.edge[1] == pytest.approx(0.25, abs=0.05), "the bucket's own rate (half of its trials lost)"
    assert beside.edge[five] < 0.05, "beside the chain: never right"
    trie_mod.rivals = False
    try:
        flat = trie_mod.merge(1, {"recycling": draft_from_paths([(5,)], scores={(5,): 0.5}),
                                  "retrieval": draft_from_paths([(7,)], scores={(7,): 0.9})}, cal.estimate)
    finally:
        trie_mod.rivals = True
    assert flat.edge[flat.children[0][5]] == pytest.approx(alone.edge[1]), "switched off: the bucket alone"


def test_trials_beyond_the_cut_are_settled_by_the_text_committed_later():
    chain = draft_from_paths([(10, 11, 12, 13, 14, 15)])
    trie = trie_mod.merge(9, {"retrieval": chain}, by_score)
    full = [10, 11, 12]  # the tree verified two nodes, both right, and the bonus was the chain's third
    below = trie_mod.unresolved_below(trie, full)
    assert [trie.tokens[n] for n, _ in below] == [13, 14, 15] and [a for _, a in below] == [-1, 0, 1]
    assert trie_mod.unresolved_below(trie, [10, 99]) == [], "the text left the chain: nothing below it is reached"
    pending, recorded = Pending(), []
    past = 100  # the root's index; node at depth d sits at past + d
    made = []
    for node, at in below:
        made.append(pending.add(past + trie.depths[node], trie.tokens[node], [("retrieval", trie.depths[node])],
                                made[at] if at >= 0 else None))
    committed = torch.zeros(200, dtype=torch.long)
    committed[101:104] = torch.tensor(full)
    pending.resolve(committed, 104, lambda *a: recorded.append(a))
    assert recorded == [] and len(pending.entries) == 3, "nothing committed beyond the cut yet"
    committed[104:106] = torch.tensor([13, 99])  # the next step: depth 4 right, depth 5 wrong
    pending.resolve(committed, 106, lambda *a: recorded.append(a))
    assert recorded == [("retrieval", 4, True), ("retrieval", 5, False)]
    committed[106] = 15
    pending.resolve(committed, 107, lambda *a: recorded.append(a))
    assert len(recorded) == 2 and pending.entries == [], "below a wrong node: not a trial, dropped"


def test_decoding_records_the_deep_trials_and_stays_identical(monkeypatch):
    """A repetitive prompt on a tiny model: with trials beyond the cut the retrieval buckets of depths the
    tree never verified get evidence; the text is the same either way."""
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 4])
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(calibrate, "beyond_cut", on)
        state = DecoderState()
        steep = Latency({n: 1.0 + n for n in costs.GRID})  # every node costs a whole step: trees stay small
        state.latencies.update(packed=steep, eager=steep)
        out = msn.generate(model, ids, max_new_tokens=40, method="retrieval", state=state, eos_token_id=[])
        depths = {b[0] for (s, b) in state.calibrator.counts if s == "retrieval" and isinstance(b[0], int)}
        runs[on] = (out.sequences, max(out.tree_sizes), depths)
    assert torch.equal(runs[True][0], runs[False][0])
    assert max(runs[False][2]) <= runs[False][1] + 1, "trials down to one past the deepest verified node"
    assert max(runs[True][2]) > runs[True][1] + 1, "beyond the cut: deeper depths get their trials"
