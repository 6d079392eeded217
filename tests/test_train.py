"""Training: the collator inside HF Trainer and TRL SFTTrainer, `msn train` runs, resume, output folder, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from helpers import Crash, fast

from msn.cli import main
from msn.data import IGNORE
from msn.errors import InputError
from msn.eval.loss import heldout_loss
from msn.training.collator import MSNCollator
from msn.training.noise import NoiseConfig
from msn.training.train import check_output_dir, last_checkpoint, train


def synthetic_samples(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Prompt of random ids, response that counts up: a pattern a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, 128, (6,), generator=g)
        start = int(torch.randint(3, 100, (1,), generator=g))
        resp = torch.arange(start, start + 20) % 125 + 3
        ids = torch.cat([prompt, resp])
        out.append({"input_ids": ids, "labels": torch.cat([torch.full((6,), IGNORE), resp])})
    return out


class RecordingCollator(MSNCollator):
    """The MSN collator, keeping each batch next to its clean (un-noised) twin."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[dict, dict]] = []

    def __call__(self, features):
        batch = super().__call__(features)
        self.seen.append((self.pad(features), batch))
        return batch


def test_hf_trainer_with_msn_collator_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama").train()
    data = synthetic_samples(32)
    before = heldout_loss(model, data)["loss"]

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to="none", save_strategy="no", logging_steps=4, disable_tqdm=True, use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=(rec := RecordingCollator(noise=NoiseConfig(), vocab_size=128))).train()
    after = heldout_loss(model, data)["loss"]
    assert after < before - 0.5, (before, after)
    clean, noisy = rec.seen[0]
    assert torch.equal(noisy["labels"], clean["labels"])
    changed = noisy["input_ids"] != clean["input_ids"]
    assert changed.any() and not (changed & (clean["labels"] == IGNORE)).any()


@pytest.mark.slow
def test_trl_sft_trainer_uses_msn_collator(tmp_path, tiny_dir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ds = Dataset.from_list(
        [{"prompt": f"Say the numbers after {i}:", "completion": " " + " ".join(str(i + j) for j in range(1, 12))} for i in range(16)]
    )

    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=True, max_length=64, learning_rate=1e-3,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, data_collator=(rec := RecordingCollator(tok)))
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    clean, noisy = rec.seen[0]
    prompt = clean["labels"] == IGNORE
    assert prompt.any() and (~prompt).any(), "TRL's completion mask reached the collator as labels"
    assert torch.equal(noisy["labels"], clean["labels"])
    changed = noisy["input_ids"] != clean["input_ids"]
    assert changed.any() and not (changed & prompt).any()


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_dir, data_file):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    full = train(fast(tiny_dir, data_file, tmp_path / "full", max_steps=6, save_steps=3))

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Crash

    cut = fast(tiny_dir, data_file, tmp_path / "cut", max_steps=6, save_steps=3)
    with pytest.raises(Crash):
        train(cut, callbacks=[KillAfterFirstCheckpoint()])
    assert last_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    assert not (tmp_path / "cut" / "msn.json").exists(), "a killed run must not look finished"
    with pytest.raises(InputError, match="holds another run"):
        train(cut)
    cut.resume = True
    resumed = train(cut)
    assert resumed["steps"] == full["steps"] == 6
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    def last_loss(run):
        state = json.loads((tmp_path / run / "checkpoint-6" / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h][-1]

    assert last_loss("full") == pytest.approx(last_loss("cut"), abs=1e-6)


def test_final_save_metadata_eval_metrics_and_plain_sft(tmp_path, tiny_dir, data_file):
    meta = train(fast(tiny_dir, data_file, tmp_path / "run", max_steps=2, eval_steps=2, eval_samples=4, noise="none"))
    out = tmp_path / "run"
    saved = json.loads((out / "msn.json").read_text())
    assert saved["noise"]["type"] == "none" and saved["steps"] == 2 and saved["data"]["spec"] == str(data_file)
    assert saved["seed"] == 0 and "transformers" in saved["versions"]
    per_epoch = saved["data"]["train_tokens"]
    assert per_epoch > 0 and saved["tokens_seen"] == round(saved["epochs"] * per_epoch)
    for k in range(4):
        assert 0.0 <= saved["metrics"][f"eval_denoise_acc_{k}"] <= 1.0
    assert "eval_loss" in saved["metrics"] and meta["metrics"] == saved["metrics"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / ".msn-final-tmp").exists()
    from msn import load_model

    model, tok = load_model(out)
    assert model.config.vocab_size == len(tok)
    # --overwrite replaces the run; refusing is the default.
    with pytest.raises(InputError, match="holds another run"):
        check_output_dir(out, resume=False, overwrite=False)
    train(fast(tiny_dir, data_file, out, max_steps=1, overwrite=True))
    assert json.loads((out / "msn.json").read_text())["steps"] == 1
    assert not (out / "checkpoint-2").exists()


@pytest.mark.slow
def test_lora_run_saves_an_adapter_that_loads(tmp_path, tiny_dir, data_file):
    train(fast(tiny_dir, data_file, tmp_path / "lora", lora=True, lora_r=4, max_steps=2))
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "msn.json").read_text())["lora"] is True
    from msn import load_model

    model, _ = load_model(out)
    assert not hasattr(model, "peft_config")  # merged into a plain model


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return rc, err.splitlines()[-1] if err else ""


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, tiny_dir, data_file, capsys):
    def write(name, text):
        p = tmp_path / name
        p.write_text(text)
        return str(p)

    good = json.dumps({"prompt": "a", "response": "b c d e f"})
    cases = [
        (["--data", str(tmp_path / "nope.jsonl")], "nope.jsonl: data file not found"),
        (["--data", write("m.jsonl", good + "\n{oops\n")], "m.jsonl:2: malformed JSON"),
        (["--data", write("u.jsonl", good + "\n" + json.dumps({"text": "x"}) + "\n")], "u.jsonl:2: unknown record shape"),
        (
            ["--data", write("a.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")],
            "a.jsonl:1: conversation has no assistant turn (field 'messages')",
        ),
        (["--data", write("e.jsonl", good + "\n"), "--max-length", "3", "--noise-length", "1"], "no usable samples"),
        (["--data", str(data_file), "--noise-length", "0"], "noise_length must be a positive integer"),
        (["--data", str(data_file), "--noise", "gauss"], "unknown noise type 'gauss'"),
    ]
    for i, (extra, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        rc, err = run_cli(["train", "--model", str(tiny_dir), "--output", str(out), *extra], capsys)
        assert rc == 2 and expected in err, (extra, err)
        assert err.startswith("msn train: error:"), err
        assert not out.exists(), "bad input must not write anything"
    rc, err = run_cli(["train", "--model", "no-such-preset", "--output", str(tmp_path / "x")], capsys)
    assert rc == 2 and "unknown model 'no-such-preset'" in err and not (tmp_path / "x").exists()
    busy = tmp_path / "busy"
    (busy / "checkpoint-5").mkdir(parents=True)
    rc, err = run_cli(["train", "--model", str(tiny_dir), "--data", str(data_file), "--output", str(busy)], capsys)
    assert rc == 2 and "holds checkpoints msn did not write (checkpoint-5); choose another --output" in err
    assert sorted(p.name for p in busy.iterdir()) == ["checkpoint-5"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, err = run_cli(["train", "--data", str(data_file), "--output", str(other), "--overwrite"], capsys)
    assert rc == 2 and "holds no msn run" in err and (other / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_two_process_ddp_run_with_torchrun(tmp_path, tiny_dir, data_file):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "msn.cli", "train", "--model", str(tiny_dir), "--data", str(data_file), "--output", str(out),
        "--max-steps", "2", "--batch-size", "2", "--eval-steps", "0", "--save-steps", "2", "--max-length", "64",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "msn.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 2
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "model.safetensors").is_file()


def test_bf16_mixed_precision_run(tmp_path, tiny_dir, data_file):
    meta = train(fast(tiny_dir, data_file, tmp_path / "bf16", bf16=True, max_steps=1, noise="uniform"))
    assert meta["bf16"] is True and meta["steps"] == 1 and meta["noise"]["type"] == "uniform"
    assert torch.isfinite(torch.tensor(meta["metrics"]["train_loss"]))
