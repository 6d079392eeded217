"""benchmarks/paired_models.py: two models answer every question in one run, paired per question, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
from helpers import save_tiny_chat_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_models.py"


def load_script():
    return helpers.load_script(SCRIPT, "paired_models")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("paired")
    a = save_tiny_chat_model(root / "sft", smollm2_tokenizer, seed=0, tied=False)
    b = save_tiny_chat_model(root / "msn", smollm2_tokenizer, seed=1, tied=False)
    q = root / "question.jsonl"
    rows = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Another one."]},
            {"question_id": 2, "category": "qa", "turns": ["What is 2 + 2?"]},
            {"question_id": 3, "category": "qa", "turns": ["Name a colour."]}]
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return a, b, q


def test_two_models_answer_every_question_then_resume(two_models, tmp_path, capsys):
    mod = load_script()
    a, b, q = two_models
    out = tmp_path / "run"
    argv = ["--models", str(a), str(b), "--methods", "ar,tr-jacobi", "--questions", str(q), "--per-category", "2",
            "--max-new-tokens", "8", "--dtype", "fp32", "--out", str(out)]
    assert mod.main(argv) == 0
    for name in ("sft", "msn"):
        for m in ("ar", "tr-jacobi"):
            recs = [json.loads(line) for line in (out / "answers" / name / f"{m}.jsonl").read_text().splitlines()]
            assert [r["question_id"] for r in recs] == [1, 2, 3] and all(r["model_id"] == name for r in recs)
            assert len(recs[0]["choices"][0]["turns"]) == 2  # both MT-bench turns
    ar_sft = [json.loads(x)["choices"][0]["turns"] for x in (out / "answers/sft/ar.jsonl").read_text().splitlines()]
    tr_sft = [json.loads(x)["choices"][0]["turns"] for x in (out / "answers/sft/tr-jacobi.jsonl").read_text().splitlines()]
    assert ar_sft == tr_sft  # fp32: every method writes the greedy text
    s = json.loads((out / "summary.json").read_text())
    vs = s["methods"]["tr-jacobi"]["msn"]["vs_first"]["tps"]
    assert vs["n"] == 3 and vs["wins"] + vs["losses"] <= 3 and vs["ci95"][0] <= vs["mean"] <= vs["ci95"][1]
    assert "| tr-jacobi | msn |" in (out / "summary.md").read_text()
    # Where MAT comes from: each source's accepted drafts per step, read back from the answers' per-step counts.
    recs = [json.loads(x)["choices"][0] for x in (out / "answers/msn/tr-jacobi.jsonl").read_text().splitlines()]
    by_q = [sum(c["accepted_by_source"]["retrieval"]) / len(c["accepted_by_source"]["retrieval"]) for c in recs]
    tree = s["methods"]["tr-jacobi"]["msn"]
    names = ("jacobi", "retrieval", "recycling")
    assert set(tree["accepted_per_step"]) == {*names, *(f"{n} alone" for n in names)}
    assert all(tree["accepted_per_step"][f"{n} alone"] <= tree["accepted_per_step"][n] for n in names)
    assert tree["accepted_per_step"]["retrieval"] == pytest.approx(sum(by_q) / len(by_q))
    # Per depth: pooled steps, share accepting >= d Jacobi drafts, nodes per step by source.
    jac = [a for c in recs for a in c["accepted_by_source"]["jacobi"]]
    depth = tree["jacobi_depth"]
    assert depth["steps"] == len(jac) == sum(len(c["tree_sizes"]) for c in recs)
    assert depth["at_least"]["2"] == pytest.approx(sum(a >= 2 for a in jac) / len(jac))
    assert 1 >= depth["at_least"]["1"] >= depth["at_least"]["2"] >= depth["at_least"]["3"] >= 0
    nodes = sum(sum(c["nodes_by_source"]["retrieval"]) for c in recs)
    assert depth["nodes_per_step"]["retrieval"] == pytest.approx(nodes / len(jac))
    assert s["methods"]["ar"]["msn"]["jacobi_depth"] is None
    assert "| tr-jacobi | msn | " + str(len(jac)) + " | " in (out / "summary.md").read_text().split("Per depth")[1]
    assert s["methods"]["ar"]["msn"]["accepted_per_step"] == {} and "jacobi" not in s["methods"]["ar"]["msn"]["vs_first"]
    assert "| tr-jacobi | msn | " in (out / "summary.md").read_text().split("by the source that drafted them")[1]
    capsys.readouterr()
    # Resume: nothing left to answer, nothing appended.
    before = (out / "answers/msn/ar.jsonl").read_text()
    assert mod.main(argv) == 0
    assert (out / "answers/msn/ar.jsonl").read_text() == before
    assert "[1/3]" not in capsys.readouterr().out
    # Another question file reusing the ids is refused, not resumed as if answered.
    edited = tmp_path / "edited.jsonl"
    edited.write_text(q.read_text().replace("Name a colour.", "Name a fruit."))
    assert mod.main([*argv[:argv.index("--questions") + 1], str(edited), *argv[argv.index("--questions") + 2:]]) == 2
    err = capsys.readouterr().err
    assert "question 3" in err and "answered here as another question" in err and "\n" not in err.strip()
    assert (out / "answers/msn/ar.jsonl").read_text() == before


def test_paired_statistics_and_bad_input(tmp_path, capsys):
    mod = load_script()
    r = mod.paired({"1": 3.0, "2": 5.0, "x": 1.0}, {"1": 2.0, "2": 4.0})
    assert r["n"] == 2 and r["mean"] == 1.0 and r["wins"] == 2 and r["ratio"] == pytest.approx(8 / 6)
    assert mod.paired({"1": 1.0}, {"2": 1.0}) is None
    assert mod.labels(["runs/a/sft", "runs/b/sft", "x/msn/"]) == ["0-sft", "1-sft", "msn"]
    assert mod.main(["--models", "a", "--out", str(tmp_path / "o")]) == 2
    assert "at least two models" in capsys.readouterr().err
    assert mod.main(["--models", "a", "b", "--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "question file not found" in capsys.readouterr().err
