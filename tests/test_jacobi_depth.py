"""benchmarks/jacobi_depth.py: where the true tokens sat in the Jacobi table each step drafted from."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
from helpers import save_tiny_chat_model

from msn.bench.questions import Question

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "jacobi_depth.py"


@pytest.fixture(scope="module")
def mod():
    return helpers.load_script(SCRIPT, "jacobi_depth")


def test_ranks_are_read_at_the_positions_each_step_drafted_for(mod):
    # prompt [5, 6]; step 1 drafts after length 2 (targets 7, 8), step 2 after length 4 (targets 9, 10)
    sequence = [5, 6, 7, 8, 9, 10]
    drafted = [mod.Drafted([[1, 7], [8, 2]], fresh=2, length=2),  # depth 1 rank 1, fresh depth 2 rank 0
               mod.Drafted([[9, 3], [4, 4]], fresh=1, length=4),  # depth 1 rank 0, padding depth 2 without 10
               mod.Drafted([[0, 0], [0, 0]], fresh=0, length=5)]  # the last step: nothing after its bonus
    stats = mod.DepthStats()
    stats.add(drafted, sequence, accepted=[2, 1, 0])
    assert stats.steps == 2
    assert stats.depth1 == {1: 1, 0: 1}
    assert stats.depth2["fresh"] == {0: 1} and stats.depth2["noise"] == {-1: 1}
    s = stats.summary()
    assert s["accepted >= 1"] == 1.0 and s["accepted >= 2"] == 0.5 and s["jacobi accepted per step"] == 1.5
    assert s["depth2 row fresh share"] == 0.5 and s["depth2 fresh: top1"] == 1.0 and s["depth2 noise: in table"] == 0


def test_a_step_accepts_a_jacobi_draft_exactly_when_the_truth_is_in_the_verified_depth1_ranks(
        mod, tmp_path, smollm2_tokenizer):
    # cpu-bf16-16 verifies depth-1 ranks 0-3, the whole table row: greedy acceptance at depth 1 <=> truth there
    path = save_tiny_chat_model(tmp_path / "tiny", smollm2_tokenizer, seed=0, tied=True)
    model, tok = mod.load_model(str(path), dtype="fp32")
    questions = [Question(i, "qa", (t,)) for i, t in
                 enumerate(["Write a haiku.", "Name a colour.", "What is 2 + 2?"])]
    stats = mod.measure(model, tok, questions, "cpu-bf16-16", max_new_tokens=24)
    assert stats.steps > 0
    assert stats.accepted[1] + stats.accepted[2] == stats.steps - stats.depth1[-1]
    assert stats.accepted[1] + stats.accepted[2] > 0  # the tied random model repeats itself: drafts do land
    out = tmp_path / "depth.json"
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}) + "\n"
                         for i, t in enumerate(["Write a haiku.", "Name a colour."])))
    assert mod.main(["--models", str(path), "--questions", str(q), "--per-category", "2", "--max-new-tokens", "8",
                     "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["questions"] == 2 and saved["models"][str(path)]["summary"]["steps"] > 0
