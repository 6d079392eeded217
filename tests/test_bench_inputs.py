"""Question files and bad inputs: each user error is one clear line, raised before any model loads."""

from __future__ import annotations

import json

import pytest

from msn.bench import questions as qs
from msn.bench.runner import parse_methods
from msn.cli import main
from msn.errors import InputError


def write(tmp_path, lines, name="q.jsonl"):
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


GOOD = [
    {"question_id": 1, "category": "qa", "turns": ["What is 2+2?"]},
    {"question_id": 2, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
    {"question_id": 3, "category": "qa", "turns": ["Why is the sky blue?"]},
]


def test_spec_bench_file(spec_bench_path):
    questions = qs.load_questions(spec_bench_path)
    assert len(questions) == 480
    assert len({q.category for q in questions}) == 13
    assert sum(len(q.turns) == 2 for q in questions) == 80
    picked = qs.select(questions, per_category=5)
    assert len(picked) == 65
    assert qs.select(questions, categories=["rag"], limit=3)[0].category == "rag"


def test_select_keeps_file_order(tmp_path):
    q = qs.load_questions(write(tmp_path, GOOD))
    assert [x.question_id for x in qs.select(q, per_category=1)] == [1, 2]
    assert [x.question_id for x in qs.select(q, categories=["qa"])] == [1, 3]
    assert [x.question_id for x in qs.select(q, limit=2)] == [1, 2]
    assert q[1].turns == ("Write a poem.", "Shorter.")


@pytest.mark.parametrize(
    "lines, message",
    [
        ([GOOD[0], "{not json"], "q.jsonl:2: malformed JSON"),
        ([GOOD[0], GOOD[1], {"question_id": 9, "turns": ["x"]}], "q.jsonl:3: missing required field (field 'category')"),
        ([{"question_id": 1, "category": "qa", "turns": []}], "q.jsonl:1: must be a non-empty list"),
        ([{"question_id": 1, "category": "qa", "turns": "hello"}], "(field 'turns')"),
        (["[1, 2]"], "q.jsonl:1: expected a JSON object"),
        ([GOOD[0], "", GOOD[0]], "q.jsonl:3: duplicate question_id 1 (first on line 1)"),
        ([""], "no questions in file"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(InputError) as e:
        qs.load_questions(write(tmp_path, lines))
    assert message in str(e.value)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(InputError, match="not found.*hemingkx/Spec-Bench"):
        qs.load_questions(tmp_path / "nope.jsonl")


def test_selection_errors(tmp_path):
    q = qs.load_questions(write(tmp_path, GOOD))
    with pytest.raises(InputError, match="unknown category coding; the question file has: qa, writing"):
        qs.select(q, categories=["coding"])
    with pytest.raises(InputError, match="--limit must be >= 1, got 0"):
        qs.select(q, limit=0)
    with pytest.raises(InputError, match="--per-category must be >= 1"):
        qs.select(q, per_category=-1)


def test_methods():
    assert parse_methods("ar, pld,tr-jacobi") == ["ar", "pld", "tr-jacobi"]
    with pytest.raises(InputError, match="unknown method.*medusa"):
        parse_methods("ar,medusa")
    with pytest.raises(InputError, match="twice"):
        parse_methods("ar,ar")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "ar,eagle"], "unknown method(s) eagle"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--categories", "qa,poetry"], "unknown category poetry"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--tree", "no-such-tree"], "unknown tree 'no-such-tree'"),
        (["--threads", "100000"], "--threads 100000 is more than the "),
        (["--temperature", "0", "--top-p", "0.9"], "--temperature 0 means greedy decoding, which --top-p cannot"),
    ],
)
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, extra, message):
    import msn.bench.session as session

    monkeypatch.setattr(session, "_load", lambda *a: pytest.fail("model loaded despite bad input"))
    path = write(tmp_path, GOOD)
    code = main(["bench", "--questions", str(path), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("msn bench: error: ") and message in err and "\n" not in err


def test_cli_malformed_file_exit_2(tmp_path, capsys):
    path = write(tmp_path, [GOOD[0], '{"question_id": 2, "category": "qa", "turns": ["a"]', GOOD[2]])
    assert main(["bench", "--questions", str(path)]) == 2
    assert f"{path}:2: malformed JSON" in capsys.readouterr().err


def test_cli_missing_file_exit_2(tmp_path, capsys):
    assert main(["bench", "--questions", str(tmp_path / "question.jsonl")]) == 2
    assert "Spec-Bench" in capsys.readouterr().err


def test_temperature_0_is_greedy():
    """As in ``msn serve`` (OpenAI's convention); it used to fail naming a Python-only fix (do_sample=False)."""
    import argparse

    from msn.flags import add_sampling_arguments, sampling_settings

    p = argparse.ArgumentParser()
    add_sampling_arguments(p)
    assert sampling_settings(p.parse_args(["--temperature", "0", "--seed", "3"])) is None
    assert sampling_settings(p.parse_args(["--temperature", "0.5"])).temperature == 0.5


@pytest.fixture
def bench_run(tmp_path, model, tok, monkeypatch):
    """``msn bench`` on the tiny model (context: 512 tokens) with the byte tokenizer (a token per character),
    recording the questions answered."""
    import msn.bench.runner as runner
    import msn.bench.session as session

    monkeypatch.setattr(session, "_load", lambda c, d: (model, tok))
    answered = []
    real = runner.answer_question

    def counting(model, tokenizer, question, *a):
        answered.append(question.question_id)
        return real(model, tokenizer, question, *a)

    monkeypatch.setattr(runner, "answer_question", counting)

    def bench(path, *extra):
        return main(["bench", "--questions", str(path), "--methods", "ar,pld", "--max-new-tokens", "8", "--dtype",
                     "fp32", "--device", "cpu", "--warmup", "0", "--out", str(tmp_path / "out"), *extra])

    return bench, answered


def test_a_first_turn_too_long_for_the_context_is_named_before_any_question_runs(tmp_path, bench_run, capsys):
    bench, answered = bench_run
    path = write(tmp_path, [GOOD[0], {"question_id": "long", "category": "rag", "turns": ["x" * 600]}, GOOD[2]])
    assert bench(path) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    n = len("<user>" + "x" * 600 + "</user><assistant>")
    assert err == (f"msn bench: error: question 'long' ({path}:2): its first turn is {n} tokens, + --max-new-tokens 8 "
                   f"= {n + 8} exceeds the model's context of 512 tokens; leave its category 'rag' out with "
                   "--categories, or use a model with a longer context")
    assert answered == [] and not (tmp_path / "out").exists()  # nothing ran, nothing was written
    path = write(tmp_path, [GOOD[0], {"question_id": "long", "category": "rag", "turns": ["x" * 480]}])
    assert bench(path, "--max-new-tokens", "100") == 2
    assert "lower --max-new-tokens to 8 or less, or leave its category 'rag' out" in capsys.readouterr().err
    assert bench(path, "--categories", "qa") == 0 and answered == [1, 1]  # by ar, then by pld


def test_a_later_turn_too_long_names_the_question_and_turn(tmp_path, bench_run, capsys):
    bench, answered = bench_run
    turns = ["Say something.", "y" * 480]  # the first fits; the conversation at turn 2 does not
    path = write(tmp_path, [GOOD[0], {"question_id": 7, "category": "mt", "turns": turns}])
    assert bench(path) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"msn bench: error: question 7 ({path}:2): at turn 2 the conversation (its earlier answers "
                          "included) is ")
    assert "exceeds the model's context of 512 tokens; lower --max-new-tokens (it bounds the earlier answers too), " \
           "or leave its category 'mt' out with --categories" in err
    assert answered == [1, 1, 7]  # ar and pld answered question 1; ar stopped at question 7's second turn
    assert bench(path, "--categories", "qa") == 0  # the fix the line names: it resumes, question 1 kept
    assert answered == [1, 1, 7]
