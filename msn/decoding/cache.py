"""The KV cache: one place for the differences between transformers versions.

After a tree forward the cache holds the committed prefix followed by every tree token. We keep the root
and the accepted nodes, moved to be contiguous, and drop the rest: the next step attends to exactly the
committed sequence, as plain decoding would.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def new_cache(model) -> DynamicCache:
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers: no per-layer types from the config
        cache = DynamicCache()
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()  # sliding layers must not forget entries we may still keep
    return cache


SPARE = 64  # cache entries a layer can grow into before its buffer is copied into a larger one
grow_in_place = True  # A/B switch (benchmarks/paired_variants.py: cache.grow_in_place=False): one request's
# cache concatenates per step as transformers' own does


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare capacity instead of concatenating: transformers' layer copies the
    whole cache every step (``torch.cat``): for B rows of the longest row's length that was a third of a batched
    step (SmolLM2, 8 requests); for one request at a long prompt it is a copy of every layer's cache per step.
    ``keys``/``values`` stay views of the buffer (a step's cut, :func:`keep_step_entries`, is a shorter view of
    it); a cache replaced from outside (a batch row joining or leaving) is copied into a fresh buffer at the next
    update. The spare room stays small: the batched attention reads the whole buffer
    (:func:`msn.decoding.attention.batched_attention`)."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            self._buffers = None
            return super().update(key_states, value_states, *args, **kwargs)
        length, n = self.keys.shape[-2], key_states.shape[-2]
        buffers = self._buffers
        if (buffers is None or buffers[0].shape[:2] != self.keys.shape[:2] or buffers[0].shape[-2] < length + n
                or buffers[0].data_ptr() != self.keys.data_ptr() or buffers[1].data_ptr() != self.values.data_ptr()):
            room = length + n + SPARE
            buffers = tuple(t.new_zeros(*t.shape[:2], room, t.shape[-1]) for t in (self.keys, self.values))
            buffers[0][:, :, :length], buffers[1][:, :, :length] = self.keys, self.values
            self._buffers = buffers
        buffers[0][:, :, length : length + n], buffers[1][:, :, length : length + n] = key_states, value_states
        self.keys, self.values = buffers[0][:, :, : length + n], buffers[1][:, :, : length + n]
        return self.keys, self.values


def growing(cache) -> None:
    """The cache's plain layers append into spare room from now on (sliding-window layers are left as they are)."""
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:
            layer.__class__ = _GrowingLayer


def cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prompt_forward(model, ids: torch.Tensor, rows: torch.Tensor | None, **kw):
    """The prefill forward, computing logits only at ``rows`` (positions of ``ids[0]``; None: only the
    last, which nothing reads). The LM head over a long prompt is ~20% of its prefill (SmolLM2, 700 tokens),
    work the decoder mostly does not need. Returns logits ``[len(rows), V]`` (None when rows is None)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1 if rows is None else rows, **kw)
        return None if rows is None else out.logits[0]
    out = model(input_ids=ids, use_cache=True, **kw)  # a model without logits_to_keep computes them all
    return None if rows is None else out.logits[0, rows]


def _kv_pairs(cache):
    if hasattr(cache, "layers"):
        yield from cache.layers
    else:  # transformers < 4.56: parallel lists
        for i in range(len(cache.key_cache)):
            yield _LegacyLayer(cache, i)


class _LegacyLayer:
    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    @property
    def keys(self):
        return self.cache.key_cache[self.i]

    @keys.setter
    def keys(self, v):
        self.cache.key_cache[self.i] = v

    @property
    def values(self):
        return self.cache.value_cache[self.i]

    @values.setter
    def values(self, v):
        self.cache.value_cache[self.i] = v


def keep_step_entries(cache, step_len: int, keep: torch.Tensor) -> None:
    """Of the last ``step_len`` cache entries (this step's tokens), keep those at ``keep`` (sorted,
    relative to the step start), contiguous, in order; drop the others."""
    m = keep.numel()
    contiguous = m == 0 or bool(int(keep[-1]) == m - 1)
    for layer in _kv_pairs(cache):
        keys, values = layer.keys, layer.values
        if keys is None or keys.numel() == 0:
            continue
        start = keys.shape[-2] - step_len
        if not contiguous:
            sel = keep.to(keys.device) + start
            keys[:, :, start : start + m] = keys[:, :, sel]
            values[:, :, start : start + m] = values[:, :, sel]
        layer.keys, layer.values = keys[:, :, : start + m], values[:, :, : start + m]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length -= step_len - m
            window = getattr(layer, "sliding_window", None)
            if window and layer.keys.shape[-2] > window - 1:
                layer.keys = layer.keys[:, :, -window + 1 :]
                layer.values = layer.values[:, :, -window + 1 :]


def tree_forward(model, kw: str, cache, tokens: torch.Tensor, positions: torch.Tensor,
                 ancestors: torch.Tensor | None, past: int) -> torch.Tensor:
    """One request's verification forward on a DynamicCache-like ``cache`` (``kw``: see cache_keyword): logits
    [n, V] for ``tokens`` at ``positions`` attending to the cache and their ``ancestors`` ([n, n] bool; None: a
    single token with the model's own causal mask)."""
    from msn.decoding.trie import tree_mask

    if ancestors is None:
        out = model(input_ids=tokens[None], use_cache=True, **{kw: cache})
    else:
        out = model(input_ids=tokens[None], position_ids=positions[None],
                    attention_mask=tree_mask(ancestors, past, model.dtype), use_cache=True, **{kw: cache})
    return out.logits[0]


class DynamicKV:
    """The eager verification path: transformers' DynamicCache, grown per step and cut back to the accepted
    path. Any model and any length, no warm-up; the reference the compiled path must match."""

    compiled = False

    def __init__(self, model, packing=None):
        self.model, self.kw, self.cache = model, cache_keyword(model), new_cache(model)
        if grow_in_place:
            growing(self.cache)
        self.packing = packing  # msn.decoding.packed.Packing while the request runs with packed weights

    @property
    def packed(self) -> bool:
        return self.packing is not None

    def prefill(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the prompt (``[1, L]``) into the cache; returns the logits at ``rows`` (see prompt_forward)."""
        if self.packing is not None:
            self.packing.use(0)
        return prompt_forward(self.model, ids, rows, **{self.kw: self.cache})

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ancestors: torch.Tensor | None,
                past: int) -> torch.Tensor:
        """Logits [n, V] for n new tokens at ``positions`` attending to the cache and their ``ancestors``
        ([n, n] bool; None: a single token with the model's own causal mask)."""
        if self.packing is not None:
            self.packing.use(tokens.shape[0])
        return tree_forward(self.model, self.kw, self.cache, tokens, positions, ancestors, past)

    def keep(self, past: int, step_len: int, keep: torch.Tensor) -> None:
        """After a step of ``step_len`` tokens written after ``past`` entries, keep those at ``keep``."""
        keep_step_entries(self.cache, step_len, keep)
