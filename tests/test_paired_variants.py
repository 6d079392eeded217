"""benchmarks/paired_variants.py: decoder variants of one model answer every question in one run, paired."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
from helpers import save_tiny_chat_model

from msn.decoding import attention
from msn.errors import InputError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_variants.py"


def load_script():
    return helpers.load_script(SCRIPT, "paired_variants")


@pytest.fixture(scope="module")
def model_and_questions(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("variants")
    model = save_tiny_chat_model(root / "m", smollm2_tokenizer, seed=0, tied=False)
    q = root / "question.jsonl"
    rows = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Another one."]},
            {"question_id": 2, "category": "qa", "turns": ["What is 2 + 2?"]},
            {"question_id": 3, "category": "rag", "turns": ["Name a colour."]}]
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, q


def test_variants_answer_every_question_then_resume(model_and_questions, tmp_path, capsys):
    mod = load_script()
    model, q = model_and_questions
    out = tmp_path / "run"
    argv = ["--model", str(model), "--variants", "ar=ar", "tree=tr-jacobi",
            "k2=tr-jacobi:recycling.k=2,retrieval.max_ngram=1,attention.enabled=False",
            "--questions", str(q), "--categories", "writing,qa", "--max-new-tokens", "8", "--dtype", "fp32",
            "--out", str(out)]
    assert mod.main(argv) == 0
    texts = {}
    for name in ("ar", "tree", "k2"):
        recs = [json.loads(line) for line in (out / "answers" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in recs] == [1, 2] and all(r["model_id"] == name for r in recs)
        texts[name] = [r["choices"][0]["turns"] for r in recs]
    assert texts["ar"] == texts["tree"] == texts["k2"]  # fp32: every variant writes the greedy text
    s = json.loads((out / "summary.json").read_text())
    assert s["base"] == "tree", "the first tree variant is the default base"
    assert s["variants"]["k2"]["settings"] == {"recycling.k": 2, "retrieval.max_ngram": 1, "attention.enabled": False}
    vs = s["variants"]["k2"]["vs_base"]
    assert vs["n"] == 2 and vs["ci95"][0] <= vs["mean"] <= vs["ci95"][1] and s["variants"]["tree"]["vs_base"] is None
    assert "| k2 | tr-jacobi | recycling.k=2, retrieval.max_ngram=1, attention.enabled=False |" in (
        out / "summary.md").read_text()
    capsys.readouterr()
    before = (out / "answers" / "k2.jsonl").read_text()  # resume: nothing left, nothing appended
    assert mod.main(argv) == 0
    assert (out / "answers" / "k2.jsonl").read_text() == before and "[1/2]" not in capsys.readouterr().out


def test_variant_settings_reach_the_sources_and_bad_specs_are_one_line(tmp_path, capsys):
    mod = load_script()
    v = mod.parse_variant("x=tr-jacobi:recycling.k=3,jacobi.top_k=2")
    state = v.state()
    assert state.sources["recycling"].k == 3 and state.sources["jacobi"].top_k == 2
    assert mod.parse_variant("r=retrieval").settings == {}
    switch = mod.parse_variant("plain=tr-jacobi:attention.enabled=False")
    assert switch.state() is not None and attention.enabled
    with switch.applied():
        assert attention.enabled is False, "a module switch holds while the variant answers"
    assert attention.enabled is True, "and is restored afterwards"
    for spec, message in (("tr-jacobi", "NAME=METHOD"), ("x=tr-jacob", "unknown method"),
                          ("x=tr-jacobi:recycling", "SOURCE.ATTR=VALUE"), ("x=tr-jacobi:recycling.k=big", "literal")):
        with pytest.raises(InputError, match=message):
            mod.parse_variant(spec)
    with pytest.raises(InputError, match="no setting recycling.nope"):
        mod.parse_variant("x=tr-jacobi:recycling.nope=1").state()
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "category": "qa", "turns": ["Hi"]}\n')
    common = ["--questions", str(q), "--out", str(tmp_path / "o")]
    assert mod.main(["--variants", "a=ar", *common]) == 2
    assert "two or more variants" in capsys.readouterr().err
    assert mod.main(["--variants", "a=ar", "a=tr-jacobi", *common]) == 2
    assert "distinct names" in capsys.readouterr().err
    assert mod.main(["--variants", "a=ar", "b=tr-jacobi", "--base", "c", *common]) == 2
    assert "--base 'c'" in capsys.readouterr().err
    assert mod.main(["--variants", "a=ar", "b=tr-jacobi", "--questions", str(tmp_path / "none.jsonl"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "question file not found" in capsys.readouterr().err
