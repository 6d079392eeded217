"""Issue 13 item 1: a rerun into the same ``--out`` resumes (never truncates), a changed setting or a foreign
folder is refused, and ``--overwrite`` deletes only what a bench writes. Kill/rerun on real files."""

from __future__ import annotations

import json

import pytest
from fakes import ByteChatTokenizer

import msn.bench.runner as runner
import msn.bench.session as session
from msn.cli import main

QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["What is the capital of France?"]},
    {"question_id": 2, "category": "writing", "turns": ["Write a haiku about rain."]},
    {"question_id": "three", "category": "qa", "turns": ["Name three primes."]},
]


@pytest.fixture
def setup(tmp_path, model, monkeypatch):
    """A question file, a fake loader and a counter of decoded (question, method) pairs."""
    tok = ByteChatTokenizer(vocab_size=128, eos_token_id=2)
    monkeypatch.setattr(session, "_load", lambda c, d: (model, tok))
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    calls: list[tuple] = []
    real = runner.answer_question

    def counting(model, tokenizer, question, method, max_new_tokens, *a):
        if max_new_tokens == 6:  # not the (16-capped) warm-up
            calls.append((question.question_id, method))
        return real(model, tokenizer, question, method, max_new_tokens, *a)

    monkeypatch.setattr(runner, "answer_question", counting)
    return path, calls


def bench(path, out, *extra, methods="ar,jacobi"):
    return main(["bench", "--questions", str(path), "--methods", methods, "--max-new-tokens", "6", "--dtype", "fp32",
                 "--device", "cpu", "--tree", "cpu-fp32-8", "--warmup", "0", "--out", str(out), *extra])


def ids(out, method):
    return [json.loads(x)["question_id"] for x in (out / "answers" / f"{method}.jsonl").read_text().splitlines()]


def answer_ids(out, method):
    return [json.loads(x)["answer_id"] for x in (out / "answers" / f"{method}.jsonl").read_text().splitlines()]


def test_interrupted_run_resumes_and_keeps_finished_answers(setup, tmp_path, monkeypatch, capsys):
    path, calls = setup
    out = tmp_path / "out"
    real = runner.run_turn
    n = {"calls": 0}

    def interrupting(*a, **kw):
        n["calls"] += 1
        if n["calls"] == 5:  # q1 (2 methods), q2 (2 methods), then Ctrl-C in the third question
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "run_turn", interrupting)
    assert bench(path, out) == 130
    assert ids(out, "ar") == ids(out, "jacobi") == [1, 2]
    kept = {m: answer_ids(out, m) for m in ("ar", "jacobi")}
    monkeypatch.setattr(runner, "run_turn", real)
    calls.clear()
    assert bench(path, out) == 0
    assert calls == [("three", "ar"), ("three", "jacobi")]  # only the missing question ran
    for m in ("ar", "jacobi"):
        assert ids(out, m) == [1, 2, "three"]
        assert answer_ids(out, m)[:2] == kept[m]  # the old answers are the same records, untouched
    s = json.loads((out / "summary.json").read_text())
    assert s["questions"] == 3 and s["status"] == "complete" and s["resumed"] == 1
    assert "resuming" in capsys.readouterr().err
    # a third run has nothing left to do and changes no answer
    calls.clear()
    assert bench(path, out) == 0 and calls == []
    assert ids(out, "ar") == [1, 2, "three"]


def test_killed_mid_write_torn_line_is_cut_and_rerun(setup, tmp_path):
    """SIGKILL while a line was being written leaves half a JSON line: the rerun drops it and redoes it."""
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    ar = out / "answers" / "ar.jsonl"
    lines = ar.read_text().splitlines(keepends=True)
    ar.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # q2 torn, q3 never written
    calls.clear()
    assert bench(path, out) == 0
    assert calls == [(2, "ar"), ("three", "ar")]
    assert ids(out, "ar") == [1, 2, "three"] and ids(out, "jacobi") == [1, 2, "three"]


def test_new_method_runs_only_for_itself(setup, tmp_path):
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out, methods="ar") == 0
    calls.clear()
    assert bench(path, out, methods="ar,retrieval") == 0
    assert sorted(calls, key=str) == sorted([(1, "retrieval"), (2, "retrieval"), ("three", "retrieval")], key=str)
    assert json.loads((out / "summary.json").read_text())["questions"] == 3


def test_changed_settings_are_refused_and_nothing_changes(setup, tmp_path, capsys):
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    for extra, field in ((["--max-new-tokens", "7"], "max_new_tokens 6 -> 7"),
                         (["--tree", "cpu-bf16-16"], "tree"),
                         (["--dtype", "bf16"], "dtype 'fp32' -> 'bf16'")):
        argv = ["bench", "--questions", str(path), "--methods", "ar,jacobi", "--max-new-tokens", "6", "--dtype",
                "fp32", "--device", "cpu", "--tree", "cpu-fp32-8", "--warmup", "0", "--out", str(out)]
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            argv[argv.index(flag) + 1] = value
        calls.clear()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds a bench with other settings" in err[0] and field in err[0], err
        assert calls == []
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_bench_recorded_before_retrieval_depth_was_named_still_resumes(setup, tmp_path):
    """Benches recorded their static tree with the old key ``retrieval``; the same tree today writes
    ``retrieval_depth``, and is the same setting."""
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    record = json.loads((out / session.BENCH_FILE).read_text())
    tree = record["settings"]["tree"]
    tree["retrieval"] = tree.pop("retrieval_depth")
    (out / session.BENCH_FILE).write_text(json.dumps(record))
    calls.clear()
    assert bench(path, out, methods="ar,jacobi,retrieval") == 0
    assert sorted(calls, key=str) == sorted([(1, "retrieval"), (2, "retrieval"), ("three", "retrieval")], key=str)
    tree["retrieval"] = 3  # another depth is another setting
    (out / session.BENCH_FILE).write_text(json.dumps(record))
    assert bench(path, out) == 2


def test_foreign_folder_is_refused_even_with_overwrite(setup, tmp_path, capsys):
    """Without bench.json there is no bench: files that merely have a bench's names (summary.md,
    answers/ar.jsonl) are the user's, and --overwrite must not delete them."""
    path, calls = setup
    out = tmp_path / "out"
    (out / "answers").mkdir(parents=True)
    mine = {"notes.txt": "mine", "summary.md": "my summary", "answers/ar.jsonl": "keep", "speedup.png": "old plot"}
    for name, text in mine.items():
        (out / name).write_text(text)
    for extra in ((), ("--overwrite",)):
        assert bench(path, out, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds no msn bench (bench.json missing)" in err[0], err
        assert "choose an empty or new --out" in err[0]
        assert {n: (out / n).read_text() for n in mine} == mine and calls == []
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["answers", *sorted(mine)]


def test_overwrite_deletes_only_bench_files(setup, tmp_path):
    path, _ = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "answers" / "keep.txt").write_text("also mine")
    (out / "speedup.png").write_bytes(b"old plot")
    assert bench(path, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "answers" / "keep.txt").read_text() == "also mine"
    assert ids(out, "ar") == [1, 2, "three"] and (out / "speedup.png").read_bytes() != b"old plot"


def test_overwrite_keeps_old_answers_when_the_model_fails_to_load(setup, tmp_path, monkeypatch, capsys):
    path, _ = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    before = (out / "answers" / "ar.jsonl").read_bytes()

    def broken(cfg, device):
        raise session.MsnError("cannot load")

    monkeypatch.setattr(session, "_load", broken)
    assert bench(path, out, "--overwrite") == 2
    assert (out / "answers" / "ar.jsonl").read_bytes() == before


def test_empty_summary_removes_stale_plot(setup, tmp_path, monkeypatch):
    path, _ = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    assert (out / "speedup.png").is_file()

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_turn", interrupt)
    assert bench(path, out, "--overwrite") == 130
    assert json.loads((out / "summary.json").read_text())["questions"] == 0
    assert not (out / "speedup.png").exists()


def write_questions(path, questions):
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))


@pytest.mark.parametrize("change, what", [
    ({"category": "poetry"}, "category 'writing', now 'poetry'"),
    ({"turns": ["Write a haiku about snow."]}, "other turns than now"),
    ({"turns": ["Write a haiku about rain.", "Now one about snow."]}, "other turns than now"),
])
def test_resume_with_other_questions_under_the_same_ids_is_refused(setup, tmp_path, capsys, change, what):
    """Another question file (or an edited question) with the same ids used to "resume" with nothing to do and
    report the old answers as the new questions'."""
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    edited = tmp_path / "edited.jsonl"
    write_questions(edited, [QUESTIONS[0], {**QUESTIONS[1], **change}, QUESTIONS[2]])
    calls.clear()
    assert bench(edited, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"answers/ar.jsonl:2: question 2 ({edited}:2) was answered here as another question ({what})" in err[0]
    assert "pass --overwrite" in err[0] and "choose another --out" in err[0]
    assert calls == [] and {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert bench(edited, out, "--overwrite") == 0  # the fix the line names
    assert json.loads((out / "summary.json").read_text())["categories"] == ["qa", change.get("category", "writing")]


def test_answers_from_before_the_question_hash_resume_comparing_the_category(setup, tmp_path):
    """An answer written before ``question_sha256`` was recorded can be compared by category only."""
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    for m in ("ar", "jacobi"):
        f = out / "answers" / f"{m}.jsonl"
        old = [{k: v for k, v in json.loads(x).items() if k != "question_sha256"} for x in f.read_text().splitlines()]
        f.write_text("".join(json.dumps(r) + "\n" for r in old))
    edited = tmp_path / "edited.jsonl"
    write_questions(edited, [QUESTIONS[0], {**QUESTIONS[1], "turns": ["Another haiku."]}, QUESTIONS[2]])
    calls.clear()
    assert bench(edited, out) == 0 and calls == []  # the turns cannot be told apart: taken on trust
    write_questions(edited, [QUESTIONS[0], {**QUESTIONS[1], "category": "poetry"}, QUESTIONS[2]])
    assert bench(edited, out) == 2 and calls == []


def test_summary_covers_only_this_runs_questions(setup, tmp_path, capsys):
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    calls.clear()
    assert bench(path, out, "--limit", "1") == 0 and calls == []
    s = json.loads((out / "summary.json").read_text())
    assert s["questions"] == 1 and s["categories"] == ["qa"]
    assert s["methods"]["ar"]["overall"]["answers"] == 1
    assert "1 questions" in capsys.readouterr().out
    assert ids(out, "ar") == [1, 2, "three"]  # the other answers stay, for a later run that selects them


def test_overwrite_deletes_only_the_answers_of_recorded_methods(setup, tmp_path, capsys):
    """Issue 36 item 7: answers/pld.jsonl the user put beside a bench (a method no run used) is theirs:
    --overwrite keeps it, and a run with pld refuses to append to it or replace it."""
    path, calls = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0  # ar, jacobi
    mine = out / "answers" / "pld.jsonl"
    mine.write_text("my own pld answers\n")
    assert bench(path, out, "--overwrite") == 0
    assert mine.read_text() == "my own pld answers\n"
    assert ids(out, "ar") == [1, 2, "three"]
    capsys.readouterr()
    for extra in ((), ("--overwrite",)):
        calls.clear()
        assert bench(path, out, *extra, methods="ar,pld") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "answers/pld.jsonl exists, but no bench recorded" in err[0], err
        assert "move it away, or choose another --out" in err[0] and calls == []
        assert mine.read_text() == "my own pld answers\n"


def test_an_unreadable_record_is_not_overwritten_blind(setup, tmp_path, capsys):
    path, _ = setup
    out = tmp_path / "out"
    assert bench(path, out) == 0
    (out / session.BENCH_FILE).write_text("{not json")
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    for extra in ((), ("--overwrite",)):
        assert bench(path, out, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot tell which files there it wrote" in err[0], err
    assert sorted(p.name for p in out.rglob("*")) == before
