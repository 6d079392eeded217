"""Linear layers with pre-packed weights for the eager CPU path: trees nearly as cheap as one token.

Eager PyTorch hands oneDNN each Linear's weight in its plain layout on every call; packing the weights once
into oneDNN's blocked layout (what inductor's ``freezing`` does for a compiled graph) makes a forward over a
few tree tokens cost little more than one token, without compiling anything (docs/results.md §16). In bf16
the packed kernel returns bit-identical results to the eager one for any number of tokens (tested), so every
forward uses it; in fp32 its rounding differs slightly from the one-token kernel that plain greedy decoding
uses, so only multi-token forwards (tree steps) use it there, and one-token steps and the prefill stay on the
model's own path.

Installed for one request (``with packing(model, True) as pk``) as per-layer ``forward`` overrides and removed
afterwards, so the user's model is never left changed; the packed copies are kept per layer (they cost the
layers' weight memory once more) and redone when a weight changes (training between requests).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("msn")
DTYPES = (torch.bfloat16, torch.float32)
BATCH_HINT = 16  # rows the blocked layout is tuned for (tree sizes on a CPU stay within 16 tokens)

_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Linear -> (weight key, packed weight)
_BROKEN: list[str] = []  # the reason packing failed once in this process (then it stays off)


def _ops_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._reorder_linear_weight) \
            and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def bf16_packable() -> bool:
    """oneDNN's bf16 linear needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only CPU (an AMD EPYC seen here)
    the reorder fails. Asked up front, so such a CPU decodes bf16 unpacked without a failure, and the failure
    does not switch packing off for fp32 models too (``_BROKEN`` is per process)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # an older torch without the probe: try, and fall back on failure as before


def resolve_pack(model, pack: bool | None, compile: bool) -> bool:
    """``pack=None`` (the default): on for a bf16/fp32 model on a CPU decoded eagerly, where the kernels
    exist. The compiled path packs its own weights (inductor's freezing); a GPU does not need it."""
    if compile or pack is False or _BROKEN:
        return False
    usable = model.device.type == "cpu" and model.dtype in DTYPES and _ops_available() and (
        model.dtype != torch.bfloat16 or bf16_packable())
    if pack and not usable:
        logger.warning("msn: pack=True needs a bf16/fp32 model on a CPU with oneDNN (bf16: AVX512 or AVX-NE-CONVERT); "
                       "decoding unpacked")
    return usable


def _key(weight: torch.Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


def _packed_weight(layer: nn.Linear) -> torch.Tensor:
    cached = _PACKED.get(layer)
    if cached is None or cached[0] != _key(layer.weight):
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), BATCH_HINT)
        cached = (_key(layer.weight), packed)
        _PACKED[layer] = cached
    return cached[1]


class Packing:
    """One request's packed forwards. ``use(n)`` before each forward over n tokens decides packed or not."""

    def __init__(self, model):
        self.exact = model.dtype == torch.bfloat16  # packed == eager bit for bit (fp32: rounding differs)
        self.on = False
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype == model.dtype
                       and m.weight.device.type == "cpu" and "forward" not in m.__dict__]

    def use(self, tree_tokens: int) -> None:
        """Before a verification forward over ``tree_tokens`` tokens (0: the prefill)."""
        self.on = self.exact or tree_tokens > 1

    def _forward(self, layer: nn.Linear, packed: torch.Tensor):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.on and x.dtype == packed.dtype:
                return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
            return F.linear(x, layer.weight, layer.bias)

        return forward

    def install(self) -> None:
        for i, layer in enumerate(self.layers):
            packed = _packed_weight(layer)
            if i == 0:  # fail here, not in the middle of an answer
                x = torch.zeros(1, layer.in_features, dtype=packed.dtype)
                torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
            layer.forward = self._forward(layer, packed)

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the Packing installed on it now


@contextmanager
def packing(model, enabled: bool) -> Iterator[Packing | None]:
    """Packed Linear layers for the duration of one request (None when not enabled or not possible).
    Re-entrant: inside a request (the t(n) measurement a request starts with) it yields the request's own
    Packing; a second one would find every layer taken and measure the unpacked path (docs/results.md §21)."""
    if not enabled:
        yield None
        return
    if model in _ACTIVE:
        yield _ACTIVE[model]
        return
    pk = Packing(model)
    try:
        pk.install()
    except (RuntimeError, TypeError) as e:  # a oneDNN build without these kernels, an odd layer, ...
        pk.remove()
        _BROKEN.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200])
        logger.warning("msn: packing the linear weights failed (%s); decoding unpacked", _BROKEN[0])
        yield None
        return
    _ACTIVE[model] = pk
    try:
        yield pk
    finally:
        del _ACTIVE[model]
        pk.remove()
