"""A preset's 4-bit codes read from its GGUF blocks, so ``quantize="int4"`` runs the published weights.

The presets' GGUF files already are 4-bit: Q4_0/Q4_1 (blocks of 32, an fp16 scale and min) and Q4_K (super-blocks
of 256 = 8 sub-blocks of 32, 6-bit scales and mins under fp16 ``d``/``dmin``). Each is "groups of 32, scale and
offset", the layout of msn.int4's kernel, so the codes are taken as they are: no second rounding. Other tensor
types (Q8_0, Q5_x, Q6_K, float) have no exact 4-bit form; their layers stay in the float weights the preset was
converted to (GGUF's own dequantization) and are named once. Row permutations transformers applies while
converting (Llama's q/k rotary layout) are applied to the codes and scales alike, and every layer's 4-bit
weight is checked against the converted float weight, so a mapping mistake fails loudly instead of decoding
with wrong weights.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msn.errors import MsnError
from msn.int4 import Codes, QuantReport, quantize_model

GROUP = 32
TOLERANCE = 1e-2  # of the tensor's largest weight: bf16 rounding is ~4e-3 of a weight; a wrong row, ~1


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0: [n, 18] bytes -> codes [n, 32], scale [n, 1], offset [n, 1]; w = d * (q - 8)."""
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return _nibbles(blocks[:, 2:], 16), d, -8 * d


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1: [n, 20] bytes -> codes [n, 32], scale [n, 1], offset [n, 1]; w = d * q + m."""
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return _nibbles(blocks[:, 4:], 16), d, m


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K: [n, 144] bytes -> codes [n, 256], scale [n, 8], offset [n, 8]; w = d*sc_j * q - dmin*m_j."""
    from gguf.quants import Q4_K

    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    # 4 chunks of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c+1
    return _nibbles(blocks[:, 16:], 32), d * sc.astype(np.float32), -(dmin * mins.astype(np.float32))


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes in chunks of ``width``: each chunk's low nibbles, then its high nibbles (GGUF's order)."""
    n = qs.shape[0]
    chunks = qs.reshape(n, -1, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & np.uint8(0x0F)).reshape(n, -1)


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def decode_tensor(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GGUF reader tensor's (codes [out, in], scale [out, in/32], offset [out, in/32]), fp32 scales."""
    kind = tensor.tensor_type.name
    rows = tensor.data.shape[0]
    cols = int(tensor.shape[0])  # GGUF lists the shape innermost first
    block_size, block_bytes = _block(kind)
    codes, scale, offset = DECODERS[kind](tensor.data.reshape(-1, block_bytes))
    return (codes.reshape(rows, cols), scale.reshape(rows, cols // GROUP), offset.reshape(rows, cols // GROUP))


def _block(kind: str) -> tuple[int, int]:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]


@contextlib.contextmanager
def joined_gguf(parts: list[Path]) -> Iterator[Path]:
    """One GGUF path for a preset: the file itself, or its parts joined into a temporary file."""
    if len(parts) == 1:
        yield parts[0]
        return
    with tempfile.TemporaryDirectory(prefix="msn-gguf-") as tmp:
        path = Path(tmp) / "joined.gguf"
        with open(path, "wb") as w:
            for p in parts:
                with open(p, "rb") as r:
                    shutil.copyfileobj(r, w, 1 << 24)
        yield path


def _gguf_name(arch: str, num_layers: int):
    """Module name -> GGUF tensor name (gguf's own table, which transformers' conversion uses too)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        raise MsnError(f"int4: this gguf package does not know the architecture {arch!r}; upgrade gguf")
    return get_tensor_name_map(key, num_layers).get_name


def _processor(model: nn.Module, arch: str):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())


def _arch(reader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


@torch.no_grad()
def quantize_from_gguf(model: nn.Module, gguf_path: Path) -> QuantReport:
    """:func:`msn.int4.quantize_model` with every 4-bit layer's codes from ``gguf_path``'s blocks."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    arch = _arch(reader)
    gguf_name = _gguf_name(arch, model.config.num_hidden_layers)
    processor = _processor(model, arch)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embed = model.get_input_embeddings()
    embed_name = next((n for n, m in model.named_modules() if m is embed), None)

    def from_file(name: str, weight: torch.Tensor) -> Codes | str:
        gname = f"{gguf_name(name)}.weight"
        if gname not in tensors and tied and embed_name and weight is getattr(embed, "weight", None):
            gname = f"{gguf_name(embed_name)}.weight"  # a tied LM head is the embedding tensor
        if gname not in tensors:
            return "no tensor for it in the GGUF file"
        t = tensors[gname]
        kind = t.tensor_type.name
        if kind not in DECODERS:
            return f"GGUF {kind}: no exact 4-bit form"
        codes, scale, offset = (processor.process(a, gname).weights for a in decode_tensor(t))
        codes, scale, offset = (torch.from_numpy(np.ascontiguousarray(a)) for a in (codes, scale, offset))
        _check(name, gname, codes, scale, offset, weight)
        return Codes(codes, scale, offset, GROUP, kind)

    return quantize_model(model, GROUP, from_file)


def _check(name: str, gname: str, codes, scale, offset, weight: torch.Tensor) -> None:
    """The file's 4-bit weight must be the converted float weight (up to its dtype's rounding)."""
    if tuple(codes.shape) != tuple(weight.shape):
        raise MsnError(f"int4: GGUF tensor {gname} has shape {tuple(codes.shape)}, the model's {name} "
                       f"{tuple(weight.shape)}; the converted preset does not match its GGUF file")
    w = (codes.float().reshape(*scale.shape, GROUP) * scale[..., None] + offset[..., None]).reshape(codes.shape)
    ref = weight.detach().float()
    err = float((w - ref).abs().max())
    if err > TOLERANCE * float(ref.abs().max()) + 1e-6:
        raise MsnError(f"int4: GGUF tensor {gname}'s 4-bit weight differs from the model's {name} by up to {err:.3g}; "
                       "the converted preset does not match its GGUF file (delete the preset's cache folder to "
                       "convert it again)")
