"""MSN input noise: replace short segments of response *inputs* while the labels stay clean.

Everything here is a batched tensor operation over ``[batch, seq]``; the only Python loop runs over the
number of segments per sample (usually 1). Randomness comes from an explicit ``torch.Generator`` so the
same seed gives the same noise.

Rules (method.md section 1, generalised to several segments and multi-turn chats):

- a segment covers ``length`` consecutive noise-allowed positions (assistant tokens) and must be followed
  by one more allowed position, so the final response token is never noised (as in the official recipe:
  start uniform in ``[response_start, len - L)``);
- a region too short for ``length`` gets the longest segment that fits, or none: never an exception;
- several segments of one sample never overlap or touch, so no noised run is longer than ``length``;
- ``ahead`` noise draws each noised id uniformly from all earlier ids of the same sequence, in place
  (a draw may hit an earlier noised position and copy its noise), ``uniform`` draws from the vocabulary;
- ``predicted`` (optional, not the paper's) imitates a Jacobi draft: the collator places and fills the
  segments exactly as ``ahead`` does, then at training time one no-grad forward of the model over that noised
  batch replaces every noised input ``j`` by the model's own argmax at ``j - 1`` (:func:`predicted_noise`,
  ``msn.training.predicted_noise``). A segment's first token is then a guess from a clean prefix and each later one a
  guess conditioned on earlier noise -- what a Jacobi draft, predicted from earlier drafts, is at inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from msn.errors import InputError

NOISE_TYPES = ("ahead", "uniform", "none", "predicted")


@dataclass(frozen=True)
class NoiseConfig:
    """How to noise one batch. ``prob`` is the chance that a sample gets any noise at all."""

    type: str = "ahead"
    length: int = 4
    segments: int = 1
    prob: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in NOISE_TYPES:
            raise InputError(f"unknown noise type {self.type!r}; choose one of {', '.join(NOISE_TYPES)}", field="noise")
        if not isinstance(self.length, int) or self.length <= 0:
            raise InputError(f"noise_length must be a positive integer, got {self.length!r}", field="noise_length")
        if not isinstance(self.segments, int) or self.segments <= 0:
            raise InputError(
                f"noise_segments must be a positive integer, got {self.segments!r}", field="noise_segments"
            )
        if not 0.0 <= float(self.prob) <= 1.0:
            raise InputError(f"noise_prob must be in [0, 1], got {self.prob!r}", field="noise_prob")

    @property
    def enabled(self) -> bool:
        return self.type != "none" and self.prob > 0

    def to_dict(self) -> dict:
        return asdict(self)


def run_lengths(mask: torch.Tensor) -> torch.Tensor:
    """For each position, how many consecutive ``True`` positions start there (0 where ``mask`` is False)."""
    b, t = mask.shape
    idx = torch.arange(t, device=mask.device).expand(b, t)
    # Index of the first False at or after each position: a reversed running minimum.
    false_at = torch.where(mask, torch.full_like(idx, t), idx)
    next_false = torch.flip(torch.cummin(torch.flip(false_at, [1]), dim=1).values, [1])
    return next_false - idx


def sample_segments(
    allowed: torch.Tensor,
    length: int,
    segments: int = 1,
    prob: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick noise positions: a ``[B, T]`` bool mask of up to ``segments`` segments per row inside ``allowed``."""
    if length <= 0:
        raise InputError(f"noise_length must be a positive integer, got {length!r}", field="noise_length")
    allowed = allowed.bool()
    b, t = allowed.shape
    device = allowed.device
    noised = torch.zeros_like(allowed)
    if b == 0 or t == 0:
        return noised
    # Per-row segment length: the requested one, or the longest that still leaves one clean token after it.
    # (amax / argmax, not .max(dim): on a busy multi-threaded CPU the values+indices kernel is ~1000x slower.)
    longest = run_lengths(allowed).amax(dim=1)
    seg_len = torch.clamp(torch.minimum(longest - 1, torch.full_like(longest, length)), min=0)
    if prob < 1.0:
        keep = torch.rand(b, generator=generator, device=device) < prob
        seg_len = torch.where(keep, seg_len, torch.zeros_like(seg_len))
    pos = torch.arange(t, device=device)[None, :]
    for _ in range(segments):
        # Free = allowed, not noised, not next to noise (segments never touch).
        near = noised.clone()
        near[:, 1:] |= noised[:, :-1]
        near[:, :-1] |= noised[:, 1:]
        free = allowed & ~near
        valid = (run_lengths(free) >= (seg_len + 1)[:, None]) & (seg_len > 0)[:, None]
        scores = torch.rand(b, t, generator=generator, device=device).masked_fill(~valid, -1.0)
        start = scores.argmax(dim=1, keepdim=True)
        has = scores.gather(1, start) >= 0
        noised |= has & (pos >= start) & (pos < start + seg_len[:, None])
    return noised


def ahead_noise(
    input_ids: torch.Tensor,
    noise_mask: torch.Tensor,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace ``noise_mask`` positions by ids drawn uniformly from earlier positions of the same row.

    Matches the sequential in-place recipe exactly without a per-token loop: each noised position ``p``
    draws a source ``j < p``; if ``j`` is itself noised, its value is whatever ``j`` drew, so we follow
    source pointers to a clean position by pointer doubling (log of the chain length in steps).
    """
    b, t = input_ids.shape
    device = input_ids.device
    pos = torch.arange(t, device=device).expand(b, t)
    first = torch.zeros(b, dtype=torch.long, device=device)
    if attention_mask is not None:  # skip left padding: draw only from real tokens
        first = attention_mask.long().argmax(dim=1)
    span = (pos - first[:, None]).clamp(min=1)
    draw = first[:, None] + (torch.rand(b, t, generator=generator, device=device) * span).long()
    draw = torch.minimum(draw, (pos - 1).clamp(min=0))
    return ahead_from_draws(input_ids, noise_mask.bool() & (pos > first[:, None]), draw)


def ahead_from_draws(input_ids: torch.Tensor, noise_mask: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Apply ``ids[p] = ids[draw[p]]`` for every noised ``p`` in increasing order, all at once.

    Requires ``draw[p] < p`` wherever ``noise_mask``. Pointer doubling: a noised position points at its
    source; jumping ``ptr = ptr[ptr]`` until nothing moves lands every noised position on the clean one
    whose value the sequential in-place loop would have copied.
    """
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    ptr = torch.where(noise_mask.bool(), draw, pos)
    while True:
        nxt = ptr.gather(1, ptr)
        if torch.equal(nxt, ptr):
            break
        ptr = nxt
    return input_ids.gather(1, ptr)


def uniform_noise(
    input_ids: torch.Tensor,
    noise_mask: torch.Tensor,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace ``noise_mask`` positions by ids drawn uniformly from ``[0, vocab_size)`` (the paper's weaker variant)."""
    rnd = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    return torch.where(noise_mask.bool(), rnd.to(input_ids.dtype), input_ids)


def predicted_noise(input_ids: torch.Tensor, noise_mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Replace each ``noise_mask`` position ``j`` by ``logits[:, j - 1].argmax(-1)``: the model's guess of
    ``j`` from the (noised) inputs before it. Position 0 has no guess and stays as it is."""
    pred = logits.argmax(-1).to(input_ids.dtype)
    shifted = torch.cat([input_ids[:, :1], pred[:, :-1]], dim=1)
    return torch.where(noise_mask.bool(), shifted, input_ids)


def apply_noise(
    input_ids: torch.Tensor,
    allowed: torch.Tensor,
    config: NoiseConfig,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(noisy_ids, noise_mask)``; ``input_ids`` is not modified. Labels are never an input here."""
    if not config.enabled:
        return input_ids.clone(), torch.zeros_like(input_ids, dtype=torch.bool)
    mask = sample_segments(allowed, config.length, config.segments, config.prob, generator)
    if config.type in ("ahead", "predicted"):  # predicted: ahead now, the model's guesses at training time
        noisy = ahead_noise(input_ids, mask, generator, attention_mask)
    else:
        if vocab_size is None:
            raise InputError("uniform noise needs the vocabulary size", field="vocab_size")
        noisy = uniform_noise(input_ids, mask, vocab_size, generator)
    return noisy, mask


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return g
