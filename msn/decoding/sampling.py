"""Lossless sampling with deterministic drafts, by coupling: every output position has its own noise.

For output position t we draw, from a generator seeded by (seed, t), one exponential variable E_t[v] per
vocabulary id. Given the model's processed distribution p at t (temperature, top-k, top-p, min-p applied, in
fp32, with transformers' ``generation_config`` semantics), the sampled token is argmax_v p(v) / E_t[v]: the
"exponential race", an exact sample from p (it is the Gumbel-max trick: -log E is Gumbel noise). The noise of
different positions is independent, so a whole sequence is an exact sample of the model's distribution.

Verification then works like greedy: a drafted token is accepted exactly when it equals the coupled sample at
its parent, and the bonus token is the coupled sample after the last accepted node. A draft x is accepted
with probability p(x); among siblings x1..xm (at most one can match) the chance that one is accepted is
sum p(xi) -- the same as the sequential multi-draft rule of method.md §8, which this rule is an instance
of (accept x1 w.p. p(x1); else x2 w.p. p(x2)/(1-p(x1)); ...). What coupling adds: the sample at t depends
only on (prefix, seed, t), never on which drafts happened to be in the tree, so the same seed gives the same
text for every method and every tree, ``ar`` included -- which is also how the tests check losslessness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from msn.decoding.verify import Acceptance
from msn.errors import MsnError

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")
# Below this, sampling is greedy decoding up to exact ties, and far below it (~1e-37) logits / temperature
# overflows fp32 to inf and the sample is token 0: refused, with 0 (greedy) named as the fix.
MIN_TEMPERATURE = 1e-6
_MIX = 0x9E3779B97F4A7C15  # spreads (seed, position) over the generator's seed space


def check_seed(seed) -> None:
    """torch's generators take 64-bit seeds; anything else would fail deep inside torch."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**64 - 1:
        raise MsnError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")


@dataclass(frozen=True)
class Sampling:
    """Processed-distribution settings (transformers' semantics: None means "off")."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_seed(self.seed)
        # bool is an int (True would pass as 1); inf would sample uniformly, NaN from nothing.
        t = self.temperature
        if isinstance(t, bool) or not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
            raise MsnError(f"temperature must be > 0 and finite for sampling, got {t!r} (use do_sample=False for "
                           "greedy decoding)")
        if t < MIN_TEMPERATURE:
            raise MsnError(f"temperature {t!r} is below {MIN_TEMPERATURE:g}: that is greedy decoding (and far below, "
                           "the logits / temperature overflow); use do_sample=False (temperature 0 in msn serve and "
                           f"the CLI) for greedy decoding, or a temperature >= {MIN_TEMPERATURE:g} to sample")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise MsnError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        for key in ("top_p", "min_p"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not (isinstance(v, int | float) and 0.0 <= v <= 1.0)):
                raise MsnError(f"{key} must be in [0, 1], got {v!r}")

    def warpers(self) -> list:
        """transformers' own warpers, in the order its ``generate`` applies them."""
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = []
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            out.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=float(self.top_p)))
        if self.min_p is not None:
            out.append(MinPLogitsWarper(min_p=float(self.min_p)))
        return out


def sampling_from(settings: dict, base=None, seed: int = 0) -> Sampling:
    """Settings from keywords over a generation config's values (the keywords win)."""
    values = {k: getattr(base, k, None) for k in SAMPLING_KEYS} if base is not None else {}
    values.update({k: v for k, v in settings.items() if v is not None})
    if values.get("temperature") is None:
        values["temperature"] = 1.0
    return Sampling(**{k: values.get(k) for k in SAMPLING_KEYS}, seed=seed)


class CoupledSampler:
    """The coupled sample at each output position, for one request."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.warpers = sampling.warpers()
        self._noise: dict[int, torch.Tensor] = {}

    def log_noise(self, position: int, vocab: int) -> torch.Tensor:
        """log E_t for absolute position t (cached while it may still be needed)."""
        noise = self._noise.get(position)
        if noise is None or noise.numel() != vocab:
            gen = torch.Generator().manual_seed((self.sampling.seed * _MIX + position) % (2**63))
            noise = torch.empty(vocab).exponential_(generator=gen).log_()
            self._noise[position] = noise
        return noise

    def forget_before(self, position: int) -> None:
        for t in [t for t in self._noise if t < position]:
            del self._noise[t]

    def processed(self, logits_row: torch.Tensor) -> torch.Tensor:
        """log p after the warpers, fp32 (-inf where a warper removed a token)."""
        scores = logits_row.float()[None]
        for w in self.warpers:
            scores = w(None, scores)
        return torch.log_softmax(scores[0], dim=-1)

    def sample(self, logits_row: torch.Tensor, position: int) -> int:
        """The coupled sample at ``position``: argmax of log p - log E."""
        logp = self.processed(logits_row)
        return int((logp - self.log_noise(position, logp.numel()).to(logp.device)).argmax())


def coupled_accept(children: Sequence[dict[int, int]], logits: torch.Tensor, sampler: CoupledSampler,
                   first_position: int) -> Acceptance:
    """Walk down from the root to the child equal to the coupled sample, as long as there is one.
    ``first_position`` is the output position of the root's next token."""
    accepted, node, position = [], 0, first_position
    while True:
        token = sampler.sample(logits[node], position)
        child = children[node].get(token)
        if child is None:
            return Acceptance(accepted, token)
        accepted.append(child)
        node, position = child, position + 1
