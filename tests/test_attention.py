"""msn.decoding.attention: grouped-head tree attention without repeat_kv, installed per request."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, tiny_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import msn
from msn.decoding import attention

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the grouped-head path is for CPU models")


class Grouped(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_equals_transformers_sdpa_with_a_tree_mask(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 5, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 12, 16, generator=g).to(dtype) for _ in range(2))
    allowed = torch.ones(5, 12, dtype=torch.bool)
    allowed[:, 7:] = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0],
                                   [1, 1, 0, 0, 1]], dtype=torch.bool)  # a tree over the last 5 entries
    mask = torch.zeros(1, 1, 5, 12, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    ours, _ = attention.gqa_sdpa_forward(Grouped(), q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(Grouped(), q, k, v, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, 5, 6, 16)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


def test_calls_it_does_not_cover_go_to_transformers(monkeypatch):
    calls = []
    monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward",
                        lambda *a, **kw: calls.append(kw) or ("theirs", None))
    q, k = torch.randn(1, 6, 1, 16), torch.randn(1, 2, 4, 16)
    mask = torch.zeros(1, 1, 1, 4)
    assert attention.gqa_sdpa_forward(Grouped(), q, k, k, None)[0] == "theirs", "no mask: the causal one-token path"
    assert attention.gqa_sdpa_forward(Grouped(), q, k, k, mask, dropout=0.1)[0] == "theirs"
    assert attention.gqa_sdpa_forward(Grouped(), q, k, k, mask, softcap=30.0)[0] == "theirs"
    assert attention.gqa_sdpa_forward(torch.nn.Module(), q, k, k, mask)[0] == "theirs", "no grouped heads"
    assert len(calls) == 4
    assert attention.gqa_sdpa_forward(Grouped(), q, k, k, mask)[0].shape == (1, 1, 6, 16)



@pytest.mark.parametrize("past", [3, 130, 900])
@pytest.mark.parametrize("with_mask", [False, True])
def test_a_bf16_one_token_step_attends_as_rows_with_the_same_result(past, with_mask, monkeypatch):
    """One query row in bf16 takes the rows path (torch's kernel is slow there): the same numbers as
    transformers' own sdpa attention, with the model's mask or with none (a plain step)."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape) or real(q, *a, **kw))
    gen = torch.Generator().manual_seed(past)
    q = torch.randn(1, 6, 1, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, past, 16, generator=gen).bfloat16() for _ in range(2))
    mask = torch.zeros(1, 1, 1, past, dtype=torch.bfloat16) if with_mask else None
    if with_mask:
        mask[..., : past // 3] = torch.finfo(torch.bfloat16).min  # a masked span: the mask must still apply
    ours, _ = attention.gqa_sdpa_forward(Grouped(), q, k, v, mask, scaling=0.25)
    assert calls == [(1, 2, 3, 16)], "the three query heads of each key/value head are one block of rows"
    theirs, _ = sdpa_attention_forward(Grouped(), q, k, v, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, 1, 6, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=1e-2)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=None if mask is None
                                               else mask.float(), scale=0.25, enable_gqa=True).transpose(1, 2)
    assert (ours.float() - reference).abs().max() <= (theirs.float() - reference).abs().max() + 1e-2


@pytest.mark.parametrize("past", [3, 130, 900])
@pytest.mark.parametrize("n", [2, 5, 12, 40])
def test_a_bf16_tree_step_attends_as_rows_bit_identical_to_grouped_sdpa(past, n, monkeypatch):
    """A bf16 tree step (n tokens, a tree mask) takes the rows path too: the g query heads of a key/value head
    as g x n rows of one head, the mask rows repeated per head. Bit-identical to torch's grouped-head call,
    which is what it replaces (so a bf16 answer is the one it was)."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape) or real(q, *a, **kw))
    gen = torch.Generator().manual_seed(past + n)
    q = torch.randn(1, 6, n, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, past + n, 16, generator=gen).bfloat16() for _ in range(2))
    allowed = torch.ones(n, past + n, dtype=torch.bool)
    allowed[:, past:] = torch.rand(n, n, generator=gen).tril() > 0.4
    allowed[:, past:].fill_diagonal_(True)
    mask = torch.zeros(1, 1, n, past + n, dtype=torch.bfloat16).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    ours, _ = attention.gqa_sdpa_forward(Grouped(), q, k, v, mask, scaling=0.25)
    assert calls == [(1, 2, 3 * n, 16)]
    theirs = real(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(1, 2)
    assert ours.shape == theirs.shape == (1, n, 6, 16)
    assert torch.equal(ours, theirs)


def test_fp32_and_multi_token_steps_keep_their_paths(monkeypatch):
    calls = []
    monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward",
                        lambda *a, **kw: calls.append(kw) or ("theirs", None))
    k = torch.randn(1, 2, 4, 16)
    assert attention.gqa_sdpa_forward(Grouped(), torch.randn(1, 6, 1, 16), k, k, None)[0] == "theirs"
    kb = k.bfloat16()
    assert attention.gqa_sdpa_forward(Grouped(), torch.randn(1, 6, 2, 16).bfloat16(), kb, kb, None)[0] == "theirs"
    assert len(calls) == 2

@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_installed_for_one_request_and_only_where_heads_are_grouped(family, monkeypatch):
    model = tiny_model(family)
    seen = []
    original = attention.gqa_sdpa_forward
    monkeypatch.setattr(attention, "gqa_sdpa_forward", lambda *a, **kw: seen.append(a[4] is not None) or original(*a, **kw))
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    out = msn.generate(model, ids, max_new_tokens=12, method="tr-jacobi")
    assert model.config._attn_implementation == "sdpa", "the user's model is left as it was"
    ar = msn.generate(model, ids, max_new_tokens=12, method="ar")
    assert torch.equal(out.sequences, ar.sequences)
    if family == "gpt2":  # one key/value head per query head: nothing to gain, never installed
        assert seen == []
    else:
        assert any(seen), "tree steps (a mask) went through the grouped-head path"


def test_restored_after_an_error_and_switched_off_globally(monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(RuntimeError), attention.gqa_attention(model) as on:
        assert on and model.config._attn_implementation == attention.NAME
        raise RuntimeError("mid-answer")
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(attention, "enabled", False)
    with attention.gqa_attention(model) as on:
        assert not on and model.config._attn_implementation == "sdpa"
    eager = tiny_model("llama")
    eager.config._attn_implementation = "eager"
    assert not attention.usable(eager), "a model the user set to eager attention keeps it"


def test_the_latency_curve_is_kept_per_attention_path(monkeypatch):
    """Grouped-head attention changes what a tree step costs, so its t(n) is not the repeat_kv path's: an
    A/B with ``attention.enabled=False`` (or a curve cached before it existed) must not share one."""
    from msn.decoding.costs import cache_key

    model = tiny_model("llama")
    key = cache_key(model, packed=True)
    assert "-gqa-" in key
    with attention.gqa_attention(model) as on:
        assert on and cache_key(model, packed=True) == key, "the same key inside the request"
    monkeypatch.setattr(attention, "enabled", False)
    assert "-gqa-" not in cache_key(model, packed=True)
    assert "-gqa-" not in cache_key(tiny_model("gpt2")), "no grouped heads"
    assert "-gqa-" not in cache_key(model, compiled=True), "the compiled path attends its own way"
