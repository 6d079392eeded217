"""benchmarks/noise_share.py: how much of ``--noise predicted`` is noise, per offset inside a segment."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import helpers
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "noise_share.py"


def load_script():
    return helpers.load_script(SCRIPT, "noise_share")


def samples(n: int = 6, t: int = 40, vocab: int = 50) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (t,), generator=g)
        labels = ids.clone()
        labels[:8] = -100  # a prompt: never noised
        out.append({"input_ids": ids, "labels": labels})
    return out


class NextTokenOracle:
    """Guesses the clean next token whatever its (noised) input: predicted noise is then never noise."""

    def __init__(self, clean: torch.Tensor, vocab: int = 50):
        self.clean, self.vocab = clean, vocab

    def __call__(self, input_ids, attention_mask):
        nxt = torch.cat([self.clean[:, 1:], self.clean[:, -1:]], dim=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


class CopyInput:
    """Guesses that the next token repeats its input: a segment's first guess is the clean token before it."""

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids, 50).float())


def test_segment_offsets_count_from_each_run_start():
    mod = load_script()
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert mod.segment_offsets(mask).tolist() == [[0, 0, 1, 2, 0, 0, 1, 0]]


def test_an_oracle_makes_predicted_noise_all_clean_and_ahead_noise_stays_noisy():
    mod = load_script()
    s = samples()
    clean = torch.stack([x["input_ids"] for x in s])
    res = mod.clean_share(NextTokenOracle(clean), s, length=4, segments=2, batch_size=len(s))
    assert res["positions"] == [12.0, 12.0, 12.0, 12.0]  # 6 samples x 2 segments per offset
    assert res["predicted"] == [1.0, 1.0, 1.0, 1.0]
    assert max(res["ahead"]) < 0.5  # ahead noise copies earlier tokens: rarely the clean one


def test_a_copying_model_leaves_predicted_noise_noisy():
    mod = load_script()
    s = samples()
    res = mod.clean_share(CopyInput(), s, length=4, segments=2, batch_size=3)
    assert max(res["predicted"]) < 0.5 and sum(res["positions"]) == 48
