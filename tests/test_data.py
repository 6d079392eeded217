"""Data: record shapes, label / noise masks through the real SmolLM2 chat template, built-ins, the collator."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_jsonl

from msn.data import (
    IGNORE,
    build_dataset,
    iter_json_array,
    iter_records,
    normalize_record,
    pad_batch,
    read_jsonl,
    sharegpt_path,
    split_dataset,
    tokenize_messages,
)
from msn.errors import InputError, MsnError
from msn.training.collator import MSNCollator
from msn.training.noise import NoiseConfig

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "That makes 6."},
]


def test_three_shapes_normalize_to_the_same_messages():
    a = normalize_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}, "x")
    b = normalize_record({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}, "x")
    c = normalize_record({"prompt": "q", "response": "r"}, "x")
    assert a == b == c == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]


def test_multi_turn_labels_and_noise_allowed_are_exactly_the_assistant_turns(smollm2_tokenizer):
    s = tokenize_messages(smollm2_tokenizer, MULTI)
    ids, labels = s["input_ids"], s["labels"]
    # Same ids as the tokenizer's own chat-template tokenization.
    ref = smollm2_tokenizer.apply_chat_template(MULTI, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ids.tolist() == list(ref)
    target = labels != IGNORE
    assert torch.equal(labels[target], ids[target])
    text = smollm2_tokenizer.decode(ids[target])
    assert text == "It is 4.<|im_end|>\nThat makes 6.<|im_end|>\n"
    assert "2+2" not in text and "Be brief" not in text
    # Two separate assistant regions; the collator's noise-allowed mask is the label mask.
    batch = MSNCollator(smollm2_tokenizer, NoiseConfig("none")).pad([s])
    assert torch.equal(batch["noise_allowed"][0], target)
    assert (target[1:] != target[:-1]).sum() == 3  # enters, leaves, enters again


def test_collator_noise_touches_only_response_and_keeps_labels_and_prompt_identical(smollm2_tokenizer):
    samples = [tokenize_messages(smollm2_tokenizer, MULTI)] + [
        tokenize_messages(smollm2_tokenizer, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "word " * (i * 3 + 1)}])
        for i in range(6)
    ]
    clean = MSNCollator(smollm2_tokenizer, NoiseConfig("none"))(samples)
    for kind in ("ahead", "uniform"):
        noisy = MSNCollator(smollm2_tokenizer, NoiseConfig(kind, 4, 2), seed=1)(samples)
        assert noisy["labels"].numpy().tobytes() == clean["labels"].numpy().tobytes()
        assert torch.equal(noisy["attention_mask"], clean["attention_mask"])
        changed = noisy["input_ids"] != clean["input_ids"]
        assert changed.any()
        assert not (changed & (clean["labels"] == IGNORE)).any(), "prompt / padding ids changed"
        prompt = clean["labels"] == IGNORE
        assert noisy["input_ids"][prompt].numpy().tobytes() == clean["input_ids"][prompt].numpy().tobytes()
    # Same seed and batch -> same noise; the collator holds no state that drifts between calls.
    c = MSNCollator(smollm2_tokenizer, NoiseConfig(), seed=7)
    assert torch.equal(c(samples)["input_ids"], c(samples)["input_ids"])
    assert not torch.equal(c(samples)["input_ids"], MSNCollator(smollm2_tokenizer, NoiseConfig(), seed=8)(samples)["input_ids"])


def test_collator_accepts_trl_masks_and_explicit_clean_samples():
    f = {"input_ids": list(range(10, 30)), "completion_mask": [0] * 8 + [1] * 12}
    out = MSNCollator(noise=NoiseConfig(length=4), pad_token_id=0, vocab_size=100)([f, {"input_ids": [5, 6, 7]}])
    assert out["labels"][0, :8].eq(IGNORE).all() and out["labels"][0, 8:].tolist() == list(range(18, 30))
    assert out["labels"][1].tolist() == [5, 6, 7] + [IGNORE] * 17
    assert out["input_ids"][0, :8].tolist() == list(range(10, 18))
    clean = {"input_ids": list(range(20)), "noise_allowed": [0] * 20}
    out = MSNCollator(noise=NoiseConfig(length=4), pad_token_id=0)([clean])
    assert out["input_ids"][0].tolist() == list(range(20))


def test_pad_batch_is_the_collators_padding_without_noise():
    feats = [{"input_ids": [4, 5, 6, 7], "labels": [IGNORE, IGNORE, 6, 7]}, {"input_ids": [8, 9]},
             {"input_ids": [1, 2, 3], "assistant_masks": [0, 1, 1], "noise_allowed": [0, 0, 1]}]
    batch = pad_batch(feats, pad_token_id=3, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 3, 3, 3, 3], [8, 9] + [3] * 6, [1, 2, 3] + [3] * 5]
    assert batch["attention_mask"].sum(1).tolist() == [4, 2, 3]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 6, 7] + [IGNORE] * 4, [8, 9] + [IGNORE] * 6,
                                        [IGNORE, 2, 3] + [IGNORE] * 5]
    padded = MSNCollator(pad_token_id=3, pad_to_multiple_of=8).pad(feats)
    assert all(torch.equal(padded[k], batch[k]) for k in batch)
    assert padded["noise_allowed"].tolist() == [[False, False, True, True] + [False] * 4,
                                                [True, True] + [False] * 6, [False, False, True] + [False] * 5]


def test_jsonl_bad_inputs_name_file_line_and_field(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        list(read_jsonl(tmp_path / "missing.jsonl"))
    assert "missing.jsonl" in str(e.value)
    good = {"prompt": "a", "response": "b"}
    cases = [
        ('{"prompt": "a", "response": ', "malformed JSON", None),
        ({"text": "hello"}, "unknown record shape", None),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn", "messages"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn", "conversations"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role", "messages[0].role"),
        ({"prompt": "a", "response": 3}, "expected a string", "response"),
    ]
    for bad, msg, fld in cases:
        p = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
        with pytest.raises(InputError, match=msg) as e:
            list(read_jsonl(p))
        assert str(e.value).startswith(f"{p}:3: ") and "\n" not in str(e.value)
        assert e.value.field == fld


def test_empty_dataset_after_filtering(smollm2_tokenizer, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x " * 200, "response": "y"}] * 3)
    with pytest.raises(InputError, match="no usable samples"):
        build_dataset(p, smollm2_tokenizer, "all", max_length=32)
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(InputError, match="no usable samples"):
        split_dataset(empty, smollm2_tokenizer, 512, None, None)


def test_jsonl_split_is_deterministic_disjoint_and_never_empty(smollm2_tokenizer, tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(60)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    train = [r.key for r in iter_records(p, "train")]
    held = [r.key for r in iter_records(p, "heldout")]
    assert held and not set(train) & set(held) and len(train) + len(held) == 60
    assert held == [r.key for r in iter_records(p, "heldout")]
    tiny = write_jsonl(tmp_path / "t.jsonl", rows[:3])
    tr, he = split_dataset(tiny, smollm2_tokenizer, 512, None, None)
    assert len(tr) >= 1 and he is not None and len(he) >= 1


def test_truncated_json_array_recovers_every_complete_record(tmp_path):
    recs = [{"id": i, "conversations": [{"from": "human", "value": "a[]{}\"" * i}]} for i in range(50)]
    text = json.dumps(recs, indent=2)
    cut = text[: text.index('"id": 37') + 20]  # mid-record, like the packaged ShareGPT file
    p = tmp_path / "t.json"
    p.write_text(cut)
    got = list(iter_json_array(p, chunk_size=64))  # tiny chunks: records straddle chunk borders
    assert [r["id"] for r in got] == list(range(37))
    p.write_text(text)
    assert len(list(iter_json_array(p, chunk_size=100))) == 50


@pytest.mark.slow
def test_sharegpt_builtin_recovers_all_records_and_streams(smollm2_tokenizer):
    try:
        path = sharegpt_path()
    except MsnError as e:  # pragma: no cover
        pytest.skip(str(e))
    assert sum(1 for _ in iter_json_array(path)) == 17671
    ds = build_dataset("sharegpt", smollm2_tokenizer, "train", max_length=256, limit=20)
    assert len(ds) == 20 and all(len(s["input_ids"]) <= 256 for s in ds.samples)
    held = build_dataset("sharegpt", smollm2_tokenizer, "heldout", max_length=256, limit=5)
    assert not set(held.sources) & set(ds.sources)


def test_stdlib_code_builtin_is_signature_docstring_to_body_with_stable_split(smollm2_tokenizer):
    train = []
    for r in iter_records("stdlib-code", "train"):
        train.append(r)
        if len(train) == 30:
            break
    held = []
    for r in iter_records("stdlib-code", "heldout"):
        held.append(r)
        if len(held) == 5:
            break
    assert not {r.key for r in train} & {r.key for r in held}
    user, assistant = train[0].messages[0]["content"], train[0].messages[1]["content"]
    assert "def " in user and ('"""' in user or "'''" in user)
    assert "def " not in assistant.splitlines()[0]
    compile(user.split("\n\n", 1)[1] + assistant, "<stdlib>", "exec")  # the pieces form the original function
    again = [r.key for _, r in zip(range(5), iter_records("stdlib-code", "heldout"), strict=False)]
    assert again == [r.key for r in held]
    ds = build_dataset("stdlib-code", smollm2_tokenizer, "heldout", max_length=128, limit=4)
    assert len(ds) == 4
