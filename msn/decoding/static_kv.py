"""The compiled verification path: a preallocated KV buffer written in place, tree sizes padded to a few
buckets, and the model's forward compiled once per bucket (issue 15).

Eager PyTorch spends most of a small model's step in per-op overhead, and a growing cache reallocates every
step; with fixed shapes and an in-place cache, ``torch.compile`` (inductor, weights frozen) turns the
forward into a few fused kernels, so verifying 8 tokens costs what one eager token costs. Shapes are fixed
per bucket: a tree of n tokens runs as the next bucket size, the padding rows attend only to the first
cache entry and themselves (never a fully masked row, which would write NaN into the cache) and are never
accepted. The cache length is rounded up to a power of two, so requests of similar length share the
compiled graphs. inductor keeps its artifacts on disk (its FX graph cache), so a second process compiles
faster; the first call of each bucket still traces the model (tens of seconds on a small CPU).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from msn.decoding.cache import cache_keyword, prompt_forward

BUCKETS = (1, 8, 16, 32, 64)  # tree tokens per forward, root included (compiled, 8 cost what 1 costs eagerly)
CPU_AUTO_TOKENS = 16  # the auto tree on a CPU stays within 16 tokens: each bucket costs a minute to compile there
MIN_CACHE = 512
logger = logging.getLogger("msn")


def bucket(n: int) -> int:
    """The smallest bucket that holds n tree tokens (n itself beyond the largest, compiled on demand)."""
    return next((b for b in BUCKETS if b >= n), n)


def cache_length(tokens: int) -> int:
    """Static cache length for ``tokens`` (prompt + answer + the largest tree): a power of two >= 512."""
    length = MIN_CACHE
    while length < tokens:
        length *= 2
    return length


def buffer_length(total_tokens: int) -> int:
    """The static cache a request of ``total_tokens`` (prompt + answer) gets: room for the largest tree too."""
    return cache_length(total_tokens + BUCKETS[-1])


def unsupported(model) -> str | None:
    """Why this model cannot use the static path (None: it can)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and (not layer_types or "sliding_attention" in layer_types):
        return "sliding-window attention (its static cache is a ring buffer)"
    if any(t not in ("full_attention", "attention") for t in layer_types):
        return f"layer types {sorted(set(layer_types))}"
    return None


def resolve_compile(model, compile: bool | None) -> bool:
    """``compile=None`` (the default) means: on where it measurably wins, a CUDA model the static path can
    serve (docs/results.md §15: plain decoding 2.8x faster for an 8B shape, 6.7x for SmolLM2's); off on a CPU,
    where a step is bound by memory bandwidth and compiling costs minutes for no gain (§12)."""
    if compile is not None:
        return bool(compile)
    return model.device.type == "cuda" and unsupported(model) is None


@dataclass
class CompiledForwards:
    """Per model: the compiled forward and the static caches by length, reused across requests."""

    forward: object | None = None
    caches: dict[int, object] = field(default_factory=dict)
    warmed: set[tuple[int, int]] = field(default_factory=set)  # (cache length, bucket) already compiled
    failed: str | None = None  # compilation failed once: stay eager on this model


CPU_OPTIONS = {"freezing": True, "cpp_wrapper": True}  # one 1-token bf16 SmolLM2 step: 65.7 ms -> 56.7 ms (§12)


def compile_forward(model):
    """``torch.compile`` of the model's forward: inductor with frozen weights and a C++ (not Python) wrapper
    around the kernels on CPU, CUDA graphs on GPU."""
    if model.device.type == "cuda":
        return torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    return torch.compile(model.forward, dynamic=False, options=dict(CPU_OPTIONS))


class StaticKV:
    """Same interface as :class:`msn.decoding.cache.DynamicKV`; see the module docstring."""

    packed = False  # inductor's freezing packs the compiled graph's weights itself

    def __init__(self, model, total_tokens: int, holder: CompiledForwards):
        from transformers import StaticCache

        self.model, self.kw, self.holder = model, cache_keyword(model), holder
        self.length = buffer_length(total_tokens)
        cache = holder.caches.get(self.length)
        if cache is None:
            cache = StaticCache(config=model.config, max_cache_len=self.length)
            holder.caches[self.length] = cache
        self.cache = cache
        if holder.forward is None and holder.failed is None:
            holder.forward = compile_forward(model)
        self._min = torch.finfo(model.dtype).min

    @property
    def compiled(self) -> bool:
        """False once this model's compilation failed (its steps then run eagerly)."""
        return self.holder.failed is None

    def _set_length(self, n: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(n)

    def prefill(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Eager (prompt lengths vary): writes entries 0..L-1 of the buffer; logits at ``rows`` as
        DynamicKV.prefill."""
        self._set_length(0)
        return prompt_forward(self.model, ids, rows, **{self.kw: self.cache})

    def _mask(self, ancestors: torch.Tensor | None, n: int, size: int, past: int) -> torch.Tensor:
        device = self.model.device
        allowed = torch.zeros(size, self.length, dtype=torch.bool, device=device)
        allowed[:n, :past] = True
        if ancestors is None:
            allowed[0, past] = True
        else:
            allowed[:n, past:past + n] = ancestors
        pad = torch.arange(n, size, device=device)
        allowed[pad, 0] = True  # padding rows: the first entry and themselves, so no row is fully masked
        allowed[pad, past + pad] = True
        mask = torch.zeros(1, 1, size, self.length, dtype=self.model.dtype, device=device)
        return mask.masked_fill_(~allowed, self._min)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ancestors: torch.Tensor | None,
                past: int) -> torch.Tensor:
        n = tokens.shape[0]
        size = bucket(n)
        if size > n:
            tokens = torch.cat([tokens, tokens.new_zeros(size - n)])
            positions = torch.cat([positions, positions.new_full((size - n,), past)])
        self._set_length(past)
        kwargs = dict(input_ids=tokens[None], position_ids=positions[None],
                      attention_mask=self._mask(ancestors, n, size, past), use_cache=True, **{self.kw: self.cache})
        out = self._run(size, kwargs, past)
        return out.logits[0, :n]

    def _run(self, size: int, kwargs: dict, past: int):
        holder = self.holder
        if not self.compiled:
            return self.model(**kwargs)
        key = (self.length, size)
        if key in holder.warmed:
            return holder.forward(**kwargs)
        logger.info("msn: compiling the verification forward for %d tokens (cache %d; first use only, tens of "
                    "seconds)...", size, self.length)
        start = time.perf_counter()
        try:
            out = holder.forward(**kwargs)
        except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...: decode eagerly instead
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            holder.failed = f"{type(e).__name__}: {first}"[:200]
            logger.warning("msn: compilation failed (%s); decoding without compilation", holder.failed)
            self._set_length(past)  # a half-run step may have advanced the cache
            return self.model(**kwargs)
        holder.warmed.add(key)
        logger.info("msn: compiled in %.0f s", time.perf_counter() - start)
        return out

    def keep(self, past: int, step_len: int, keep: torch.Tensor) -> None:
        """Move the kept step entries (root + accepted path) to ``past, past+1, ...`` in place."""
        m = keep.numel()
        sel = keep.to(self.model.device) + past
        if m and not bool(int(keep[-1]) == m - 1):
            for layer in self.cache.layers:
                if getattr(layer, "is_initialized", False):
                    layer.keys[:, :, past:past + m] = layer.keys[:, :, sel]
                    layer.values[:, :, past:past + m] = layer.values[:, :, sel]
        self._set_length(past + m)


def auto_buckets(model) -> list[int]:
    """The buckets the auto tree can use on this model's device (see costs.grid)."""
    cap = CPU_AUTO_TOKENS if model.device.type == "cpu" else BUCKETS[-1]
    return [b for b in BUCKETS if b <= cap]


@torch.inference_mode()
def precompile(model, total_tokens: int, sizes: list[int] | None = None) -> None:
    """Compile, ahead of time, the buckets a request of ``total_tokens`` (prompt + answer) will run through, so
    no timed or served answer pays a compilation (a bench's warm-up, a server's start-up). Idempotent."""
    if unsupported(model) is not None:
        return
    kv = StaticKV(model, total_tokens, compiled_forwards(model))
    device = model.device
    kv.prefill(torch.zeros(1, 1, dtype=torch.long, device=device))
    for size in sizes or auto_buckets(model):
        tokens = torch.zeros(size, dtype=torch.long, device=device)
        chain = None if size == 1 else torch.ones(size, size, dtype=torch.bool, device=device).tril()
        kv.forward(tokens, torch.arange(1, 1 + size, device=device), chain, 1)
        kv.keep(1, size, torch.empty(0, dtype=torch.long, device=device))


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WARNED: weakref.WeakSet = weakref.WeakSet()


def compiled_forwards(model) -> CompiledForwards:
    """The model's compiled forward and static caches (shared by every decoder state of the model)."""
    return _FORWARDS.setdefault(model, CompiledForwards())


def make_kv(model, total_tokens: int, compile: bool, packing=None):
    """The verification path for one request: compiled static (``compile``, where the model allows it) or
    eager dynamic. A model the static path cannot serve is said once, then decoded eagerly."""
    from msn.decoding.cache import DynamicKV

    if compile:
        why = unsupported(model)
        if why is None:
            return StaticKV(model, total_tokens, compiled_forwards(model))
        if model not in _WARNED:
            _WARNED.add(model)
            logger.warning("msn: compile=True is not supported for this model (%s); decoding without compilation",
                           why)
    return DynamicKV(model, packing)
