"""Denoising accuracy: a cheap proxy, measurable during training, for how many drafts Jacobi decoding accepts.

On held-out samples we noise ONE segment of ``L`` response positions ``s .. s+L-1`` (ahead noise, fixed
seed, so every evaluation sees the same noise) and count how often the argmax at noised position ``s+k``
equals the clean token ``s+k+1``, for ``k = 0 .. L-1``: a model that denoises predicts the right next token
even though its own input there is wrong.

It lives with training: the Trainer callback (:mod:`msn.training.train`) reports it at every evaluation, and
``msn eval --task denoise`` runs the same function on a saved model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msn.data import IGNORE, iter_batches, pad_batch
from msn.training.noise import NoiseConfig, ahead_noise, sample_segments, seeded_generator


@torch.no_grad()
def denoise_accuracy(
    model,
    samples: Sequence[dict[str, torch.Tensor]],
    noise_length: int = 4,
    seed: int = 0,
    batch_size: int = 4,
) -> dict[str, float]:
    """``acc_k`` for each offset ``k``, their mean ``acc``, and ``n_k`` (positions scored at offset ``k``)."""
    NoiseConfig(length=noise_length)  # validates
    device = next(model.parameters()).device
    gen = seeded_generator(seed)
    hits = torch.zeros(noise_length, dtype=torch.long)
    counts = torch.zeros(noise_length, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for feats in iter_batches(samples, batch_size):
            batch = pad_batch(feats)
            ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
            mask = sample_segments(labels != IGNORE, noise_length, 1, 1.0, gen)
            noisy = ahead_noise(ids, mask, gen, attn)
            pred = model(input_ids=noisy.to(device), attention_mask=attn.to(device)).logits.argmax(-1).cpu()
            start = mask.float().argmax(dim=1, keepdim=True)  # first noised position of each row
            offset = torch.arange(ids.shape[1])[None, :] - start
            target = torch.full_like(ids, IGNORE)
            target[:, :-1] = ids[:, 1:]  # clean next token
            ok = pred == target
            for k in range(noise_length):
                at_k = mask & (offset == k) & (target != IGNORE)
                hits[k] += int((ok & at_k).sum())
                counts[k] += int(at_k.sum())
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    for k in range(noise_length):
        out[f"acc_{k}"] = float(hits[k]) / max(int(counts[k]), 1)
    for k in range(noise_length):
        out[f"n_{k}"] = int(counts[k])
    out["acc"] = float(hits.sum()) / max(int(counts.sum()), 1)
    return out
