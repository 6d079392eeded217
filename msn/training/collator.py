"""The MSN collator: pad a training batch (:func:`msn.data.pad_batch`), then noise its target positions
(:mod:`msn.training.noise`). Moved here from ``msn.data.collate``: only training uses it, and ``msn.data`` no
longer depends on the noise."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from msn.data.chat import IGNORE
from msn.data.collate import _as_tensor, pad_batch
from msn.training.noise import NoiseConfig, apply_noise, seeded_generator


class MSNCollator:
    """Pad a list of samples and noise their inputs: the ``data_collator`` of HF ``Trainer`` or TRL ``SFTTrainer``.

    A sample needs ``input_ids``; it may carry ``labels`` (-100 = not a target), TRL's ``assistant_masks`` or
    ``completion_mask``, or an explicit ``noise_allowed`` mask (all zeros = keep this sample clean). Noise
    may touch only target positions. Labels come out exactly as they went in (plus -100 on padding).

    The noise of a batch is seeded from ``seed`` and the batch's own token ids, not from a running
    generator: dataloader workers, DDP ranks and a resumed run therefore all reproduce the same noise.
    Noise type ``predicted`` adds the ``noise_mask`` it placed (``[batch, seq]`` bool) for
    ``msn.training.predicted_noise.PredictedNoiseTrainer``, which refills those positions with the model's guesses.
    A ``noise_loss_weight`` other than 1 adds ``loss_weight`` (that weight at every noised input, 1 elsewhere)
    for ``msn.training.noise_loss.NoiseWeightedLossTrainer``.
    With HF ``Trainer``, set ``remove_unused_columns=False`` if samples carry extra mask keys.
    """

    def __init__(
        self,
        tokenizer=None,
        noise: NoiseConfig | None = None,
        seed: int = 0,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        noise_loss_weight: float = 1.0,
    ):
        self.noise = noise or NoiseConfig()
        self.noise_loss_weight = float(noise_loss_weight)
        self.seed = int(seed)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad_token_id or 0)
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
        self.vocab_size = vocab_size
        self.pad_to_multiple_of = pad_to_multiple_of

    def pad(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """:func:`pad_batch`, plus the ``noise_allowed`` mask: the sample's own, else its target positions."""
        batch = pad_batch(features, self.pad_token_id, self.pad_to_multiple_of)
        allowed = batch["labels"] != IGNORE
        for i, f in enumerate(features):
            if f.get("noise_allowed") is not None:
                n = int(batch["attention_mask"][i].sum())
                allowed[i, :n] = _as_tensor(f["noise_allowed"]).view(-1)[:n].bool()
        return {**batch, "noise_allowed": allowed}

    def batch_seed(self, input_ids: torch.Tensor) -> int:
        h = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=self.seed.to_bytes(8, "little", signed=True))
        return int.from_bytes(h.digest(), "little")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(features)
        allowed = batch.pop("noise_allowed")
        mask = torch.zeros_like(allowed)
        if self.noise.enabled and bool(allowed.any()):
            g = seeded_generator(self.batch_seed(batch["input_ids"]))
            batch["input_ids"], mask = apply_noise(
                batch["input_ids"], allowed, self.noise, g, self.vocab_size, batch["attention_mask"]
            )
        if self.noise.type == "predicted":
            batch["noise_mask"] = mask
        if self.noise_loss_weight != 1.0:
            batch["loss_weight"] = torch.where(mask, self.noise_loss_weight, 1.0).to(torch.float32)
        return batch
