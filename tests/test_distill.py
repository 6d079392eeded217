"""``msn distill``: greedy self-answers that ``msn train --data`` reads as is, resumable, with a sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msn import distill as distill_mod
from msn.cli import main
from msn.data import iter_records
from msn.distill import meta_path
from msn.models import load_model


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from msn.errors import MsnError
    from msn.models import preset_path

    try:
        tok = AutoTokenizer.from_pretrained(preset_path("smollm2-135m"))
    except MsnError as e:  # pragma: no cover
        pytest.skip(str(e))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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


def test_answers_are_the_models_greedy_tokens_and_train_reads_them(tmp_path, tiny_chat_dir, prompts, capsys):
    from msn.prompting import encode_prompt

    out = tmp_path / "d.jsonl"
    rc, _ = run(common(tiny_chat_dir, prompts, out), capsys)
    assert rc == 0
    recs = lines(out)
    assert [r["prompt"] for r in recs] != [] and len(recs) == 6 and len({r["key"] for r in recs}) == 6
    model, tok = load_model(str(tiny_chat_dir), dtype="fp32")
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


def test_interrupted_and_torn_runs_resume_without_redoing_or_losing(tmp_path, tiny_chat_dir, prompts, capsys,
                                                                   monkeypatch):
    out = tmp_path / "d.jsonl"
    real, calls = distill_mod.generate_batch, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(distill_mod, "generate_batch", flaky)
    rc, err = run(common(tiny_chat_dir, prompts, out), capsys)
    assert rc == 130 and "interrupted" in err
    first = lines(out)
    assert len(first) == 4  # the finished batch is on disk
    monkeypatch.setattr(distill_mod, "generate_batch", real)
    with open(out, "a") as f:
        f.write('{"prompt": "torn')  # killed mid-write
    assert run(common(tiny_chat_dir, prompts, out), capsys)[0] == 0
    recs = lines(out)
    assert recs[:4] == first and len(recs) == 6 and len({r["key"] for r in recs}) == 6
    before = out.read_bytes()
    assert run(common(tiny_chat_dir, prompts, out), capsys)[0] == 0  # nothing left to do
    assert out.read_bytes() == before


def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path, tiny_chat_dir, prompts, capsys):
    out = tmp_path / "d.jsonl"
    rc, err = run(common(tiny_chat_dir, tmp_path / "missing.jsonl", out), capsys)
    assert rc == 2 and "missing.jsonl: prompt file not found" in err and not out.exists()

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    rc, err = run(common(tiny_chat_dir, empty, out), capsys)
    assert rc == 2 and "empty.jsonl:2: empty prompt (field 'prompt')" in err

    none = tmp_path / "none.jsonl"
    none.write_text("\n")
    rc, err = run(common(tiny_chat_dir, none, out), capsys)
    assert rc == 2 and "no usable prompts" in err

    rc, err = run(common(tiny_chat_dir, prompts, out, **{"--limit": 0}), capsys)
    assert rc == 2 and "--limit" in err

    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own notes\n")
    rc, err = run(common(tiny_chat_dir, prompts, mine), capsys)
    assert rc == 2 and "not an msn distill output" in err and mine.read_text() == "my own notes\n"

    assert run(common(tiny_chat_dir, prompts, out), capsys)[0] == 0
    before = out.read_bytes()
    rc, err = run(common(tiny_chat_dir, prompts, out, **{"--max-new-tokens": 9}), capsys)
    assert rc == 2 and "other settings (max_new_tokens 6 -> 9)" in err and out.read_bytes() == before


def test_a_model_without_chat_template_is_refused(tmp_path, tiny_chat_dir, prompts, capsys):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_chat_dir, plain)
    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    rc, err = run(common(plain, prompts, tmp_path / "d.jsonl"), capsys)
    assert rc == 2 and "no chat template" in err
