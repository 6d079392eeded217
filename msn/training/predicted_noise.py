"""``--noise predicted``: a Trainer that refills the noised inputs with the model's own guesses.

Jacobi-like noise needs the model being trained -- its current weights, on its device, inside DDP / FSDP and
mixed precision -- so it cannot live in the data collator, which runs before the model sees the batch (maybe
in a dataloader worker). The collator places the segments and reports them as ``noise_mask``; this Trainer
runs one no-grad forward over the noised batch and puts the model's argmax predictions there
(:func:`msn.training.noise.predicted_noise`) before the ordinary loss.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from msn.training.noise import predicted_noise


class PredictedNoiseTrainer(Trainer):
    """HF ``Trainer`` whose loss (training and evaluation) first swaps ``noise_mask`` positions for the model's
    predictions at the shifted positions; ``noise_mask`` never reaches the model."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        mask = inputs.pop("noise_mask", None)
        if mask is not None:
            # Run even when the mask is empty: under FSDP a forward is collective, so every rank must run it.
            with torch.no_grad():
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
            inputs["input_ids"] = predicted_noise(inputs["input_ids"], mask, logits)
            del logits
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
