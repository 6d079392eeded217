"""Training throughput of MSN noise vs plain SFT: is the noise free? (target: ahead / none >= 0.97).

One process, one model, one optimizer, the same batches in the same order; the only difference between the
two arms is the collator's noise setting. Arms are interleaved in blocks (ABBA order) so drift in machine
load hits both equally. Reported: per-arm medians of tokens/s, the median of the per-round paired ratios
(the fairer estimate on a shared machine), and the collator's own time, the only place the arms differ.
A step is what ``Trainer`` does per batch: collate (+ noise), forward, backward, AdamW step.

    python benchmarks/train_throughput.py --model smollm2-135m --data stdlib-code --threads 1 --bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from msn import load_model
from msn.data import build_dataset
from msn.training.collator import MSNCollator
from msn.training.noise import NoiseConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="stdlib-code")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=16, help="ABBA rounds; each runs every arm for --block steps")
    p.add_argument("--block", type=int, default=1, help="steps per arm per round")
    p.add_argument("--noise-length", type=int, default=4)
    p.add_argument("--noise-segments", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as msn train --bf16")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype="fp32")
    model.train()
    steps_needed = 2 * a.rounds * a.block + 2
    ds = build_dataset(a.data, tok, "train", a.max_length, limit=steps_needed * a.batch_size)
    batches = [ds.samples[i : i + a.batch_size] for i in range(0, len(ds) - a.batch_size + 1, a.batch_size)]
    arms = {
        "none": MSNCollator(tok, NoiseConfig("none")),
        "ahead": MSNCollator(tok, NoiseConfig("ahead", a.noise_length, a.noise_segments)),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)

    def step(collator: MSNCollator, feats) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        batch = collator(feats)
        t1 = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return int(batch["attention_mask"].sum()), t1 - t0, t2 - t0

    # Warm-up: one step per arm (allocator, kernels), not timed.
    for c in arms.values():
        step(c, batches[0])
    per_block: dict[str, list[float]] = {k: [] for k in arms}
    collate_ms: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(a.rounds):
        order = ["none", "ahead"] if r % 2 == 0 else ["ahead", "none"]
        for arm in order:
            tokens, elapsed = 0, 0.0
            for j in range(a.block):
                # Both arms see the same batch sequence: block r of arm X uses the batches block r of arm Y uses.
                feats = batches[1 + (r * a.block + j) % (len(batches) - 1)]
                n, c_s, s = step(arms[arm], feats)
                tokens, elapsed = tokens + n, elapsed + s
                collate_ms[arm].append(c_s * 1e3)
            per_block[arm].append(tokens / elapsed)
        print(f"round {r + 1}/{a.rounds}: " + "  ".join(f"{k} {per_block[k][-1]:.0f} tok/s" for k in arms), flush=True)

    med = {k: statistics.median(v) for k, v in per_block.items()}
    # Each round's two blocks ran back to back under the same machine load: their ratio is the fairer estimate.
    paired = [x / y for x, y in zip(per_block["ahead"], per_block["none"], strict=True)]
    step_ms = 1e3 * a.batch_size * statistics.mean(len(s["input_ids"]) for s in ds.samples) / med["none"]
    collate = {k: statistics.median(v) for k, v in collate_ms.items()}
    result = {
        "model": a.model,
        "data": a.data,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "bf16": a.bf16,
        "noise_length": a.noise_length,
        "noise_segments": a.noise_segments,
        "rounds": a.rounds,
        "block_steps": a.block,
        "tokens_per_s_median": med,
        "tokens_per_s_blocks": per_block,
        "collate_ms_median": collate,
        "noise_cost_share_of_step": (collate["ahead"] - collate["none"]) / step_ms,
        "ratio_ahead_over_none": med["ahead"] / med["none"],
        "ratio_paired_median": statistics.median(paired),
        "ratio_paired_rounds": paired,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
    }
    keys = ("tokens_per_s_median", "collate_ms_median", "noise_cost_share_of_step", "ratio_ahead_over_none", "ratio_paired_median")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
