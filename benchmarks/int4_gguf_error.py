"""How far msn's int4 weights are from the GGUF's own dequantization, per GGUF tensor type.

    python benchmarks/int4_gguf_error.py --model smollm2-135m [--json runs/int4-gguf-error.json]

For every Linear layer msn runs in 4 bits (``load_model(..., quantize="int4")``), the weight the kernel computes
with is read back through the kernel (fp32 activations: ``Int4Linear.dequantize``) and compared with
``gguf.quants.dequantize`` of the same tensor (rows permuted as transformers' conversion does). With bf16
activations the kernel takes the scales and zeros in bf16: that weight is (q - 8) * bf16(scale) + bf16(zero),
computed here from the codes. The last column is today's ``--quantize none`` bf16 weights: bf16(GGUF
dequantization). Max abs difference over all tensors of a type, and the same relative to the tensors' largest
weight. A few seconds for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def errors(model_name: str) -> dict[str, dict[str, float]]:
    import gguf

    from msn.gguf_int4 import _gguf_name, _processor, decode_tensor, joined_gguf
    from msn.int4 import Int4Linear
    from msn.models import PRESETS, gguf_parts, load_model

    model, _ = load_model(model_name, dtype="fp32", quantize="int4")
    out: dict[str, dict[str, float]] = {}
    with joined_gguf(gguf_parts(PRESETS[model_name])) as path:
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        name_of = _gguf_name(arch, model.config.num_hidden_layers)
        processor = _processor(model, arch)
        for name, layer in model.named_modules():
            if not isinstance(layer, Int4Linear):
                continue
            gname = f"{name_of(name)}.weight"
            t = tensors[gname]
            ref = processor.process(gguf.quants.dequantize(t.data, t.tensor_type), gname).weights
            ref = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
            codes, _, _ = (torch.from_numpy(np.ascontiguousarray(processor.process(a, gname).weights))
                           for a in decode_tensor(t))
            sz = layer.scale_zero.to(torch.bfloat16).float()  # [in / group, out, 2]
            scale, zero = (sz[..., i].t().repeat_interleave(layer.group, dim=1) for i in (0, 1))
            w_bf16 = (codes.float() - 8) * scale + zero
            row = out.setdefault(t.tensor_type.name, {"tensors": 0, "max_abs_weight": 0.0, "int4_fp32_act": 0.0,
                                                      "int4_bf16_act": 0.0, "bf16_weights": 0.0})
            row["tensors"] += 1
            row["max_abs_weight"] = max(row["max_abs_weight"], float(ref.abs().max()))
            row["int4_fp32_act"] = max(row["int4_fp32_act"], float((layer.dequantize() - ref).abs().max()))
            row["int4_bf16_act"] = max(row["int4_bf16_act"], float((w_bf16 - ref).abs().max()))
            row["bf16_weights"] = max(row["bf16_weights"], float((ref.to(torch.bfloat16).float() - ref).abs().max()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a preset (its GGUF file is the reference)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    table = errors(args.model)
    print(f"{args.model}: max |msn int4 weight - GGUF dequantization| per tensor type")
    print("| GGUF type | tensors | max abs weight | int4, fp32 activations | int4, bf16 activations | bf16 weights "
          "(--quantize none) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, r in table.items():
        m = r["max_abs_weight"]
        print(f"| {kind} | {r['tensors']} | {m:.4g} | " + " | ".join(
            f"{r[k]:.3g} ({r[k] / m:.2g} rel)" for k in ("int4_fp32_act", "int4_bf16_act", "bf16_weights")) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "types": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
