"""``--noise predicted``: noised inputs refilled with the model's own shifted argmax (a Jacobi-like draft)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model
from helpers import fast
from helpers import prompt_response_samples as samples

from msn.training.collator import MSNCollator
from msn.training.noise import NoiseConfig, apply_noise, predicted_noise, seeded_generator


def test_predicted_noise_puts_the_previous_positions_argmax_on_noised_positions_only():
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    mask = torch.tensor([[False, False, True, True, False], [True, False, False, False, True]])
    guess = torch.tensor([[50, 51, 52, 53, 54], [60, 61, 62, 63, 64]])  # argmax at each position
    logits = torch.nn.functional.one_hot(guess, 100).float()
    out = predicted_noise(ids, mask, logits)
    # Position j gets the guess made at j - 1; position 0 has none and stays clean.
    assert out.tolist() == [[10, 11, 51, 52, 14], [20, 21, 22, 23, 63]]
    assert ids.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]], "the input must not be modified"


def test_collator_adds_the_noise_mask_for_predicted_only_and_places_noise_as_ahead_does():
    feats = samples()
    ahead = MSNCollator(noise=NoiseConfig("ahead", 3, 2), seed=7, vocab_size=TINY_VOCAB)
    pred = MSNCollator(noise=NoiseConfig("predicted", 3, 2), seed=7, vocab_size=TINY_VOCAB)
    a, p = ahead(feats), pred(feats)
    assert set(a) == {"input_ids", "attention_mask", "labels"}
    assert set(p) == {"input_ids", "attention_mask", "labels", "noise_mask"}
    # Ahead output is what it was before "predicted" existed: apply_noise seeded from the clean batch.
    clean = ahead.pad(feats)
    g = seeded_generator(ahead.batch_seed(clean["input_ids"]))
    want, mask = apply_noise(clean["input_ids"], clean["noise_allowed"], ahead.noise, g, TINY_VOCAB,
                             clean["attention_mask"])
    assert torch.equal(a["input_ids"], want) and torch.equal(p["input_ids"], want)
    assert p["noise_mask"].dtype == torch.bool and torch.equal(p["noise_mask"], mask) and mask.any()
    assert torch.equal(p["labels"], a["labels"])
    for kind in ("uniform", "none"):
        assert set(MSNCollator(noise=NoiseConfig(kind), vocab_size=TINY_VOCAB)(feats)) == set(a)
    # Clean samples (held-out loss): an all-False mask, so every batch has the same keys.
    quiet = pred([{**f, "noise_allowed": torch.zeros(len(f["input_ids"]))} for f in feats])
    assert not quiet["noise_mask"].any() and torch.equal(quiet["input_ids"], clean["input_ids"])


def test_trainer_loss_is_the_plain_loss_on_the_batch_refilled_by_hand(tmp_path):
    from transformers import TrainingArguments

    from msn.training.predicted_noise import PredictedNoiseTrainer

    model = tiny_model("llama")
    batch = MSNCollator(noise=NoiseConfig("predicted", 4, 2), seed=1, vocab_size=TINY_VOCAB)(samples())
    mask = batch["noise_mask"]
    with torch.no_grad():
        guess = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    want = batch["input_ids"].clone()
    for i, j in mask.nonzero().tolist():
        want[i, j] = guess[i, j - 1]
    assert not torch.equal(want, batch["input_ids"]), "the test needs guesses that differ from the ahead draws"
    with torch.no_grad():
        expected = model(input_ids=want, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((set(kw), kw["input_ids"].clone())), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = PredictedNoiseTrainer(model=model, args=args)
    labels = batch["labels"].clone()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, expected)
    assert all("noise_mask" not in keys for keys, _ in seen) and len(seen) == 2
    assert torch.equal(seen[1][1], want) and torch.equal(batch["labels"], labels)


def test_trainer_class_is_plain_for_every_other_noise_type():
    from transformers import Trainer

    from msn.training.predicted_noise import PredictedNoiseTrainer
    from msn.training.train import trainer_class

    for kind in ("ahead", "uniform", "none"):
        assert trainer_class(NoiseConfig(kind)) is Trainer
    assert trainer_class(NoiseConfig("predicted")) is PredictedNoiseTrainer


def test_msn_train_noise_predicted_runs_and_records_it(tmp_path, tiny_dir, data_file, monkeypatch):
    from msn.training.predicted_noise import PredictedNoiseTrainer
    from msn.training.train import train

    calls = []
    loss = PredictedNoiseTrainer.compute_loss

    def counting(self, model, inputs, *a, **kw):
        calls.append("noise_mask" in inputs)
        return loss(self, model, inputs, *a, **kw)

    monkeypatch.setattr(PredictedNoiseTrainer, "compute_loss", counting)
    meta = train(fast(tiny_dir, data_file, tmp_path / "run", noise="predicted", eval_steps=2, eval_samples=4))
    saved = json.loads((tmp_path / "run" / "msn.json").read_text())
    assert saved["noise"]["type"] == "predicted" and saved["steps"] == 2 == meta["steps"]
    assert calls and all(calls), "training and evaluation batches go through the refill"
    assert "eval_loss" in saved["metrics"] and torch.isfinite(torch.tensor(saved["metrics"]["train_loss"]))


def test_train_help_lists_predicted(capsys):
    from msn.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "predicted" in capsys.readouterr().out
