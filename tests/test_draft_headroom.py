"""benchmarks/draft_headroom.py: the most draft tokens each drafting rule could give on a known text."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "draft_headroom.py"


@pytest.fixture(scope="module")
def mod():
    return helpers.load_script(SCRIPT, "draft_headroom")


def test_retrieval_rules_differ_in_which_occurrences_they_follow(mod):
    r = mod.Replay(depth=1)
    r.begin([5, 6, 5, 7, 5, 8, 5])  # 5 was followed by 6, then 7, then 8
    assert r.chains("retrieval") == [[6]]  # the earliest occurrence (prompt lookup's rule)
    assert r.chains("retrieval2") == [[6], [8]]  # earliest and latest
    assert r.chains("retrieval-all") == [[6], [7], [8]]


def test_retrieval_any_also_follows_shorter_matches(mod):
    r = mod.Replay(depth=1)
    r.begin([1, 2, 9, 3, 2, 7, 1, 2])  # "1 2" was followed by 9; "2" by 9 and by 7
    assert r.chains("retrieval-all") == [[9]]
    assert sorted(r.chains("retrieval-any")) == [[7], [9], [9]]


def test_the_pair_table_keys_on_two_tokens_and_falls_back_to_one(mod):
    r = mod.Replay(depth=2)
    r.begin([1, 2])
    ids = [1, 2, 3, 2]
    r.record(1, ids, [40])  # after "1 2": 40 (pair (1, 2) and token 2)
    r.record(3, ids, [50])  # after "3 2": 50 (pair (3, 2), and token 2's entry is overwritten)
    r.record(0, [40], [41])  # after 40: 41 (no pair: first position)
    r.record(0, [50], [51])
    assert r.chains("recycling") == [[50, 51]]
    assert r.chains("recycling-pair") == [[40, 41]]
    r.begin([7, 2])  # a pair never seen: the one-token entry
    assert r.chains("recycling-pair") == [[50, 51]]


def test_replay_scores_the_longest_true_prefix_and_tables_carry_over_between_texts(mod):
    ids = [100, 101, 102, 103, 104, 105, 106, 107]  # no token repeats: retrieval never matches
    perfect = [[ids[i + 1]] if i + 1 < len(ids) else [0] for i in range(len(ids))]  # the model's top-1 is right
    texts = [mod.Text("a", 2, ids, perfect), mod.Text("b", 2, ids, perfect)]
    out = mod.replay(texts, ["retrieval2", "recycling", "retrieval2+recycling"], depth=3)
    positions = len(ids) - 2  # from the last prompt token to the second-last token
    assert out["recycling"]["b"]["positions"] == positions
    assert out["retrieval2"]["b"]["accepted"] == 0  # retrieval looks inside one text only
    # Text b: the table learnt every row in text a, so the chain holds min(depth, tokens left) at each position.
    want = sum(min(3, len(ids) - 1 - i) for i in range(1, len(ids) - 1)) / positions
    assert out["recycling"]["b"]["accepted"] == pytest.approx(want)
    assert out["recycling"]["a"]["accepted"] < want  # text a: only the rows before each position were known
    assert out["retrieval2+recycling"]["b"] == out["recycling"]["b"]
    assert out["recycling"]["overall"]["positions"] == 2 * positions


def test_chains_and_trees_are_scored_as_the_issue_reads_them(mod):
    assert mod.accepted([1, 2, 3], [1, 2, 4]) == 2 and mod.accepted([], [1]) == 0
    assert mod.tree_nodes([[1, 2, 3], [1, 2, 4], [5]]) == 5


def test_an_unknown_rule_is_refused_in_one_line(mod):
    with pytest.raises(SystemExit, match="unknown rule 'jacobi' in 'retrieval\\+jacobi'; choose from"):
        mod.check_rules("retrieval,retrieval+jacobi")
    with pytest.raises(SystemExit, match="--rules is empty"):
        mod.check_rules(",")


def test_the_script_decodes_replays_and_writes_its_table(mod, tiny_dir, tmp_path, capsys):
    q = tmp_path / "question.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n"
                         for i, (c, t) in enumerate([("writing", "Write a haiku."), ("qa", "What is 2 + 2?")])))
    out = tmp_path / "h.json"
    assert mod.main(["--model", str(tiny_dir), "--dtype", "fp32", "--questions", str(q), "--max-new-tokens", "6",
                     "--per-category", "1", "--rules", "retrieval2,recycling", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["rules"]
    assert set(table) == {"retrieval2", "recycling"}
    assert set(table["recycling"]) == {"overall", "writing", "qa"}
    assert 2 <= table["recycling"]["overall"]["positions"] <= 12
    assert "| retrieval2 |" in capsys.readouterr().out
