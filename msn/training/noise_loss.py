"""``--noise-loss-weight``: weight the loss at the targets predicted from a noised input.

Why: a Jacobi draft past the first is the model's guess from inputs that are themselves drafts, and a draft
two deep is accepted only if the guesses at both noised offsets are right. In the paper's plain mean those
targets are a small share of the loss (4 of ~200 response tokens per segment), so at a small budget the model
learns the clean next token and barely learns to denoise (docs/results.md section 14). A weight above 1 spends
more of the gradient there; 1 is the paper's loss.

The collator marks the noised inputs it placed and sends ``loss_weight`` (``[batch, seq]``, aligned to the
inputs: the weight of the prediction *made at* that input); :class:`NoiseWeightedLossTrainer` takes it out of
the model's inputs and hands it to transformers' ``compute_loss_func`` hook, so gradient accumulation and
multi-device token averaging stay transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from msn.data.chat import IGNORE


def weighted_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Causal LM cross-entropy where the prediction made at input ``i`` (of ``labels[i + 1]``) counts
    ``weights[i]`` times, divided by the number of targets (``num_items_in_batch`` when the Trainer counts
    them over accumulated batches and devices). All weights 1 gives exactly the usual mean loss."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    w = weights[:, :-1].to(logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view_as(labels)
    total = (ce * w).sum()  # ignored targets have ce 0
    n = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum()
    if isinstance(n, torch.Tensor):
        n = n.to(total.device)
    return total / n


class NoiseWeightedLossTrainer(Trainer):
    """HF ``Trainer`` whose loss weights each prediction by the batch's ``loss_weight`` (never sent to the model)."""

    def __init__(self, *args, **kwargs):
        self._loss_weight: torch.Tensor | None = None
        super().__init__(*args, compute_loss_func=self._weighted_loss, **kwargs)

    def _weighted_loss(self, outputs, labels, num_items_in_batch=None):
        if self._loss_weight is None:  # a batch from another collator: the plain mean
            weights = torch.ones(labels.shape, dtype=torch.float32)
        else:
            weights = self._loss_weight
        return weighted_lm_loss(outputs.logits, labels, weights, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        self._loss_weight = inputs.pop("loss_weight", None)
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        finally:
            self._loss_weight = None
