"""Held-out loss on clean input: the quality side of the noise trade-off (method.md section 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msn.data import IGNORE, iter_batches, pad_batch


@torch.no_grad()
def heldout_loss(model, samples: Sequence[dict[str, torch.Tensor]], batch_size: int = 4) -> dict[str, float]:
    """Token-weighted cross entropy and next-token accuracy over the label positions of ``samples``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        for feats in iter_batches(samples, batch_size):
            batch = pad_batch(feats)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits.float()
            logits, target = logits[:, :-1], labels[:, 1:]
            keep = target != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "perplexity": float(torch.exp(torch.tensor(min(loss, 50.0)))),
        "next_token_acc": correct / max(count, 1),
        "tokens": count,
        "samples": len(samples),
    }
