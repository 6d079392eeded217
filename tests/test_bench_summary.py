"""Summary math on hand-made answer files: every number below is computed by hand."""

from __future__ import annotations

import json

import pytest

from msn.bench.plot import plot_speedup
from msn.bench.summary import answers_path, summarize, summarize_dir, to_markdown, write_summary


def rec(qid, cat, tokens, times, turns, accept=None, steps=None):
    return {
        "question_id": qid, "category": cat, "answer_id": f"a{qid}", "model_id": "m",
        "choices": [{"index": 0, "turns": turns, "new_tokens": tokens, "wall_time": times,
                     "decoding_steps": steps if steps is not None else [None] * len(tokens),
                     "accept_lengths": accept}],
        "tstamp": 0.0,
    }


@pytest.fixture
def answers():
    # ar: speeds 10, 20 (qa) and 40 (math, two turns: 60 tokens / 1.5 s).
    ar = [
        rec(1, "qa", [10], [1.0], ["x"], [1] * 10, [10]),
        rec(2, "qa", [20], [1.0], ["y"], [1] * 20, [20]),
        rec(3, "math", [40, 20], [1.0, 0.5], ["z", "w"], [1] * 60, [40, 20]),
    ]
    # tr: speeds 20, 20, 60; q2 differs from ar; accept lengths pooled: qa [2]*5 + [4]*5 and [2]*10.
    tr = [
        rec(1, "qa", [10], [0.5], ["x"], [2] * 5, [5]),
        rec(2, "qa", [20], [1.0], ["different"], [4] * 5, [5]),
        rec(3, "math", [40, 20], [0.5, 0.5], ["z", "w"], [2] * 30, [20, 10]),
    ]
    # pld: no per-step lengths, but steps: MAT = tokens / steps. Speeds 10, 40, 30.
    pld = [
        rec(1, "qa", [10], [1.0], ["x"], None, [5]),
        rec(2, "qa", [20], [0.5], ["y"], None, [10]),
        rec(3, "math", [40, 20], [1.0, 1.0], ["z", "w"], None, [10, 10]),
    ]
    return {"ar": ar, "tr-jacobi": tr, "pld": pld}


def test_overall_and_per_category(answers):
    s = summarize(answers, meta={"model": "m", "dtype": "bf16", "device": "cpu"})
    assert s["model"] == "m" and s["questions"] == 3 and s["categories"] == ["qa", "math"]
    ar, tr, pld = (s["methods"][m] for m in ("ar", "tr-jacobi", "pld"))
    assert ar["overall"]["tokens_per_s"] == pytest.approx((10 + 20 + 40) / 3)
    assert ar["overall"]["speedup"] == pytest.approx(1.0)
    assert ar["overall"]["mat"] == pytest.approx(1.0)
    assert ar["overall"]["identical_rate"] == 1.0
    assert tr["overall"]["tokens_per_s"] == pytest.approx((20 + 20 + 60) / 3)
    assert tr["overall"]["speedup"] == pytest.approx(100 / 70)
    assert tr["overall"]["mat"] == pytest.approx((10 + 20 + 60) / (5 + 5 + 30))
    assert tr["overall"]["identical_rate"] == pytest.approx(2 / 3)
    assert tr["categories"]["qa"]["speedup"] == pytest.approx(20 / 15)
    assert tr["categories"]["qa"]["mat"] == pytest.approx(30 / 10)
    assert tr["categories"]["qa"]["identical_rate"] == pytest.approx(0.5)
    assert tr["categories"]["math"]["speedup"] == pytest.approx(60 / 40)
    assert tr["categories"]["math"]["answers"] == 1
    assert pld["overall"]["mat"] == pytest.approx(90 / 35)
    assert pld["categories"]["qa"]["speedup"] == pytest.approx(25 / 15)


def test_required_shape(answers):
    s = summarize(answers, meta={"model": "m", "dtype": "fp32", "device": "cpu"})
    for key in ("model", "dtype", "device", "methods"):
        assert key in s
    for entry in s["methods"].values():
        for block in [entry["overall"], *entry["categories"].values()]:
            for key in ("tokens_per_s", "speedup", "mat", "identical_rate"):
                assert key in block
    json.dumps(s)  # serialisable


def test_accepted_drafts_by_source_pooled_over_steps(answers):
    tr = answers["tr-jacobi"]
    for r, (jac, ret) in zip(tr, [([1] * 5, [0] * 5), ([3] * 5, [3] * 5), ([0] * 30, [1] * 30)], strict=True):
        r["choices"][0]["jacobi_accepted"], r["choices"][0]["retrieval_accepted"] = jac, ret
    s = summarize(answers)
    o = s["methods"]["tr-jacobi"]["overall"]
    assert o["jacobi_per_step"] == pytest.approx((5 + 15) / 40)
    assert o["retrieval_per_step"] == pytest.approx((15 + 30) / 40)
    assert s["methods"]["tr-jacobi"]["categories"]["qa"]["jacobi_per_step"] == pytest.approx(20 / 10)
    assert s["methods"]["ar"]["overall"]["jacobi_per_step"] is None  # not recorded: unknown, not zero
    assert "| jacobi 0.50, retrieval 1.12 |" in to_markdown(s)  # an older answers file: the two fields only


def test_accepted_drafts_and_nodes_per_source_map(answers):
    tr = answers["tr-jacobi"]
    for r, (jac, rec, nodes) in zip(tr, [([1] * 5, [2] * 5, [4] * 5), ([0] * 5, [1] * 5, [8] * 5),
                                          ([2] * 30, [0] * 30, [2] * 30)], strict=True):
        r["choices"][0]["accepted_by_source"] = {"jacobi": jac, "recycling": rec, "retrieval": [0] * len(jac)}
        r["choices"][0]["nodes_by_source"] = {"jacobi": nodes, "recycling": nodes, "retrieval": [0] * len(jac)}
    o = summarize(answers)["methods"]["tr-jacobi"]["overall"]
    assert o["drafted_per_step"] == pytest.approx({"jacobi": 65 / 40, "recycling": 15 / 40, "retrieval": 0.0})
    assert o["nodes_per_step"]["jacobi"] == pytest.approx((20 + 40 + 60) / 40)
    table = to_markdown(summarize(answers))
    assert "jacobi 1.62 (3.0), recycling 0.38 (3.0) |" in table  # a source with no nodes and no tokens is left out
    for r in tr:  # on a step where Jacobi drafted too, recycling's tokens were Jacobi's as well
        by = r["choices"][0]["accepted_by_source"]
        r["choices"][0]["sole_by_source"] = {
            "jacobi": by["jacobi"], "retrieval": by["retrieval"],
            "recycling": [0 if j else x for x, j in zip(by["recycling"], by["jacobi"], strict=True)]}
    o = summarize(answers)["methods"]["tr-jacobi"]["overall"]
    assert o["sole_per_step"] == pytest.approx({"jacobi": 65 / 40, "recycling": 5 / 40, "retrieval": 0.0})
    assert "jacobi 1.62 (3.0; 1.62 alone), recycling 0.38 (3.0; 0.12 alone) |" in to_markdown(summarize(answers))


def test_mat_unknown_without_steps(answers):
    for r in answers["pld"]:
        r["choices"][0]["decoding_steps"] = [None]
    assert summarize(answers)["methods"]["pld"]["overall"]["mat"] is None


def test_only_questions_every_method_finished_count(answers):
    answers["tr-jacobi"] = answers["tr-jacobi"][:2]  # an interrupted run
    s = summarize(answers)
    assert s["questions"] == 2 and s["categories"] == ["qa"]
    assert s["methods"]["ar"]["overall"]["tokens_per_s"] == pytest.approx(15)


def test_without_baseline_speedup_is_none(answers):
    del answers["ar"]
    s = summarize(answers)
    assert s["baseline"] is None
    assert s["methods"]["pld"]["overall"]["speedup"] is None


def test_files_markdown_and_plot(tmp_path, answers):
    for m, recs in answers.items():
        p = answers_path(tmp_path, m)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = summarize_dir(tmp_path, list(answers), meta={"model": "m", "dtype": "bf16", "device": "cpu"})
    assert s["methods"]["tr-jacobi"]["overall"]["speedup"] == pytest.approx(100 / 70)
    write_summary(tmp_path, s)
    assert json.loads((tmp_path / "summary.json").read_text())["questions"] == 3
    md = (tmp_path / "summary.md").read_text()
    assert md == to_markdown(s)
    assert "| tr-jacobi | 33.3 | 1.43x | 2.25 | 67% |" in md
    assert "| pld | 26.7 | 1.14x | 2.57 | 100% |" in md
    assert "| qa | 2 |" in md and "| math | 1 |" in md
    plot_speedup(s, tmp_path / "speedup.png")
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
