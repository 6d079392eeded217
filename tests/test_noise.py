"""Noise: where it goes, what it draws, how long it is, and that it is reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msn.errors import InputError
from msn.training.noise import (
    NoiseConfig,
    ahead_from_draws,
    ahead_noise,
    apply_noise,
    run_lengths,
    sample_segments,
    seeded_generator,
    uniform_noise,
)


def runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each maximal True run of a 1-D bool tensor."""
    out, start = [], None
    for i, v in enumerate(row.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


@st.composite
def batches(draw):
    """Random id batches with a response region per row (possibly several turns, possibly empty)."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (b, t), generator=g)
    allowed = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        for _ in range(draw(st.integers(0, 3))):  # turns
            s = draw(st.integers(0, t))
            n = draw(st.integers(0, t))
            allowed[i, s : s + n] = True
    allowed[:, 0] = False  # position 0 is always prompt
    return ids, allowed, seed


@settings(max_examples=150, deadline=None)
@given(batches(), st.sampled_from(["ahead", "uniform"]), st.integers(1, 8), st.integers(1, 4))
def test_noise_stays_in_response_runs_short_and_ahead_tokens_come_from_before(batch, kind, length, segments):
    ids, allowed, seed = batch
    cfg = NoiseConfig(kind, length, segments)
    noisy, mask = apply_noise(ids, allowed, cfg, seeded_generator(seed), vocab_size=1000)
    assert ids.shape == noisy.shape
    assert not (mask & ~allowed).any(), "noise outside the response"
    assert torch.equal(noisy[~mask], ids[~mask]), "a position outside the noise mask changed"
    longest = run_lengths(allowed).max(dim=1).values
    for i in range(ids.shape[0]):
        segs = runs(mask[i])
        assert len(segs) <= segments
        # The first segment always fits (shortened if need be) unless the response region is too short.
        expected = min(length, int(longest[i]) - 1)
        if expected > 0:
            assert segs, "a sample with room for noise got none"
        for s, n in segs:
            assert 1 <= n <= length
            assert s + n < ids.shape[1] and allowed[i, s + n] and not mask[i, s + n], "no clean target after noise"
        if kind == "ahead":
            for p in mask[i].nonzero().flatten().tolist():
                assert int(noisy[i, p]) in ids[i, :p].tolist(), "ahead token not from earlier in the sequence"
                assert int(noisy[i, p]) in noisy[i, :p].tolist()


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(1, 6))
def test_one_segment_has_requested_length_when_it_fits(batch, length):
    ids, allowed, seed = batch
    mask = sample_segments(allowed, length, 1, 1.0, seeded_generator(seed))
    longest = run_lengths(allowed).max(dim=1).values
    for i in range(ids.shape[0]):
        segs = runs(mask[i])
        want = max(0, min(length, int(longest[i]) - 1))
        assert [n for _, n in segs] == ([want] if want else [])


def test_short_responses_get_shorter_segment_or_none():
    allowed = torch.zeros(4, 10, dtype=torch.bool)
    allowed[0, 5:6] = True  # 1 token: only the final token, never noised
    allowed[1, 5:8] = True  # 3 tokens: segment of 2 + 1 clean target
    allowed[2, 2:10] = True  # 8 tokens: the full 4
    # row 3: no response at all
    mask = sample_segments(allowed, 4, 1, 1.0, seeded_generator(0))
    assert mask.sum(dim=1).tolist() == [0, 2, 4, 0]
    assert mask[1, 5:7].all()
    noisy, _ = apply_noise(torch.arange(40).view(4, 10), allowed, NoiseConfig(length=4), seeded_generator(0))
    assert noisy.shape == (4, 10)


def test_final_response_token_never_noised_and_start_uniform():
    """Official rule: start uniform in [response_start, len - L): every start in range is used, none outside."""
    allowed = torch.zeros(1, 12, dtype=torch.bool)
    allowed[0, 3:] = True
    starts = set()
    g = seeded_generator(1)
    for _ in range(400):
        m = sample_segments(allowed, 4, 1, 1.0, g)
        assert not m[0, -1]
        starts.add(int(m[0].nonzero()[0]))
    assert starts == set(range(3, 12 - 4))


def test_several_segments_never_touch():
    allowed = torch.ones(2, 64, dtype=torch.bool)
    allowed[:, :4] = False
    mask = sample_segments(allowed, 4, 6, 1.0, seeded_generator(3))
    for i in range(2):
        segs = runs(mask[i])
        assert len(segs) == 6 and all(n == 4 for _, n in segs)  # runs never merge into one longer than L


def test_ahead_noise_matches_sequential_in_place_loop():
    """Vectorized result == the official sequential recipe, including re-drawing earlier noise."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        b, t = 3, 30
        ids = torch.randint(0, 50, (b, t), generator=g)
        mask = torch.rand(b, t, generator=g) < 0.5
        mask[:, 0] = False
        pos = torch.arange(t).expand(b, t)
        draw = (torch.rand(b, t, generator=g) * pos).long()
        got = ahead_from_draws(ids, mask, draw)
        ref = ids.clone()
        for i in range(b):
            for p in range(t):
                if mask[i, p]:
                    ref[i, p] = ref[i, draw[i, p]]
        assert torch.equal(got, ref)


def test_ahead_noise_skips_left_padding():
    ids = torch.tensor([[0, 0, 0, 7, 8, 9, 10, 11]])
    attn = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 5:7] = True
    for seed in range(30):
        out = ahead_noise(ids, mask, seeded_generator(seed), attn)
        assert set(out[0, 5:7].tolist()) <= {7, 8, 9}


def test_same_seed_same_noise_other_seed_other_noise():
    ids = torch.randint(0, 1000, (8, 100), generator=torch.Generator().manual_seed(0))
    allowed = torch.zeros_like(ids, dtype=torch.bool)
    allowed[:, 20:] = True
    cfg = NoiseConfig(length=4, segments=3)
    a = apply_noise(ids, allowed, cfg, seeded_generator(5))
    b = apply_noise(ids, allowed, cfg, seeded_generator(5))
    c = apply_noise(ids, allowed, cfg, seeded_generator(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_probability_noises_about_that_share_of_samples():
    allowed = torch.ones(2000, 16, dtype=torch.bool)
    allowed[:, 0] = False
    mask = sample_segments(allowed, 4, 1, 0.3, seeded_generator(0))
    share = mask.any(dim=1).float().mean().item()
    assert 0.25 < share < 0.35
    assert not sample_segments(allowed, 4, 1, 0.0, seeded_generator(0)).any()


def test_uniform_noise_within_vocab_and_none_is_identity():
    ids = torch.zeros(4, 50, dtype=torch.long)
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = uniform_noise(ids, mask, 7, seeded_generator(0))
    assert out.min() >= 0 and out.max() < 7 and (out != 0).any()
    noisy, m = apply_noise(ids, mask, NoiseConfig("none"), seeded_generator(0))
    assert torch.equal(noisy, ids) and not m.any()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"length": 0}, "noise_length"),
        ({"length": -3}, "noise_length"),
        ({"type": "gaussian"}, "noise"),
        ({"segments": 0}, "noise_segments"),
        ({"prob": 1.5}, "noise_prob"),
    ],
)
def test_bad_noise_settings_raise_one_line_errors(kwargs, field):
    with pytest.raises(InputError) as e:
        NoiseConfig(**kwargs)
    assert e.value.field == field and "\n" not in str(e.value)
    with pytest.raises(InputError):
        sample_segments(torch.ones(1, 5, dtype=torch.bool), 0)


def test_run_lengths():
    m = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert run_lengths(m).tolist() == [[2, 1, 0, 3, 2, 1, 0, 0]]
