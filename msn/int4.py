"""4-bit weights on the CPU: Linear layers that read a third of bf16's bytes per decoding step.

On a CPU, decoding a small model is bound by reading its weights; the presets are 4-bit GGUF files, so msn can
keep them in 4 bits instead of dequantizing them (``load_model(..., quantize="int4")``). The kernel is torch's
own ``aten._weight_int4pack_mm_for_cpu`` (docs/method.md §11-§11a): groups of 32/64/128 values along the input,
each with a scale and a zero, w = (q - 8) * scale + zero, q in 0..15. We call it directly instead of through
torchao: the same kernel, no tensor-subclass dispatch per call (measured faster at 1 row, benchmarks/
int4_kernels.py), and no extra dependency. Its output rows do not depend on how many rows are computed together
(tested), so a tree's verification forward gives each token the logits a one-token step would.

The kernel's cost grows steeply with the rows: one row reads a third of bf16's bytes and wins ~2x, but from ~5
rows on oneDNN's packed bf16 weights (msn.decoding.packed) are faster, and a prompt of hundreds of rows is many
times faster there. So with bf16 activations each layer also keeps its 4-bit weight dequantized to bf16 and
packed for oneDNN, and a forward over more than ``wide_rows`` rows (wide trees, the prefill) runs on it: the same
weights up to bf16 rounding (both are roundings of the one fp32 weight the codes define), at twice the memory.
fp32 activations never take that path: they are the exact reference (and slow: the kernel's fp32 path is not
vectorized).

Codes are given GGUF's way, w = scale * q + offset (Q4_1: scale = d, offset = m); the kernel's zero is
offset + 8 * scale. Layers that cannot be 4-bit (a shape the kernel refuses, a GGUF tensor stored in another
format) stay float and are named once, never skipped silently.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from msn.errors import InputError, MsnError

logger = logging.getLogger("msn")
QUANTIZE = ("none", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 32  # the GGUF block size: the finest group the kernel takes
N_MULTIPLE = 16  # the kernel packs output rows in tiles of 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activation dtypes the CPU kernel takes
WIDE_ROWS = 4  # bf16: forwards over more rows run on packed bf16 weights (crossover ~5 rows, benchmarks/int4_kernels.py)


def check_quantize(quantize: str | None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> str:
    """``quantize`` checked against the device and dtype, before any model loads: one line naming what and why."""
    q = "none" if quantize is None else quantize
    if q not in QUANTIZE:
        raise InputError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE)}", field="quantize")
    if q == "none":
        return q
    if str(device).split(":")[0] != "cpu":
        raise InputError(f"quantize {q!r} runs on the CPU only (torch's int4 CPU kernel); got device {str(device)!r}: "
                         "use --device cpu or --quantize none", field="quantize")
    if dtype not in DTYPES:
        raise InputError(f"quantize {q!r} needs fp32, bf16 or fp16 activations; got {dtype}", field="quantize")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise MsnError(f"quantize {q!r}: this torch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu; "
                       "upgrade torch or use --quantize none")
    return q


def unsupported_shape(in_features: int, out_features: int, group: int = DEFAULT_GROUP) -> str | None:
    """Why the kernel cannot take this layer (None: it can)."""
    if in_features % group:
        return f"input size {in_features} is not a multiple of the group size {group}"
    if out_features % N_MULTIPLE:
        return f"output size {out_features} is not a multiple of {N_MULTIPLE}"
    return None


class Int4Linear(nn.Module):
    """A Linear layer with 4-bit weights in the CPU kernel's packed layout; bias (if any) kept in float.

    ``scale_zero`` is kept in fp32 (exact for GGUF's fp16 scales) and cast once per activation dtype: the kernel
    wants both in the activations' dtype, so bf16 activations round the scales to bf16."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        self.wide: torch.Tensor | None = None  # the weight in bf16, packed for oneDNN (see the module docstring)
        self.wide_rows = WIDE_ROWS

    def attach_wide(self, weight: torch.Tensor, rows: int = WIDE_ROWS) -> None:
        """Run forwards over more than ``rows`` bf16 rows on ``weight`` (this layer's dequantized weight)."""
        from msn.decoding.packed import BATCH_HINT

        self.wide = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(),
                                                            BATCH_HINT)
        self.wide_rows = rows

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int = DEFAULT_GROUP,
                   bias: torch.Tensor | None = None) -> Int4Linear:
        """``codes`` [out, in] in 0..15, ``scale``/``offset`` [out, in / group]: w = scale * q + offset."""
        n, k = codes.shape
        if (why := unsupported_shape(k, n, group)) or group not in GROUP_SIZES:
            raise ValueError(why or f"group size {group} is not one of {GROUP_SIZES}")
        if scale.shape != (n, k // group) or offset.shape != scale.shape:
            raise ValueError(f"scale/offset {tuple(scale.shape)}/{tuple(offset.shape)} do not fit codes {(n, k)} "
                             f"in groups of {group}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
            raise ValueError("4-bit codes must lie in 0..15")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scale = scale.to(torch.float32)
        zero = offset.to(torch.float32) + 8 * scale
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [in / group, out, 2]
        return cls(packed, scale_zero, group, k, n, bias)

    def _scale_zero(self, dtype: torch.dtype) -> torch.Tensor:
        sz = self._cast.get(dtype)
        if sz is None or sz.device != self.scale_zero.device:
            sz = self._cast[dtype] = self.scale_zero.to(dtype)
        return sz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] == 0:
            out = x2.new_zeros(0, self.out_features)
        elif self.wide is not None and x2.shape[0] > self.wide_rows and x2.dtype == torch.bfloat16:
            return torch.ops.mkldnn._linear_pointwise(x2, self.wide, self.bias, "none", [], "").reshape(
                *shape[:-1], self.out_features)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self._scale_zero(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def dequantize(self, rows: int = 256) -> torch.Tensor:
        """The fp32 weight [out, in] the kernel computes with, read back through the kernel itself."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        sz = self._scale_zero(torch.float32)
        cols = [torch.ops.aten._weight_int4pack_mm_for_cpu(eye[i:i + rows], self.packed, self.group, sz)
                for i in range(0, self.in_features, rows)]
        return torch.cat(cols).t().contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"bias={self.bias is not None}")


def quantize_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max 4-bit codes of ``weight`` [out, in] per ``group`` inputs: (codes, scale, offset), w ~ scale*q + offset."""
    n, k = weight.shape
    w = weight.detach().to(torch.float32).reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale, code 0
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return codes, scale, lo


@dataclass(frozen=True)
class Codes:
    """One layer's 4-bit weight from a file: w = scale * q + offset per group."""
    codes: torch.Tensor  # [out, in] uint8 0..15
    scale: torch.Tensor  # [out, in / group] fp32
    offset: torch.Tensor  # [out, in / group] fp32
    group: int
    source: str  # e.g. "Q4_1"


@dataclass
class QuantReport:
    """What ``quantize_model`` did: layer names in 4 bits (by origin) and the ones left in float, with why."""
    quantized: dict[str, str] = field(default_factory=dict)  # name -> "Q4_1" / "Q4_K" / "float->int4 g32"
    left_float: dict[str, str] = field(default_factory=dict)  # name -> reason

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for how in self.quantized.values():
            kinds[how] = kinds.get(how, 0) + 1
        text = f"{len(self.quantized)} Linear layers in 4 bits ({', '.join(f'{v} {k}' for k, v in kinds.items())})"
        if self.left_float:
            text += "; left in float: " + "; ".join(_collapse(self.left_float))
        return text


def _collapse(names: Mapping[str, str]) -> list[str]:
    """``model.layers.{0,3}.mlp.down_proj (why)``: one entry per (pattern, reason), layer numbers listed."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, why in names.items():
        m = re.search(r"\.(\d+)\.", name)
        key = (name[:m.start()] + ".{}." + name[m.end():], why) if m else (name, why)
        groups.setdefault(key, []).append(m.group(1) if m else "")
    out = []
    for (pattern, why), idx in groups.items():
        shown = pattern.replace("{}", "{" + _ranges(idx) + "}" if len(idx) > 1 else idx[0]) if "{}" in pattern \
            else pattern
        out.append(f"{shown} ({why})")
    return out


def _ranges(idx: list[str]) -> str:
    """``0-23`` / ``0,1,3-5``: layer numbers, consecutive runs joined."""
    nums = sorted(int(i) for i in idx)
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}" for a, b in runs)


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's, stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t(), module.bias
    return None


FileCodes = Callable[[str, torch.Tensor], "Codes | str | None"]


@torch.no_grad()
def quantize_model(model: nn.Module, group: int = DEFAULT_GROUP, from_file: FileCodes | None = None,
                   wide_rows: int | None = WIDE_ROWS) -> QuantReport:
    """Replace the model's Linear layers (LM head included) by :class:`Int4Linear`, in place.

    ``from_file(name, weight)``: a layer's codes from the file the weights came from (a GGUF), a string saying why
    that layer stays float, or None to quantize it from its float weight. A model with no layer the kernel can
    take is an error; every layer left in float is named in the one log line. ``wide_rows``: with bf16 weights
    (where oneDNN packs bf16), forwards over more rows run on the dequantized weight in packed bf16 (None: never)."""
    report = QuantReport()
    targets = [(name, lw) for name, mod in model.named_modules() if (lw := _linear_weight(mod)) is not None]
    if not targets:
        raise MsnError(f"quantize 'int4': {type(model).__name__} has no Linear layers to quantize")
    wide = wide_rows is not None and _wide_available(targets[0][1][0])
    for name, (weight, bias) in targets:
        got = from_file(name, weight) if from_file is not None else None
        if isinstance(got, str):
            report.left_float[name] = got
            continue
        if got is None:
            if why := unsupported_shape(weight.shape[1], weight.shape[0], group):
                report.left_float[name] = why
                continue
            got = Codes(*quantize_groups(weight, group), group, f"float->int4 g{group}")
        new = Int4Linear.from_codes(got.codes, got.scale, got.offset, got.group, bias)
        if wide:
            new.attach_wide(dequantized(got), wide_rows)
        report.quantized[name] = got.source
        _set_module(model, name, new.to(weight.device))
    if not report.quantized:
        raise MsnError(f"quantize 'int4': none of the model's {len(targets)} Linear layers can be 4-bit here: "
                       + "; ".join(_collapse(report.left_float)))
    # What t(n)'s cache key reads: the wide path makes another curve.
    model._msn_quantize = f"int4-wide{wide_rows}" if wide else "int4"
    note = f"; forwards over more than {wide_rows} rows run on the weights in packed bf16" if wide else ""
    if targets[0][1][0].dtype == torch.float32:
        note += ("; fp32 activations take the kernel's unvectorized path (~20x slower than bf16): exact, for "
                 "checking; use bf16 for speed")
    logger.warning("msn: int4: %s%s", report.summary(), note)
    return report


def dequantized(codes: Codes) -> torch.Tensor:
    """The fp32 weight [out, in] the codes define: scale * q + offset per group."""
    n, k = codes.codes.shape
    q = codes.codes.to(torch.float32).reshape(n, k // codes.group, codes.group)
    return (q * codes.scale[..., None].float() + codes.offset[..., None].float()).reshape(n, k)


def _wide_available(weight: torch.Tensor) -> bool:
    from msn.decoding.packed import _ops_available, bf16_packable

    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and _ops_available() and bf16_packable()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantization(model: nn.Module) -> str:
    """``"int4"`` for a model :func:`quantize_model` converted, else ``"none"``."""
    return getattr(model, "_msn_quantize", "none").split("-")[0]
