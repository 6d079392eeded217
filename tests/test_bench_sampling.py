"""Issue 12, the bench part: ``msn bench --temperature/--top-p/--top-k/--min-p/--seed`` on tiny random models.

msn's methods sample with the engine's coupled noise, so for a seed every one of them gives ar's text; pld
samples through transformers (its own random stream) and reproduces with the same seed. The settings are
recorded (bench.json, summary, each answer), and a resume with other settings is refused, naming them."""

from __future__ import annotations

import json

import pytest
import torch

import msn.bench.runner as runner
import msn.bench.session as session
from msn.bench.questions import Question
from msn.cli import main
from msn.decoding.sampling import Sampling

MSN_METHODS = ("ar", "jacobi", "retrieval", "recycling", "tr-jacobi")
QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["What is the capital of France?"]},
    {"question_id": "two", "category": "writing", "turns": ["Write a haiku about rain.", "Now about snow."]},
]


@pytest.fixture
def questions(tmp_path, model, tok, monkeypatch):
    """A question file; the bench loads the tiny model (and records that it did)."""
    loads = []
    monkeypatch.setattr(session, "_load", lambda c, d: loads.append(c.model) or (model, tok))
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path, loads


def bench(path, out, *extra, methods=",".join(MSN_METHODS), command="bench"):
    return main([command, "--questions", str(path), "--methods", methods, "--max-new-tokens", "10", "--dtype",
                 "fp32", "--device", "cpu", "--tree", "cpu-fp32-8", "--out", str(out), *extra])


def answers(out, method) -> list[dict]:
    return [json.loads(x) for x in (out / "answers" / f"{method}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags, message", [
    (("--temperature", "-0.5"), "temperature must be > 0"),
    (("--temperature", "0", "--top-p", "0.9"), "--temperature 0"),  # 0 is greedy (as in msn serve): no top-p
    (("--top-p", "1.5"), "top_p must be in [0, 1]"),
    (("--top-p", "-0.1"), "top_p must be in [0, 1]"),
    (("--top-k", "-2"), "top_k must be an integer >= 0"),
    (("--min-p", "2"), "min_p must be in [0, 1]"),
    (("--temperature", "hot"), "invalid float value"),
])
def test_bad_sampling_flags_are_one_line_errors_before_loading(questions, tmp_path, capsys, flags, message):
    path, loads = questions
    assert bench(path, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("msn bench")
    assert loads == [] and not (tmp_path / "out").exists()


def test_demo_shares_the_sampling_flags(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(session, "_load", lambda c, d: pytest.fail("loaded a model for a bad flag"))
    assert main(["demo", "--top-k", "-1", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "top_k must be an integer >= 0" in err and "\n" not in err


def test_sampled_bench_records_settings_and_msn_methods_agree(questions, tmp_path, capsys):
    path, _ = questions
    out = tmp_path / "out"
    assert bench(path, out, "--temperature", "0.8", "--top-k", "40", "--seed", "5",
                 methods=",".join([*MSN_METHODS, "pld"])) == 0
    want = {"temperature": 0.8, "top_k": 40, "top_p": None, "min_p": None, "seed": 5}
    assert json.loads((out / "bench.json").read_text())["settings"]["sampling"] == want
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"] == want and summary["identical_not_comparable"] == ["pld"]
    md = (out / "summary.md").read_text()
    assert "- decoding: sampled: temperature=0.8, top_k=40, seed=5" in md
    pld_row = next(line for line in md.splitlines() if line.startswith("| pld |"))
    assert "own random stream" in pld_row and "%" not in pld_row
    assert "its identical share is not reported" in md
    assert "sampled: temperature=0.8, top_k=40, seed=5" in capsys.readouterr().out

    texts = {}
    for m in (*MSN_METHODS, "pld"):
        recs = answers(out, m)
        assert [r["question_id"] for r in recs] == [1, "two"]
        assert all(r["sampling"] == want for r in recs)
        seeds = [r["choices"][0]["seeds"] for r in recs]
        assert seeds == [[runner.turn_seed(5, 1, 0)], [runner.turn_seed(5, "two", 0), runner.turn_seed(5, "two", 1)]]
        texts[m] = [r["choices"][0]["turns"] for r in recs]
    assert len({s for r in answers(out, "ar") for s in r["choices"][0]["seeds"]}) == 3  # one per turn
    for m in MSN_METHODS:  # the engine's guarantee: for a seed, every method samples ar's text
        assert texts[m] == texts["ar"], m
        assert summary["methods"][m]["overall"]["identical_rate"] == 1.0
    assert summary["methods"]["pld"]["overall"]["identical_rate"] is None
    assert all(c["identical_rate"] is None for c in summary["methods"]["pld"]["categories"].values())
    assert summary["methods"]["pld"]["overall"]["mat"] >= 1.0


def test_greedy_bench_records_greedy(questions, tmp_path):
    path, _ = questions
    out = tmp_path / "out"
    assert bench(path, out, "--seed", "9", methods="ar,pld") == 0  # a seed alone does not sample
    assert json.loads((out / "bench.json").read_text())["settings"]["sampling"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"] is None and "identical_not_comparable" not in summary
    assert summary["methods"]["pld"]["overall"]["identical_rate"] == 1.0  # greedy pld is lossless
    assert "- decoding: greedy" in (out / "summary.md").read_text()
    assert all(r["sampling"] is None and r["choices"][0]["seeds"] is None for r in answers(out, "pld"))


def test_the_seed_decides_the_text(model, tok):
    eos = runner.eos_ids(model, tok)
    q = Question(7, "qa", ("Tell me a story about a dragon.",))

    def text(method, seed, **settings):
        rec = runner.answer_question(model, tok, q, method, 16, "cpu-fp32-8", eos, "tiny", None,
                                     Sampling(seed=seed, **settings))
        return rec["choices"][0]["turns"]

    first = text("ar", 1)
    assert text("ar", 1) == first == text("tr-jacobi", 1)
    assert text("ar", 2) != first, "another seed, another sample"
    assert text("ar", 1, temperature=0.5) != first, "another temperature, another sample"
    assert runner.turn_seed(1, 7, 0) == runner.turn_seed(1, 7, 0) != runner.turn_seed(2, 7, 0)
    assert len({runner.turn_seed(1, q, t) for q in (7, "7", 8) for t in (0, 1)}) == 6
    assert 0 <= runner.turn_seed(-3, "x", 0) < 2**63


def test_resume_with_other_sampling_settings_is_refused(questions, tmp_path, capsys):
    path, loads = questions
    out = tmp_path / "out"
    assert bench(path, out, "--temperature", "0.7", "--warmup", "0", methods="ar") == 0
    capsys.readouterr()
    loads.clear()
    for flags, named in ((("--temperature", "0.9"), "temperature 0.7 -> 0.9"),
                         (("--temperature", "0.7", "--seed", "1"), "seed 0 -> 1"),
                         (("--temperature", "0.7", "--top-p", "0.9"), "top_p None -> 0.9"),
                         ((), "decoding 'sampled: temperature=0.7, seed=0' -> 'greedy'")):
        assert bench(path, out, *flags, "--warmup", "0", methods="ar") == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "other settings" in err and "\n" not in err, (flags, err)
    assert loads == []
    before = answers(out, "ar")
    assert bench(path, out, "--temperature", "0.7", "--warmup", "0", methods="ar") == 0  # same settings: resumes
    assert answers(out, "ar") == before and "resuming" in capsys.readouterr().err


def test_greedy_bench_from_before_sampling_resumes_and_refuses_sampling(questions, tmp_path, capsys):
    path, _ = questions
    out = tmp_path / "out"
    assert bench(path, out, "--warmup", "0", methods="ar") == 0
    record = json.loads((out / "bench.json").read_text())
    del record["settings"]["sampling"]  # as written before the bench could sample
    (out / "bench.json").write_text(json.dumps(record))
    assert bench(path, out, "--warmup", "0", methods="ar") == 0
    assert bench(path, out, "--temperature", "1", "--warmup", "0", methods="ar") == 2
    assert "decoding 'greedy' -> 'sampled: temperature=1.0, seed=0'" in capsys.readouterr().err


def test_pld_samples_through_transformers_and_reproduces(model, tok, monkeypatch):
    sampling = Sampling(temperature=0.9, top_p=0.95, seed=0)
    sent, processors = [], []
    real_generate, real_processors = model.generate, model._get_logits_processor
    monkeypatch.setattr(model, "generate", lambda *a, **kw: sent.append(kw) or real_generate(*a, **kw))
    monkeypatch.setattr(model, "_get_logits_processor",
                        lambda *a, **kw: processors.append(real_processors(*a, **kw)) or processors[-1])
    ids = torch.tensor([[40 + i % 7 for i in range(30)]])
    eos = runner.eos_ids(model, tok)

    def turn(seed):
        return runner.run_turn(model, tok, "pld", ids, 24, None, eos, None, sampling, seed)

    first = turn(11)
    assert sent[-1]["do_sample"] is True and sent[-1]["prompt_lookup_num_tokens"] == 10
    assert {k: sent[-1][k] for k in ("temperature", "top_k", "top_p", "min_p")} == {
        "temperature": 0.9, "top_k": 0, "top_p": 0.95, "min_p": None}  # top_k 0: not transformers' default 50
    # transformers' processors are msn's warpers: the same distribution is sampled
    assert [type(p) for p in processors[-1]] == [type(w) for w in sampling.warpers()]
    logits = torch.randn(1, 128) * 3
    theirs = logits.clone()
    for p in processors[-1]:
        theirs = p(ids, theirs)
    from msn.decoding.sampling import CoupledSampler
    assert torch.equal(torch.log_softmax(theirs[0], -1), CoupledSampler(sampling).processed(logits[0]))

    assert sum(first.accept_lengths) == first.new_tokens and first.seed == 11
    again = turn(11)
    assert (again.text, again.accept_lengths) == (first.text, first.accept_lengths), "same seed, same sample"
    assert turn(12).text != first.text, "another seed, another sample"
    greedy = runner.run_turn(model, tok, "pld", ids, 24, None, eos)
    assert sent[-1]["do_sample"] is False and greedy.seed is None
