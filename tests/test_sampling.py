"""Sampling is exact: msn's sampled tokens follow the model's processed distribution, for every method.

Three layers of evidence. (1) The coupled sampler alone, 10^4 seeds per setting: first-token frequencies
against the exact distribution (temperature / top-k / top-p / min-p applied by transformers' own warpers),
chi-square at significance level alpha = 0.001. (2) The whole engine with a draft tree (retrieval, Jacobi and
recycling drafts, accepted often): two-token sequences against the exact joint distribution p(x1) p(x2 | x1),
same test and level; a deliberately broken rule (drafts accepted when they equal the argmax, bonus sampled)
must FAIL it. (3) With the same seed every method and tree gives the same text as plain ``ar`` sampling, so
(1)-(2) cover them all.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

import msn
from msn.decoding import engine
from msn.decoding.sampling import CoupledSampler, Sampling
from msn.decoding.tree import TreeTemplate
from msn.decoding.verify import greedy_accept

ALPHA = 1e-3
SETTINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 10},
    {"temperature": 1.0, "min_p": 0.05},
]


def chi_square_statistic(counts: dict, probs: dict) -> tuple[float, int]:
    """Pearson's chi-square statistic and degrees of freedom; bins expected below 5 are pooled into one."""
    n = sum(counts.values())
    bins, pool_e, pool_o = [], 0.0, 0
    for k, p in probs.items():
        e, o = n * p, counts.get(k, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
        else:
            bins.append((o, e))
    if pool_e > 0:
        bins.append((pool_o, pool_e))
    return sum((o - e) ** 2 / e for o, e in bins), max(len(bins) - 1, 1)


def chi_square_pvalue(counts: dict, probs: dict) -> float:
    """Pearson's chi-square goodness of fit; p-value by the Wilson-Hilferty normal approximation (no scipy
    here)."""
    assert all(k in probs and probs[k] > 0 for k in counts), "a sample outside the distribution's support"
    stat, dof = chi_square_statistic(counts, probs)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def exact(logits_row: torch.Tensor, settings: dict) -> dict[int, float]:
    p = CoupledSampler(Sampling(**settings)).processed(logits_row).exp()
    return {i: float(v) for i, v in enumerate(p.tolist()) if v > 0}


def test_chi_square_helper_tells_right_from_wrong():
    probs = {0: 0.5, 1: 0.3, 2: 0.2}
    assert chi_square_pvalue({0: 5000, 1: 3000, 2: 2000}, probs) > 0.5
    assert chi_square_pvalue({0: 5300, 1: 2800, 2: 1900}, probs) < 1e-6


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_sampler_first_token_follows_the_exact_distribution(settings):
    model = tiny_model("llama", seed=1)
    prompt = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        row = model(prompt).logits[0, -1]
    probs = exact(row, settings)
    counts: dict[int, int] = {}
    for seed in range(10_000):
        t = CoupledSampler(Sampling(**settings, seed=seed)).sample(row, position=4)
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) <= set(probs), "never a token the warpers removed"
    assert chi_square_pvalue(counts, probs) > ALPHA


def _pairs(model, prompt, n_seeds, settings, tree):
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for seed in range(n_seeds):
        out = msn.generate(model, prompt, max_new_tokens=2, method="tr-jacobi", tree=tree, do_sample=True,
                           seed=seed, eos_token_id=[], **settings)
        pair = tuple(out.sequences[0, -2:].tolist())
        counts[pair] = counts.get(pair, 0) + 1
        accepted += out.steps == 1
    return counts, accepted / n_seeds


def _exact_pairs(model, prompt, settings):
    with torch.no_grad():
        p1 = exact(model(prompt).logits[0, -1], settings)
        out = {}
        for x1, q1 in p1.items():
            row = model(torch.cat([prompt, torch.tensor([[x1]])], dim=1)).logits[0, -1]
            for x2, q2 in exact(row, settings).items():
                out[(x1, x2)] = q1 * q2
    return out


def test_engine_sequences_follow_the_exact_joint_and_a_broken_rule_fails(monkeypatch):
    model = tiny_model("llama", seed=1)
    settings = {"temperature": 0.8, "top_p": 0.95}
    prompt = torch.tensor([[5, 9, 17, 5, 9, 17, 5, 9]])  # retrieval drafts "17 5 ..."
    tree = TreeTemplate(((0,), (1,), (0, 0)), 3, recycling=8)
    engine.decoder_state(model).sources["recycling"].next_ids = None  # a fresh table
    truth = _exact_pairs(model, prompt, settings)
    counts, one_step = _pairs(model, prompt, 2000, settings, tree)
    assert one_step > 0.2, "precondition: drafts are accepted often (both tokens in one step)"
    assert chi_square_pvalue(counts, truth) > ALPHA

    def broken(self, tree, logits, top_vals, top_ids):  # drafts by argmax, only the bonus sampled
        acc = greedy_accept(tree.children, logits.argmax(-1).tolist())
        node = acc.accepted[-1] if acc.accepted else 0
        return type(acc)(acc.accepted, self.sampler.sample(logits[node], self.length + len(acc.accepted)))

    monkeypatch.setattr(engine._Decoder, "accept", broken)
    bad, _ = _pairs(model, prompt, 2000, settings, tree)
    assert chi_square_pvalue(bad, truth) < 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_same_seed_same_text_for_every_method_and_tree(family):
    model = tiny_model(family, seed=2)
    prompt = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 11, 7, 8]])
    texts = {}
    for seed in range(4):
        ref = msn.generate(model, prompt, max_new_tokens=24, method="ar", do_sample=True, temperature=0.9,
                           top_k=40, seed=seed, eos_token_id=[]).sequences
        texts[seed] = ref[0].tolist()
        for method in msn.METHODS:
            for tree in ("auto", "official-68", "cpu-fp32-8"):
                out = msn.generate(model, prompt, max_new_tokens=24, method=method, tree=tree, do_sample=True,
                                   temperature=0.9, top_k=40, seed=seed, eos_token_id=[])
                assert torch.equal(out.sequences, ref), (seed, method, tree)
    assert len({tuple(t) for t in texts.values()}) > 1, "the seed changes the sample"
    greedy = msn.generate(model, prompt, max_new_tokens=24, method="ar", eos_token_id=[]).sequences[0].tolist()
    assert any(t != greedy for t in texts.values()), "sampling is not greedy decoding"


def test_sampling_through_transformers_generate():
    model = tiny_model("llama", seed=2)
    prompt = torch.tensor([[7, 8, 9, 10, 7, 8]])
    direct = msn.generate(model, prompt, max_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9, seed=5)
    via_hf = model.generate(prompt, custom_generate=msn.generate, do_sample=True, temperature=0.7, top_p=0.9,
                            seed=5, max_new_tokens=10)
    assert torch.equal(via_hf, direct.sequences)
