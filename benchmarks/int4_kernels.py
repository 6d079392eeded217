"""Micro-probe: all Linear layers of one decoding step, per kernel, for M = rows verified (1 thread).

    python benchmarks/int4_kernels.py --shapes smollm2 --rows 1,8,16 --repeats 5

Random weights of the model's Linear shapes (no model load, a few seconds per kernel): bf16 ``F.linear``,
bf16 packed oneDNN (msn.decoding.packed's kernel), torch's ``aten._weight_int4pack_mm_for_cpu`` (group 32) with
bf16 activations (``--fp32``: fp32 too, slow), and torchao's int4 CPU path when it is importable
(``PYTHONPATH=<a pip --target folder with torchao>``: it is not a dependency). Prints the median milliseconds of
one pass over every layer (layers in model order, so the caches see what a forward sees).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# (in, out) per layer of one transformer block, the number of blocks, and the LM head.
SHAPES = {
    "smollm2": ([(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)], 30,
                (576, 49152)),
    "qwen0.5b": ([(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)], 24,
                 (896, 151936)),
}


def _layers(name: str) -> list[tuple[int, int]]:
    block, n, head = SHAPES[name]
    return block * n + [head]


def _time(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return 1000 * statistics.median(out)


def kernels(layers, group: int, fp32: bool = False):
    """name -> (per-layer state builder, per-layer call); built once per kernel, freed after."""
    from msn.int4 import Int4Linear

    def bf16(k, n):
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        return lambda x: F.linear(x, w)

    def packed(k, n):
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        p = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    def int4(k, n):
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        return Int4Linear.from_codes(q, torch.rand(n, k // group) * 0.01, torch.randn(n, k // group) * 0.01, group)

    out = {"bf16 F.linear": (bf16, torch.bfloat16), "bf16 packed oneDNN": (packed, torch.bfloat16),
           "int4 aten, bf16 act": (int4, torch.bfloat16)}
    if fp32:  # slow: the kernel's fp32 path is not vectorized (~20x the bf16 time)
        out["int4 aten, fp32 act"] = (int4, torch.float32)
    try:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        def ao(k, n):  # torchao 0.18's CPU int4 (Int4OpaqueTensor), a prototype there
            lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            quantize_(lin, PrototypeInt4WeightOnlyConfig(group_size=group))
            return lin

        out["int4 torchao opaque, bf16 act"] = (ao, torch.bfloat16)
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp32", action="store_true", help="also int4 with fp32 activations (slow)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    layers = _layers(args.shapes)
    print(f"{args.shapes}: {len(layers)} Linear layers, {args.threads} thread(s), ms per pass over all layers")
    print(f"{'kernel':32}" + "".join(f"{'M=' + str(m):>9}" for m in rows))
    with torch.inference_mode():
        for name, (build, dtype) in kernels(layers, args.group, args.fp32).items():
            calls = [(build(k, n), k) for k, n in layers]
            ms = []
            for m in rows:
                xs = {k: torch.randn(m, k, dtype=dtype) for k in {k for _, k in calls}}
                ms.append(_time(lambda xs=xs, calls=calls: [f(xs[k]) for f, k in calls], args.repeats))
            print(f"{name:32}" + "".join(f"{t:9.1f}" for t in ms), flush=True)
            del calls
    return 0


if __name__ == "__main__":
    sys.exit(main())
