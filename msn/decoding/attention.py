"""Tree attention over grouped key/value heads without copying the cache, on a CPU.

Given an explicit mask, transformers' ``sdpa`` attention repeats every key/value head for its group of query
heads (``repeat_kv``): a copy of the whole cache, per layer, per step, because CUDA's fused kernels would fall
back to the math kernel with a mask and grouped heads. Every tree step passes a mask (the 4-D tree mask), so on
a long prompt a tree step pays that copy where a one-token step (no mask) does not. On a CPU torch's own SDPA
takes grouped heads and a mask together (``enable_gqa``): 1.7-3.3x faster per layer at a 900-token cache
(docs/results.md §17). Installed for one request like the packed weights, and only where it is the same
computation: an ``sdpa`` model with grouped heads, on a CPU; any call with dropout, a soft cap, sinks or a
position bias goes to transformers' function unchanged, and so does a multi-token call without a mask. A
bf16 step of one request takes :func:`grouped_rows_attention` (torch's kernel is slow for few query rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "msn_gqa_sdpa"
enabled = True  # a process-wide switch, for A/B runs (benchmarks/paired_variants.py: attention.enabled=False)
tree_rows = True  # A/B switch: False sends bf16 tree steps to torch's grouped-head call (the path before §23)
_UNSUPPORTED = ("softcap", "sinks", "s_aux", "output_attentions")
ROWS_DTYPES = (torch.bfloat16, torch.float16)  # one query row is slow there; fp32 is not (§21)


def gqa_sdpa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, position_bias: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature: ``query`` [b, h, n, d], ``key``/``value`` [b, h_kv, L, d];
    returns ([b, n, h, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (dropout or position_bias is not None or query.device.type != "cpu" or groups <= 1
            or key.shape[-1] != value.shape[-1] or any(kwargs.get(k) for k in _UNSUPPORTED)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    if query.shape[0] > 1 and query.dtype in ROWS_DTYPES and attention_mask is not None:
        return batched_attention(query, key, value, attention_mask, scaling), None
    one_token = query.shape[2] == 1
    if query.dtype in ROWS_DTYPES and (attention_mask is None and one_token or attention_mask is not None
                                       and attention_mask.shape[1] == 1 and (one_token or tree_rows)):
        return grouped_rows_attention(query, key, value, attention_mask, scaling), None
    if attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def grouped_rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """One request's step attention with each key/value head's query heads as rows of one query block.

    torch's CPU flash kernel pays per (query head, block of rows) and is slow for few bf16 query rows
    (SmolLM2's shape at an 800-token cache: 0.9 ms per layer for one row against 0.27 ms for the same work as
    3 rows, docs/results.md §21; a 6-token tree at 1200 keys 505 -> 327 µs, §23). The g query
    heads that share a key/value head see the same keys and the same mask rows, so they are g x n rows of one
    head (the mask's n rows repeated per head). Each row is computed as before: the same result as
    ``enable_gqa`` (bit-identical in the tests). ``query`` [b, h, n, d] -> [b, n, h, d]."""
    b, h, n, d = query.shape
    kv = key.shape[1]
    rows = query.reshape(b, kv, (h // kv) * n, d)
    if attention_mask is not None and n > 1:
        length = attention_mask.shape[-1]
        attention_mask = attention_mask.expand(b, h // kv, n, length).reshape(b, 1, (h // kv) * n, length)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, n, value.shape[-1]).transpose(1, 2).contiguous()


def batched_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                      scaling: float | None) -> torch.Tensor:
    """Several requests' few tree tokens each (msn.decoding.batch), bf16/fp16: two batched matmuls and a float32
    softmax, the query heads of each key/value head as rows of one block. torch's CPU flash kernel pays per
    (row, head) block and is slow for few query rows: 8 requests x 1 token over 800 keys, 0.35 ms against
    0.88 ms per layer (docs/results.md §22). Not bit-identical to the flash kernel (the
    scores are rounded to bf16 before the softmax), so a lone request never comes here. ``query`` [b, h, n, d]
    -> [b, n, h, d]."""
    b, h, n, d = query.shape
    kv = key.shape[1]
    rows = query.reshape(b, kv, (h // kv) * n, d)
    mask = attention_mask.float()
    if mask.shape[2] != 1:  # [b, 1, n, L] -> the same rows for every query head of a group
        mask = mask.unsqueeze(2).expand(b, 1, h // kv, n, mask.shape[-1]).reshape(b, 1, (h // kv) * n, -1)
    key, value = _whole_buffer(key), _whole_buffer(value)
    if key.shape[-2] > mask.shape[-1]:  # the buffer's spare entries: never attended
        mask = F.pad(mask, (0, key.shape[-2] - mask.shape[-1]), value=float("-inf"))
    scores = torch.matmul(rows, key.transpose(-1, -2)).float() * (scaling or d**-0.5) + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)
    return out.reshape(b, h, n, value.shape[-1]).transpose(1, 2).contiguous()


def _whole_buffer(t: torch.Tensor) -> torch.Tensor:
    """``t`` [b, h, L, d] when it is the first L entries of a buffer [b, h, cap, d] (the batch's cache appends into
    spare room): the whole buffer, which a batched matmul reads in place, where the view would be copied first
    (the rows are not evenly spaced for it). The spare entries are zeros or old entries, finite, and masked."""
    b, h, length, d = t.shape
    s0, s1, s2, s3 = t.stride()
    if s3 != 1 or s2 != d or s1 == length * d or s1 % d or s0 != h * s1:
        return t
    cap = s1 // d
    need = t.storage_offset() + (b - 1) * s0 + (h - 1) * s1 + cap * d
    if need * t.element_size() > t.untyped_storage().nbytes():
        return t
    return t.as_strided((b, h, cap, d), (s0, s1, s2, s3))


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks transformers builds itself: sdpa's


def usable(model) -> bool:
    """An ``sdpa`` model on a CPU whose attention groups query heads (Llama, Qwen2, Mistral, Gemma, ...)."""
    config = model.config
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return (model.device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
            and isinstance(heads, int) and isinstance(kv_heads, int) and heads > kv_heads > 0)


def applies(model) -> bool:
    """Whether this model's eager tree steps attend through :func:`gqa_sdpa_forward`: installed now (inside a
    request) or would be. What its t(n) curve is keyed by."""
    installed = getattr(model.config, "_attn_implementation", None) == NAME
    return installed or (enabled and usable(model))


@contextmanager
def gqa_attention(model, wanted: bool = True) -> Iterator[bool]:
    """For the ``with`` block, the model's attention runs :func:`gqa_sdpa_forward`; the user's config is
    restored afterwards, also on an error. Yields whether it is installed."""
    if not (wanted and enabled and usable(model)):
        yield False
        return
    _register()
    config = model.config
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
