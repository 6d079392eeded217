"""How much of ``--noise predicted`` is noise? For the training noise of one recipe (L x segments), the share of
noised inputs that equal the clean input at each offset k inside a segment, for ahead noise and for the model's
shifted guesses over the ahead-noised batch (exactly what ``PredictedNoiseTrainer`` feeds the loss):

    python benchmarks/noise_share.py --model runs/reproduce-distill/train/ablation-msn-L4x4-predicted \
        --data runs/reproduce-distill/distill/smollm2-135m-sharegpt.jsonl --limit 64

On a model's own (distilled) answers its guess from a clean prefix is usually the label itself, so a segment's
first "noisy" token is mostly clean: docs/results.md section 14f.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from msn.data import IGNORE, build_dataset, iter_batches, pad_batch
from msn.training.noise import NoiseConfig, apply_noise, predicted_noise, seeded_generator


def segment_offsets(mask: torch.Tensor) -> torch.Tensor:
    """Offset of each noised position from the start of its run of consecutive noised positions."""
    off = torch.zeros(mask.shape, dtype=torch.long)
    for j in range(1, mask.shape[1]):
        off[:, j] = torch.where(mask[:, j] & mask[:, j - 1], off[:, j - 1] + 1, 0)
    return off


@torch.no_grad()
def clean_share(model, samples: Sequence[dict[str, torch.Tensor]], length: int = 4, segments: int = 4,
                seed: int = 0, batch_size: int = 8) -> dict[str, list[float]]:
    """``{"ahead": [...], "predicted": [...], "positions": [...]}``: per offset k = 0..length-1, the share of
    noised inputs equal to the clean input, and how many noised positions were counted at k."""
    config = NoiseConfig(type="predicted", length=length, segments=segments)  # placed as ahead, as in training
    gen = seeded_generator(seed)
    same = {"ahead": torch.zeros(length), "predicted": torch.zeros(length)}
    n = torch.zeros(length)
    for feats in iter_batches(samples, batch_size):
        b = pad_batch(feats)
        ids, attn = b["input_ids"], b["attention_mask"]
        noisy, mask = apply_noise(ids, b["labels"] != IGNORE, config, gen, attention_mask=attn)  # the collator's
        pred = predicted_noise(noisy, mask, model(input_ids=noisy, attention_mask=attn).logits)
        off = segment_offsets(mask)  # segments never touch (sample_segments), so each run is one segment
        for k in range(length):
            at = mask & (off == k)
            n[k] += at.sum()
            same["ahead"][k] += (at & (noisy == ids)).sum()
            same["predicted"][k] += (at & (pred == ids)).sum()
    out = {name: (s / n.clamp(min=1)).tolist() for name, s in same.items()}
    out["positions"] = n.tolist()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="preset, folder or hub id (its guesses make the predicted noise)")
    p.add_argument("--data", required=True, help="training data (msn train --data), held-out split")
    p.add_argument("--limit", type=int, default=64, help="held-out samples")
    p.add_argument("--noise-length", type=int, default=4)
    p.add_argument("--noise-segments", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from msn.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="fp32")
    model.eval()
    ds = build_dataset(args.data, tok, "heldout", args.max_length, args.limit)
    res = clean_share(model, ds.samples, args.noise_length, args.noise_segments)
    print(f"{args.model}: noised positions per offset k: {[int(x) for x in res['positions']]}")
    for name in ("ahead", "predicted"):
        share = res[name]
        mean = sum(s * c for s, c in zip(share, res["positions"], strict=True)) / max(sum(res["positions"]), 1)
        print(f"{name:9s} share equal to the clean input, k=0..{args.noise_length - 1}: "
              + " ".join(f"{x:.3f}" for x in share) + f"  (mean {mean:.3f})")


if __name__ == "__main__":
    main()
