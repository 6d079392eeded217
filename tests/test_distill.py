"""``msn distill``: greedy self-answers that ``msn train --data`` reads as is, resumable, with a sidecar; and
``msn eval --task agreement``, which regenerates them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_chat_model

from msn import distill as distill_mod
from msn.cli import main
from msn.data import iter_records
from msn.distill import meta_path
from msn.models import load_model


@pytest.fixture(scope="module")
def writer(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Untied output embeddings: answers that differ per prompt (a tied random model repeats its input)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("writer") / "model", smollm2_tokenizer, tied=False)


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    texts = ["Hi", "Name three colours, please.", "What is 2+2?", "Write a haiku about rain falling softly.",
             "Say yes.", "Tell me a short story about a dog who learns to fly over the sea."]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def run(argv, capsys) -> tuple[int, str]:
    rc = main(["distill", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return rc, err.splitlines()[-1] if err else ""


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def common(model, prompts, out, **kw):
    args = {"--model": model, "--prompts": prompts, "--out": out, "--max-new-tokens": 6, "--batch-size": 4,
            "--dtype": "fp32", "--device": "cpu", "--threads": 1, **kw}
    return [x for k, v in args.items() for x in (k, v)]


def test_answers_are_the_models_greedy_tokens_and_train_reads_them(tmp_path, writer, prompts, capsys):
    from msn.prompting import encode_prompt

    out = tmp_path / "d.jsonl"
    rc, _ = run(common(writer, prompts, out), capsys)
    assert rc == 0
    recs = lines(out)
    assert len({r["response"] for r in recs}) > 1
    assert [r["prompt"] for r in recs] != [] and len(recs) == 6 and len({r["key"] for r in recs}) == 6
    model, tok = load_model(str(writer), dtype="fp32")
    for r in recs:  # batched with left padding = each prompt alone (fp32)
        ids = encode_prompt(tok, r["prompt"])
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert r["response"] == tok.decode(alone[:r["new_tokens"]], skip_special_tokens=True)
        assert r["prompt_tokens"] == ids.shape[1]
    meta = json.loads(meta_path(out).read_text())
    assert meta["settings"]["max_new_tokens"] == 6 and meta["settings"]["prompts"] == str(prompts)
    assert meta["counts"] == {"prompts": 6, "answered": 6, "skipped_long_prompts": 0}
    got = list(iter_records(out, "all"))  # msn train's reader takes the file unchanged
    assert [m["role"] for m in got[0].messages] == ["user", "assistant"]


def test_interrupted_and_torn_runs_resume_without_redoing_or_losing(tmp_path, tiny_dir, prompts, capsys,
                                                                   monkeypatch):
    out = tmp_path / "d.jsonl"
    real, calls = distill_mod.generate_batch, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(distill_mod, "generate_batch", flaky)
    rc, err = run(common(tiny_dir, prompts, out), capsys)
    assert rc == 130 and "interrupted" in err
    first = lines(out)
    assert len(first) == 4  # the finished batch is on disk
    monkeypatch.setattr(distill_mod, "generate_batch", real)
    with open(out, "a") as f:
        f.write('{"prompt": "torn')  # killed mid-write
    assert run(common(tiny_dir, prompts, out), capsys)[0] == 0
    recs = lines(out)
    assert recs[:4] == first and len(recs) == 6 and len({r["key"] for r in recs}) == 6
    before = out.read_bytes()
    assert run(common(tiny_dir, prompts, out), capsys)[0] == 0  # nothing left to do
    assert out.read_bytes() == before


def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path, tiny_dir, prompts, capsys):
    out = tmp_path / "d.jsonl"
    rc, err = run(common(tiny_dir, tmp_path / "missing.jsonl", out), capsys)
    assert rc == 2 and "missing.jsonl: prompt file not found" in err and not out.exists()

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    rc, err = run(common(tiny_dir, empty, out), capsys)
    assert rc == 2 and "empty.jsonl:2: empty prompt (field 'prompt')" in err

    none = tmp_path / "none.jsonl"
    none.write_text("\n")
    rc, err = run(common(tiny_dir, none, out), capsys)
    assert rc == 2 and "no usable prompts" in err and not out.exists()  # the lock's empty file is removed

    rc, err = run(common(tiny_dir, prompts, out, **{"--limit": 0}), capsys)
    assert rc == 2 and "--limit" in err

    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own notes\n")
    rc, err = run(common(tiny_dir, prompts, mine), capsys)
    assert rc == 2 and "not an msn distill output" in err and mine.read_text() == "my own notes\n"

    assert run(common(tiny_dir, prompts, out), capsys)[0] == 0
    before = out.read_bytes()
    rc, err = run(common(tiny_dir, prompts, out, **{"--max-new-tokens": 9}), capsys)
    assert rc == 2 and "other settings (max_new_tokens 6 -> 9)" in err and out.read_bytes() == before


def test_a_model_without_chat_template_is_refused(tmp_path, tiny_dir, prompts, capsys):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    rc, err = run(common(plain, prompts, tmp_path / "d.jsonl"), capsys)
    assert rc == 2 and "no chat template" in err and not (tmp_path / "d.jsonl").exists()


def test_a_second_distill_on_a_file_being_written_is_refused(tmp_path, tiny_dir, prompts, capsys):
    fcntl = pytest.importorskip("fcntl", reason="advisory locks need fcntl (not on Windows)")
    out = tmp_path / "d.jsonl"
    assert run(common(tiny_dir, prompts, out, **{"--limit": 2}), capsys)[0] == 0
    before = out.read_bytes()
    with open(out, "a") as other:  # what a running distill holds
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, err = run(common(tiny_dir, prompts, out), capsys)
    assert rc == 2 and "d.jsonl: another msn distill is writing this file" in err
    assert out.read_bytes() == before
    assert run(common(tiny_dir, prompts, out), capsys)[0] == 0 and len(lines(out)) == 6  # released: resumes


def test_agreement_is_one_for_the_model_that_wrote_the_answers_and_less_for_another(tmp_path, prompts, writer,
                                                                                    smollm2_tokenizer, capsys):
    out = tmp_path / "d.jsonl"
    other = save_tiny_chat_model(tmp_path / "other", smollm2_tokenizer, seed=1, tied=False)
    assert run(common(writer, prompts, out), capsys)[0] == 0
    results = {}
    for name, model in (("self", writer), ("other", other)):
        res = tmp_path / f"{name}.json"
        rc = main(["eval", "--task", "agreement", "--model", str(model), "--data", str(out), "--split", "all",
                   "--out", str(res)])
        assert rc == 0
        results[name] = json.loads(res.read_text())
    assert results["self"]["exact"] == 1.0 and results["self"]["prefix"] == 1.0 and results["self"]["samples"] == 6
    assert results["other"]["prefix"] < 0.5 and results["other"]["exact"] < 1.0


def test_heldout_split_of_a_file_is_the_part_train_leaves_out(tmp_path, tiny_dir, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(100)))
    held = {r.key for r in iter_records(rows, "heldout")}
    train = {r.key for r in iter_records(rows, "train")}
    assert held and not held & train and len(held) + len(train) == 100
    res = tmp_path / "agree.json"
    rc = main(["eval", "--task", "agreement", "--model", str(tiny_dir), "--data", str(rows), "--split", "heldout",
               "--out", str(res)])
    assert rc == 0 and json.loads(res.read_text())["samples"] == len(held)
    rc = main(["eval", "--task", "agreement", "--model", str(tiny_dir), "--data", str(rows), "--split", "nope"])
    assert rc == 2 and "--split" in capsys.readouterr().err


def test_prompts_sharing_a_key_each_get_their_own(tmp_path):
    """stdlib-code keys methods as file:name, so two classes' `close` collide; resume matches by key, so each
    prompt needs its own or the second would be counted as answered without an answer."""
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": "a", "prompt": t}) + "\n" for t in ("one", "two", "three")))
    assert [(p.key, p.text) for p in distill_mod.iter_prompts(str(f))] == [("a", "one"), ("a#2", "two"),
                                                                           ("a#3", "three")]
    keys = [p.key for _, p in zip(range(3000), distill_mod.iter_prompts("stdlib-code"), strict=False)]
    assert len(set(keys)) == len(keys) == 3000 and any("#2" in k for k in keys)
