"""Running a benchmark on a tiny random model: answers format, two-turn flow, Ctrl-C, end to end."""

from __future__ import annotations

import json

import pytest

import msn.bench.runner as runner
import msn.bench.session as session
from msn.bench.questions import Question
from msn.cli import main

QUESTIONS = [
    Question(1, "qa", ("What is the capital of France?",)),
    Question(2, "writing", ("Write a haiku about rain.", "Now make it about snow.")),
    Question(3, "qa", ("Name three primes.",)),
]


def record(model, tok, q, method, n=12):
    return runner.answer_question(model, tok, q, method, n, "cpu-fp32-8", runner.eos_ids(model, tok), "tiny")


def test_answer_has_spec_bench_fields(model, tok):
    for method in ("ar", "tr-jacobi", "pld"):
        r = record(model, tok, QUESTIONS[1], method)
        assert {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"} <= set(r)
        assert r["question_id"] == 2 and r["category"] == "writing" and r["method"] == method
        c = r["choices"][0]
        assert c["index"] == 0 and len(c["turns"]) == 2 and all(isinstance(t, str) for t in c["turns"])
        assert len(c["new_tokens"]) == len(c["wall_time"]) == len(c["decoding_steps"]) == 2
        assert all(0 < n <= 12 for n in c["new_tokens"]) and all(t > 0 for t in c["wall_time"])
        assert all(s >= 1 for s in c["decoding_steps"])
        assert sum(c["accept_lengths"]) == sum(c["new_tokens"])  # pld too: Spec-Bench reads every method
        assert len(c["accept_lengths"]) == sum(c["decoding_steps"])
        if method == "ar":
            assert c["decoding_steps"] == c["new_tokens"]
        if method == "tr-jacobi":  # per step, aligned with accept_lengths, never more than the step accepted
            for key in ("jacobi_accepted", "retrieval_accepted"):
                assert len(c[key]) == len(c["accept_lengths"])
                assert all(0 <= x <= a for x, a in zip(c[key], c["accept_lengths"], strict=True))
            for name, sole in c["sole_by_source"].items():
                assert all(0 <= x <= y for x, y in zip(sole, c["accepted_by_source"][name], strict=True))
        else:
            assert c["jacobi_accepted"] is None and c["retrieval_accepted"] is None and c["sole_by_source"] is None


def test_lossless_methods_match_ar_in_fp32(model, tok):
    ar = record(model, tok, QUESTIONS[1], "ar", 24)["choices"][0]["turns"]
    assert record(model, tok, QUESTIONS[1], "tr-jacobi", 24)["choices"][0]["turns"] == ar
    assert record(model, tok, QUESTIONS[1], "jacobi", 24)["choices"][0]["turns"] == ar


def test_second_turn_sees_own_first_answer_in_chat_template(model, tok, monkeypatch):
    prompts: list[str] = []
    real = runner.generate

    def spy(m, input_ids, **kw):
        prompts.append(tok.decode(input_ids[0].tolist()))
        return real(m, input_ids, **kw)

    monkeypatch.setattr(runner, "generate", spy)
    r = record(model, tok, QUESTIONS[1], "tr-jacobi")
    first_answer = r["choices"][0]["turns"][0]
    assert prompts[0] == "<user>Write a haiku about rain.</user><assistant>"
    assert prompts[1] == (
        f"<user>Write a haiku about rain.</user><assistant>{first_answer}</assistant>"
        "<user>Now make it about snow.</user><assistant>"
    )


def test_methods_run_interleaved_after_warmup(model, tok, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(runner, "run_turn", lambda m, t, method, *a: calls.append(method) or runner.TurnResult(
        "x", 1, 0.1, 1, [1]))
    seen = []
    runner.run_questions(model, tok, QUESTIONS, ["ar", "pld", "tr-jacobi"], 8, lambda q, recs: seen.append(
        (q.question_id, list(recs))), warmup=1)
    assert calls[:3] == ["ar", "pld", "tr-jacobi"]  # warm-up: first turn of the first question
    assert calls[3:] == ["ar", "pld", "tr-jacobi"] + ["ar"] * 2 + ["pld"] * 2 + ["tr-jacobi"] * 2 + [
        "ar", "pld", "tr-jacobi"]
    assert seen == [(1, ["ar", "pld", "tr-jacobi"]), (2, ["ar", "pld", "tr-jacobi"]), (3, ["ar", "pld", "tr-jacobi"])]


def test_each_method_keeps_its_own_decoder_state(model, tok, monkeypatch):
    """One method's recycling table must never hold another method's answer to the same prompt."""
    states: dict[str, list] = {}
    real = runner.generate

    def spy(*a, state=None, method=None, **k):
        states.setdefault(method, []).append(state)
        return real(*a, state=state, method=method, **k)

    monkeypatch.setattr(runner, "generate", spy)
    runner.run_questions(model, tok, QUESTIONS, ["recycling", "tr-jacobi"], 8, lambda q, recs: None, warmup=1)
    warm = {m: v[0] for m, v in states.items()}
    timed = {m: v[1:] for m, v in states.items()}
    assert all(len({id(s) for s in v}) == 1 for v in timed.values()), "a method keeps one state over the run"
    assert timed["recycling"][0] is not timed["tr-jacobi"][0], "methods do not share a state"
    assert all(warm[m] is not timed[m][0] for m in warm), "the warm-up's state is not carried into the timing"
    table = timed["tr-jacobi"][0].sources["recycling"].next_ids
    assert table is not None and (table >= 0).any(), "the method's own table did fill up"


def cfg(tmp_path, methods=("ar", "pld", "jacobi", "tr-jacobi"), questions=QUESTIONS):
    return session.BenchConfig(model="tiny-llama", questions=questions, methods=list(methods), out=tmp_path,
                               dtype="fp32", device="cpu", max_new_tokens=10)


def test_end_to_end_outputs(tmp_path, model, tok):
    result = session.run_bench(cfg(tmp_path), model, tok)
    assert not result.interrupted
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["model"] == "tiny-llama" and s["dtype"] == "fp32" and s["device"] == "cpu"
    assert s["questions"] == 3 and s["status"] == "complete"
    assert set(s["methods"]) == {"ar", "pld", "jacobi", "tr-jacobi"}
    ar = s["methods"]["ar"]["overall"]
    for m, e in s["methods"].items():
        assert set(e["categories"]) == {"qa", "writing"}
        answers = [json.loads(x) for x in (tmp_path / "answers" / f"{m}.jsonl").read_text().splitlines()]
        assert len(answers) == 3
        # the summary is computed from what was recorded: MAT pooled over every step, speed-up against ar
        speeds = [sum(a["choices"][0]["new_tokens"]) / sum(a["choices"][0]["wall_time"]) for a in answers]
        assert e["overall"]["tokens_per_s"] == pytest.approx(sum(speeds) / len(speeds))
        lengths = [n for a in answers for n in a["choices"][0]["accept_lengths"]]
        assert e["overall"]["mat"] == pytest.approx(sum(lengths) / len(lengths))
        assert e["overall"]["speedup"] == pytest.approx(e["overall"]["tokens_per_s"] / ar["tokens_per_s"])
    assert s["methods"]["tr-jacobi"]["overall"]["identical_rate"] == 1.0  # fp32: lossless
    assert (tmp_path / "summary.md").read_text().startswith("# msn bench: tiny-llama (fp32, cpu)")
    assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_ctrl_c_writes_finished_questions(tmp_path, model, tok, monkeypatch, capsys):
    """KeyboardInterrupt from inside decoding (as Ctrl-C delivers it) in the third question."""
    calls = {"n": 0}
    real = runner.generate

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 + 2 * 3 + 1:  # warm-up (2) + q1 (2) + q2 (2 methods x 2 turns) + first call of q3
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "generate", interrupting)
    monkeypatch.setattr(session, "_load", lambda c, d: (model, tok))
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category,
                                        "turns": list(q.turns)}) + "\n" for q in QUESTIONS))
    out = tmp_path / "out"
    code = main(["bench", "--questions", str(path), "--methods", "ar,tr-jacobi", "--max-new-tokens", "6",
                 "--dtype", "fp32", "--device", "cpu", "--out", str(out)])
    assert code == 130
    for m in ("ar", "tr-jacobi"):
        lines = (out / "answers" / f"{m}.jsonl").read_text().splitlines()
        assert [json.loads(x)["question_id"] for x in lines] == [1, 2]
    s = json.loads((out / "summary.json").read_text())
    assert s["questions"] == 2 and s["status"] == "interrupted: 2 of 3 questions finished"
    captured = capsys.readouterr()
    assert "interrupted" in captured.err and "summary.md" in captured.out


@pytest.mark.slow
def test_real_model_small_bench(tmp_path, spec_bench_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", "smollm2-135m", "--questions", str(spec_bench_path), "--categories", "qa",
                 "--limit", "2", "--max-new-tokens", "16", "--dtype", "fp32", "--device", "cpu", "--threads", "1",
                 "--methods", "ar,pld,tr-jacobi", "--out", str(out)])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["questions"] == 2 and s["categories"] == ["qa"]
    assert s["methods"]["tr-jacobi"]["overall"]["mat"] >= 1.0
    assert s["methods"]["ar"]["overall"]["tokens_per_s"] > 0
    assert "| tr-jacobi |" in capsys.readouterr().out
