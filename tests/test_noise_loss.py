"""``--noise-loss-weight``: the loss at targets predicted from a noised input counts W times."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, tiny_model
from helpers import fast
from helpers import prompt_response_samples as samples

from msn.data import IGNORE
from msn.errors import InputError
from msn.training.collator import MSNCollator
from msn.training.noise import NoiseConfig
from msn.training.noise_loss import NoiseWeightedLossTrainer, weighted_lm_loss


def by_hand(logits: torch.Tensor, labels: torch.Tensor, noised: torch.Tensor, w: float) -> torch.Tensor:
    """The same loss written out one prediction at a time."""
    total, n = torch.tensor(0.0), 0
    for b in range(labels.size(0)):
        for i in range(labels.size(1) - 1):
            if labels[b, i + 1] == IGNORE:
                continue
            ce = F.cross_entropy(logits[b, i].float()[None], labels[b, i + 1][None])
            total += ce * (w if noised[b, i] else 1.0)
            n += 1
    return total / n


def test_collator_weights_exactly_the_noised_inputs():
    feats = samples()
    plain = MSNCollator(noise=NoiseConfig("ahead", 3, 2), seed=7, vocab_size=TINY_VOCAB)
    heavy = MSNCollator(noise=NoiseConfig("ahead", 3, 2), seed=7, vocab_size=TINY_VOCAB, noise_loss_weight=4.0)
    pred = MSNCollator(noise=NoiseConfig("predicted", 3, 2), seed=7, vocab_size=TINY_VOCAB, noise_loss_weight=4.0)
    a, h, p = plain(feats), heavy(feats), pred(feats)
    assert "loss_weight" not in a, "weight 1 (the paper's loss) changes nothing in the batch"
    assert torch.equal(a["input_ids"], h["input_ids"]) and torch.equal(a["labels"], h["labels"])
    w = h["loss_weight"]
    assert w.dtype == torch.float32 and w.shape == h["input_ids"].shape
    assert torch.equal(w == 4.0, p["noise_mask"]) and bool((w == 4.0).any())
    assert set(w.unique().tolist()) == {1.0, 4.0}
    assert ((w == 4.0).sum(1) % 3 == 0).all() and ((w == 4.0).sum(1) >= 3).all(), "whole segments of three"
    quiet = heavy([{**f, "noise_allowed": torch.zeros(len(f["input_ids"]))} for f in feats])
    assert bool((quiet["loss_weight"] == 1.0).all()), "clean (held-out) batches keep the plain loss"


def test_weighted_loss_is_the_models_own_loss_at_weight_one_and_the_hand_sum_otherwise():
    model = tiny_model("llama")
    batch = MSNCollator(noise=NoiseConfig("ahead", 4, 2), seed=1, vocab_size=TINY_VOCAB,
                        noise_loss_weight=3.0)(samples())
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    ones = torch.ones_like(batch["loss_weight"])
    torch.testing.assert_close(weighted_lm_loss(out.logits, batch["labels"], ones), out.loss)
    noised = batch["loss_weight"] != 1.0
    got = weighted_lm_loss(out.logits, batch["labels"], batch["loss_weight"])
    torch.testing.assert_close(got, by_hand(out.logits, batch["labels"], noised, 3.0))
    assert got > out.loss or got < out.loss, "the weight must change the loss"
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    half = weighted_lm_loss(out.logits, batch["labels"], batch["loss_weight"], num_items_in_batch=torch.tensor(2 * n))
    torch.testing.assert_close(half, got / 2), "over accumulated batches the Trainer's count divides"


@pytest.mark.parametrize("noise", ["ahead", "predicted"])
def test_trainer_loss_weights_the_noised_predictions_and_never_sends_the_weights(tmp_path, noise):
    from transformers import TrainingArguments

    from msn.training.train import trainer_class

    model = tiny_model("llama")
    batch = MSNCollator(noise=NoiseConfig(noise, 4, 2), seed=1, vocab_size=TINY_VOCAB, noise_loss_weight=5.0)(samples())
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((set(kw), kw["input_ids"].clone())), with_kwargs=True)
    cls = trainer_class(NoiseConfig(noise), 5.0)
    assert issubclass(cls, NoiseWeightedLossTrainer)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = cls(model=model, args=args)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    keys, ids = seen[-1]
    assert not keys & {"loss_weight", "noise_mask", "labels"}
    with torch.no_grad():  # the loss is over the batch the model saw (refilled for predicted)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, by_hand(logits, batch["labels"], batch["loss_weight"] != 1.0, 5.0))
    assert len(seen) == (3 if noise == "predicted" else 2)


def test_trainer_class_stays_plain_at_weight_one():
    from transformers import Trainer

    from msn.training.predicted_noise import PredictedNoiseTrainer
    from msn.training.train import trainer_class

    assert trainer_class(NoiseConfig("ahead"), 1.0) is Trainer
    assert trainer_class(NoiseConfig("predicted"), 1.0) is PredictedNoiseTrainer
    assert trainer_class(NoiseConfig("ahead"), 2.0) is NoiseWeightedLossTrainer


def test_msn_train_noise_loss_weight_runs_records_it_and_refuses_to_resume_with_another(
        tmp_path, tiny_dir, data_file, monkeypatch):
    from msn.training.train import train

    calls = []
    loss = NoiseWeightedLossTrainer.compute_loss

    def counting(self, model, inputs, *a, **kw):
        calls.append(inputs.get("loss_weight"))
        return loss(self, model, inputs, *a, **kw)

    monkeypatch.setattr(NoiseWeightedLossTrainer, "compute_loss", counting)
    cfg = fast(tiny_dir, data_file, tmp_path / "run", noise_loss_weight=4.0, noise_segments=2, eval_steps=2,
               eval_samples=4)
    meta = train(cfg)
    saved = json.loads((tmp_path / "run" / "msn.json").read_text())
    assert saved["noise_loss_weight"] == 4.0 == meta["noise_loss_weight"] and saved["steps"] == 2
    assert any(w is not None and bool((w == 4.0).any()) for w in calls), "training batches carry the weights"
    assert torch.isfinite(torch.tensor(saved["metrics"]["train_loss"])) and "eval_loss" in saved["metrics"]
    cfg.resume, cfg.noise_loss_weight = True, 1.0
    with pytest.raises(InputError, match="--noise-loss-weight 1.0 .the run has 4.0"):
        train(cfg)


@pytest.mark.parametrize(("weight", "noise", "match"), [
    (0.0, "ahead", "must be a positive number"),
    (float("nan"), "ahead", "must be a positive number"),
    (-2.0, "ahead", "must be a positive number"),
    (3.0, "none", "places none; drop the flag"),
])
def test_bad_noise_loss_weight_is_one_line_before_anything_loads(tmp_path, weight, noise, match):
    from msn.training.train import TrainConfig, train

    cfg = TrainConfig(model=str(tmp_path / "no-such-model"), output=str(tmp_path / "out"), noise=noise,
                      noise_loss_weight=weight)
    with pytest.raises(InputError, match=match) as e:
        train(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_train_help_lists_noise_loss_weight(capsys):
    from msn.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--noise-loss-weight" in capsys.readouterr().out
