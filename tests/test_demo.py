"""msn demo: the built-in prompts, and a run on a tiny model that prints the table and the report path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from fakes import ByteChatTokenizer

import msn.bench.session as session
from msn.bench.questions import DEMO_PROMPTS, demo_questions
from msn.cli import main


def test_prompts_cover_the_spec_bench_kinds():
    qs = demo_questions()
    assert len(qs) == 12
    kinds = {q.category for q in qs}
    assert {"conversation", "translation", "summarization", "qa", "math_reasoning", "rag", "coding"} <= kinds
    assert all(len(q.turns) == 1 and len(q.turns[0]) > 20 for q in qs)
    rag = [q for q in qs if q.category == "rag"]
    assert all("Question:" in q.turns[0] and len(q.turns[0]) > 300 for q in rag)  # a passage, then a question
    assert len({q.question_id for q in qs}) == 12
    assert all(json.loads(line) for line in DEMO_PROMPTS.read_text().splitlines())


def test_demo_prints_table_and_report(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads()
    model, tok = tiny_model("llama"), ByteChatTokenizer()
    monkeypatch.setattr(session, "_load", lambda cfg, device: (model, tok))
    try:
        code = main(["demo", "--limit", "2", "--max-new-tokens", "8", "--dtype", "fp32", "--device", "cpu",
                     "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    out = capsys.readouterr().out
    assert "| method | tokens/s | speedup | MAT | identical to ar | accepted drafts per step by source" in out
    for m in ("ar", "pld", "jacobi", "tr-jacobi"):
        assert f"| {m} |" in out
    assert f"report: {tmp_path / 'summary.md'}" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["questions"] == 2 and s["categories"] == ["conversation"]


def test_demo_in_bf16_explains_the_identical_column_and_proves_it_in_fp32(tmp_path, monkeypatch, capsys):
    """Issue 36 item 13: "identical to ar: 42%" next to a README saying lossless, with no word of why."""
    model, tok = tiny_model("llama"), ByteChatTokenizer()
    loads = []

    def load(cfg, device):
        loads.append(cfg.dtype)
        return (model if cfg.dtype == "fp32" else tiny_model("llama", dtype=torch.bfloat16)), tok

    monkeypatch.setattr(session, "_load", load)
    code = main(["demo", "--limit", "2", "--max-new-tokens", "8", "--dtype", "bf16", "--device", "cpu",
                 "--methods", "ar,jacobi,tr-jacobi", "--out", str(tmp_path)])
    assert code == 0 and loads == ["bf16", "fp32"]
    out = capsys.readouterr().out
    assert "identical to ar, in bf16: a tree step verifies several tokens in one forward" in out
    assert "fp32 check: jacobi gives ar's text on 2/2 prompts; tr-jacobi gives ar's text on 2/2 prompts" in out
    loads.clear()
    assert main(["demo", "--limit", "1", "--max-new-tokens", "4", "--dtype", "fp32", "--device", "cpu",
                 "--methods", "ar,tr-jacobi", "--out", str(tmp_path / "fp32")]) == 0
    assert loads == ["fp32"] and "fp32 check" not in capsys.readouterr().out  # fp32 itself: nothing to explain


def test_demo_rejects_bad_method(capsys):
    assert main(["demo", "--methods", "ar,fast"]) == 2
    assert "unknown method(s) fast" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_real_model_one_prompt(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        code = main(["demo", "--limit", "1", "--max-new-tokens", "16", "--threads", "1", "--device", "cpu",
                     "--methods", "ar,tr-jacobi", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    assert "| tr-jacobi |" in capsys.readouterr().out
