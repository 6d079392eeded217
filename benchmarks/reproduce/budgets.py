"""The experiment plans of the reproduce driver: per budget, the groups (base model + data) and their variants.

Every variant of a group shares data, steps, batch and seed; only the noise differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
METHODS = ("ar", "pld", "jacobi", "tr-jacobi")
BY_JACOBI = "tr-jacobi, Jacobi-drafted"  # paired column: accepted drafts per step a Jacobi node drafted
PAIRED = ("pld", "jacobi", "tr-jacobi", BY_JACOBI)
DENOISE_L = 4  # every model's denoising accuracy is measured at the same L, so rows compare
PAPER = {
    "speedup": (2.3, 2.7),
    "best_length": 4,
}
QUALITY_LOSS_TOL = 0.02  # "quality kept": held-out loss at most 2% above plain SFT ...
QUALITY_HE_PROBLEMS = 2  # ... and HumanEval at most 2 problems below plain SFT


# ---------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Variant:
    name: str  # e.g. "msn-L4x8"
    noise: str | None  # None: the base model, untrained; "none": plain SFT; "ahead": MSN; "predicted": see msn.training.noise
    length: int = 4
    segments: int = 1


BASE = Variant("base", None)
SFT = Variant("sft", "none")


def msn(length: int, segments: int = 1) -> Variant:
    return Variant(f"msn-L{length}" + (f"x{segments}" if segments > 1 else ""), "ahead", length, segments)


@dataclass
class Group:
    """One domain: a base model, its data, and the training / evaluation / bench settings shared by its variants."""

    name: str
    model: str
    data: str
    variants: list[Variant]
    train: dict[str, Any]  # msn train flags (without --model/--data/--output/noise)
    lora: bool = False
    lora_r: int = 16
    eval_limit: int = 64  # held-out samples for heldout-loss / denoise
    eval_max_length: int = 256
    eval_dtype: str = "fp32"
    humaneval: bool = False
    humaneval_limit: int | None = None  # None: all 164
    humaneval_max_new_tokens: int = 512
    humaneval_dtype: str = "bf16"
    humaneval_batch_size: int = 1  # >1: batched greedy (msn eval --batch-size), the same for every variant
    per_category: int = 1
    max_new_tokens: int = 128
    warmup: int = 1
    ablation: bool = False  # the noise-length ablation runs in this group
    ablation_segments: int = 1  # ... over the MSN variants with this many segments per sample
    distill: dict[str, Any] | None = None  # msn distill flags: train on the base model's own answers (issue 11)
    agreement_limit: int = 64  # held-out prompts for greedy agreement with the base model (distilled groups)

    @property
    def distill_key(self) -> str:
        """Groups with the same base model and prompts share one distilled file."""
        return f"{Path(self.model).name}-{Path(str((self.distill or {}).get('prompts', ''))).stem}"


def _train(steps: int, batch: int, accum: int, lr: float, warmup: int, max_length: int, eval_steps: int,
           save_steps: int, eval_samples: int, logging_steps: int, bf16: bool = True) -> dict[str, Any]:
    return dict(max_steps=steps, batch_size=batch, grad_accum=accum, lr=lr, warmup_steps=warmup,
                max_length=max_length, eval_steps=eval_steps, save_steps=save_steps, eval_samples=eval_samples,
                logging_steps=logging_steps, bf16=bf16, seed=0)


def _distill(prompts: str, limit: int, max_new_tokens: int, max_prompt_tokens: int, batch_size: int = 16,
             dtype: str = "bf16") -> dict[str, Any]:
    return dict(prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                batch_size=batch_size, dtype=dtype)


def budget(name: str) -> list[Group]:
    """The experiment plan of a budget. Every variant of a group shares data, steps, batch and seed."""
    general_variants = [BASE, SFT, msn(4), msn(4, 8), msn(1), msn(8)]
    code_variants = [BASE, SFT, msn(4), msn(4, 8)]
    if name == "toy":  # seconds: proves the pipeline, measures nothing
        t = _train(2, 2, 1, 5e-5, 0, 64, 2, 2, 4, 1)
        common = dict(eval_limit=4, eval_max_length=64, per_category=1, max_new_tokens=8, warmup=0)
        return [
            Group("general", "smollm2-135m", "sharegpt", general_variants, t, ablation=True, **common),
            Group("code", "qwen2.5-coder-0.5b", "stdlib-code", code_variants, t, lora=True, lora_r=4,
                  humaneval=True, humaneval_limit=1, humaneval_max_new_tokens=8, **common),
        ]
    if name == "cpu":  # a 2-core CPU: general ~2 h idle, code ~4 h (README); enough to see the density trade-off
        # One segment per sample learns denoising slowly at ~250k tokens (issue 5's probe on code saw nothing;
        # docs/results.md section 8: .039 -> .063 on ShareGPT), so the noise-length ablation runs at 8 segments
        # per sample, where the differences between lengths are clearer.
        return [
            Group("general", "smollm2-135m", "sharegpt",
                  [BASE, SFT, msn(4), msn(4, 8), msn(1, 8), msn(8, 8)],
                  _train(120, 8, 1, 5e-5, 10, 256, 40, 40, 64, 10), ablation=True, ablation_segments=8,
                  eval_limit=128, eval_max_length=256, per_category=2, max_new_tokens=128),
            Group("code", "qwen2.5-coder-0.5b", "stdlib-code", code_variants,
                  _train(120, 4, 2, 2e-4, 10, 256, 40, 40, 64, 10), lora=True, lora_r=16,
                  eval_limit=128, eval_max_length=256, humaneval=True, humaneval_limit=None,  # all 164: ~15 min
                  humaneval_max_new_tokens=256, per_category=1, max_new_tokens=128),
        ]
    if name == "gpu":  # paper-like: full fine-tuning, long sequences, 130 Spec-Bench questions, all of HumanEval
        return [
            Group("general", "smollm2-135m", "sharegpt", general_variants,
                  _train(2000, 16, 1, 2e-5, 50, 1024, 200, 200, 256, 20), ablation=True,
                  eval_limit=512, eval_max_length=1024, per_category=10, max_new_tokens=256, warmup=2),
            Group("code", "qwen2.5-coder-0.5b", "stdlib-code", code_variants,
                  _train(2000, 16, 1, 2e-5, 50, 1024, 200, 200, 256, 20),
                  eval_limit=512, eval_max_length=1024, humaneval=True, humaneval_limit=None,
                  humaneval_max_new_tokens=512, per_category=10, max_new_tokens=256, warmup=2),
        ]
    if name == "distill":  # issue 11: self-distilled data, >= 1M training tokens, on a 2-core CPU (hours)
        # SmolLM2's distilled samples average ~167 tokens (prompt ~57 with the system line, answer ~110), so
        # 3200 prompts leave ~3040 training samples = ~0.51M tokens; 760 steps of 8 = 2 epochs = ~1.0M tokens.
        general = _distill("sharegpt", 3200, 128, 128)
        general_train = _train(760, 8, 1, 5e-5, 20, 256, 190, 50, 64, 10)
        # The ablation budget of issue 11: today's ~0.25M tokens (190 steps) on the same distilled data.
        ablation_train = _train(190, 8, 1, 5e-5, 10, 256, 95, 50, 64, 10)
        common = dict(eval_limit=128, eval_max_length=256, per_category=2, max_new_tokens=128)
        return [
            Group("general", "smollm2-135m", "sharegpt", [BASE, SFT, msn(4, 4)], general_train,
                  distill=general, **common),
            # msn-L4x4-predicted: issue 11 item 2, the model's own (Jacobi-like) predictions as noise, vs msn-L4x4.
            Group("ablation", "smollm2-135m", "sharegpt",
                  [SFT, msn(1, 4), msn(4, 4), msn(8, 4), msn(4), Variant("msn-L4x4-predicted", "predicted", 4, 4)],
                  ablation_train, distill=general, ablation=True, ablation_segments=4, **common),
            # Qwen answers 2000 stdlib prompts in ~2 h (AMX Xeon, 2 threads, ~53 tok/s; answers average ~174 of
            # 192 tokens): ~1900 training samples of ~250 tokens. 120 steps of 8 = half an epoch = ~0.24M tokens
            # (the ablation's budget): ~37 s per step with one thread each when SFT and MSN train side by side,
            # so ~75 min; one epoch (240 steps) would leave no session time for quality and speed.
            Group("code", "qwen2.5-coder-0.5b", "stdlib-code",
                  [BASE, SFT, msn(4, 4), Variant("msn-L4x4-predicted", "predicted", 4, 4)],
                  _train(120, 4, 2, 2e-4, 10, 320, 60, 20, 64, 10), lora=True, lora_r=16,
                  distill=_distill("stdlib-code", 2000, 192, 128, batch_size=8), humaneval=True,
                  humaneval_max_new_tokens=256, humaneval_batch_size=8, eval_limit=128, eval_max_length=320, per_category=1,
                  max_new_tokens=128),
        ]
    raise ValueError(f"unknown budget {name!r}")
