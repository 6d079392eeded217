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
