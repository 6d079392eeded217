"""GPU check for the decoder (issues 10 and 15), one short run on a machine with a CUDA GPU.

What it measures, each section on its own (a failing section is recorded and the rest still run):
- ``bf16``: msn's output vs transformers' greedy ``generate`` for tiny random bf16 models of six families,
  every method (fp32 losslessness is the pytest suite with MSN_TEST_DEVICE=cuda, see gpu_check.sh). In bf16
  a tree forward and a one-token forward use different kernels, so an exact match is not expected
  everywhere; it reports how often it holds and the AR top-2 gap where it does not.
- ``latency``: eager t(n), one forward over n tree tokens on a 128-token cache, for random-weight models
  with the shapes of SmolLM2-135M, Qwen2.5-0.5B and Llama-3-8B (latency depends on shapes, not weights:
  nothing is downloaded).
- ``decode``: tokens/s of plain greedy decoding, transformers vs msn ``ar`` (128 new tokens; weights do
  not change an AR step's cost).
- ``compiled``: the compiled path (``mode="reduce-overhead"``, CUDA graphs): t(n), compile time, and
  ``ar+compile`` vs ``ar`` tokens/s on the same model. Last, as it compiles for minutes.

    python benchmarks/gpu_check.py --out gpu_check.json [--sections latency,decode,bf16,compiled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHAPES = {  # the text-model shapes of the real checkpoints (their config.json), weights random
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0),
}
EAGER_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMPILED_SIZES = (1, 8, 16, 32, 64)


def random_model(name: str, dtype=torch.bfloat16):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def section_bf16(result: dict, prompts: int) -> None:
    import random

    from conftest import FAMILIES, tiny_model

    import msn

    rng = random.Random(0)
    for family in FAMILIES:
        model = tiny_model(family, dtype=torch.bfloat16).to("cuda")
        rows = {m: {"equal": 0, "total": 0, "gaps": []} for m in msn.METHODS}
        for _ in range(prompts):
            unit = [rng.randrange(3, 128) for _ in range(rng.randint(1, 6))]
            prompt = [rng.randrange(3, 128) for _ in range(rng.randint(0, 4))] + unit * rng.randint(2, 4)
            ids = torch.tensor([prompt], device="cuda")
            ref = model.generate(ids, do_sample=False, max_new_tokens=32, pad_token_id=0)
            for method in msn.METHODS:
                out = msn.generate(model, ids, max_new_tokens=32, method=method, tree="auto")
                row = rows[method]
                row["total"] += 1
                if torch.equal(out.sequences, ref):
                    row["equal"] += 1
                    continue
                r, g = ref[0].tolist(), out.sequences[0].tolist()
                k = next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), min(len(r), len(g)))
                with torch.inference_mode():
                    top = model(ref[:, :k]).logits[0, -1].float().topk(2).values
                row["gaps"].append(round(float(top[0] - top[1]), 4))
        result[family] = {m: {"equal": r["equal"], "total": r["total"], "max_gap": max(r["gaps"], default=None),
                              "gaps": sorted(r["gaps"])[-5:]} for m, r in rows.items()}
        print(f"bf16 {family}: " + ", ".join(f"{m} {r['equal']}/{r['total']}" for m, r in rows.items()), flush=True)


def section_latency(result: dict, names: list[str]) -> None:
    """Eager t(n) for every shape (the curve ``--tree auto`` starts from on this GPU)."""
    from msn.decoding.costs import measure_forward

    for name in names:
        model = random_model(name)
        eager = measure_forward(model, EAGER_SIZES, repeats=5)
        result[name] = {"eager_ms": {k: round(v * 1e3, 3) for k, v in eager.items()}}
        print(f"t(n) {name} eager ms: {result[name]['eager_ms']}", flush=True)
        del model
        torch.cuda.empty_cache()


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode(entry: dict, model, labels: tuple[str, ...], new: int) -> dict:
    """Median tokens/s of 3 timed runs per label after one warm-up run (which compiles, compiled)."""
    import msn

    ids = torch.randint(0, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(1))
    ids = ids.to("cuda")
    runs = {
        "hf": lambda: model.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0),
        "ar": lambda: msn.generate(model, ids, max_new_tokens=new, method="ar", eos_token_id=[]),
        "ar+compile": lambda: msn.generate(model, ids, max_new_tokens=new, method="ar", eos_token_id=[],
                                           compile=True),
    }
    outs = {}
    for label in labels:
        fn = runs[label]
        try:
            start = time.perf_counter()
            outs[label] = fn()  # warm-up (compiles the compiled path)
            warm = time.perf_counter() - start
            entry[label] = {"tok_s": round(new / _timed(fn, 3), 1), "first_call_s": round(warm, 1)}
        except Exception as e:
            entry[label] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"decode {label}: {entry[label]}", flush=True)
    return outs


def section_decode(result: dict, names: list[str], new: int = 128) -> None:
    """Plain greedy tokens/s, eager: transformers' generate vs msn ``ar``."""
    for name in names:
        model = random_model(name)
        _decode(result.setdefault(name, {}), model, ("hf", "ar"), new)
        del model
        torch.cuda.empty_cache()


def section_compiled(result: dict, names: list[str], sizes: tuple[int, ...], new: int = 128) -> None:
    """The compiled path (static KV + CUDA graphs per bucket): its t(n), compile time, and ``ar`` tokens/s
    against eager ``ar`` on the same model (same cache length, so the decode reuses the bucket-1 graph)."""
    from msn.decoding.costs import measure_forward

    for name in names:
        model = random_model(name)
        entry = result.setdefault(name, {})
        entry["compiled_ms"], entry["compile_and_measure_s"] = {}, {}
        for size in sizes:  # one at a time, printed as it comes: each is a compilation of its own
            start = time.perf_counter()
            try:
                ms = round(measure_forward(model, [size], repeats=5, compiled=True)[size] * 1e3, 3)
            except Exception as e:
                entry["compiled_error"] = f"{type(e).__name__}: {e}"[:500]
                break
            entry["compiled_ms"][size] = ms
            entry["compile_and_measure_s"][size] = round(time.perf_counter() - start, 1)
            print(f"t(n) {name} compiled n={size}: {ms} ms ({entry['compile_and_measure_s'][size]} s to compile "
                  "and measure)", flush=True)
        outs = _decode(entry, model, ("ar", "ar+compile"), new)
        if len(outs) == 2:
            a, b = outs["ar"].sequences[0].tolist(), outs["ar+compile"].sequences[0].tolist()
            entry["first_difference"] = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            entry["compiled_flag"] = bool(outs["ar+compile"].compiled)
        del model
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", default="latency,decode,bf16,compiled")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--compiled-models", default="smollm2-135m,llama-3-8b")
    p.add_argument("--compiled-sizes", default=",".join(map(str, COMPILED_SIZES)),
                   help="tree sizes (buckets) to compile and time; each is one compilation")
    p.add_argument("--prompts", type=int, default=12, help="random prompts per family in the bf16 section")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; this script is for a GPU machine", file=sys.stderr)
        return 2
    import transformers

    names = [n for n in a.models.split(",") if n]
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for section in a.sections.split(","):
        start = time.perf_counter()
        report[section] = {}
        try:
            if section == "bf16":
                section_bf16(report[section], a.prompts)
            elif section == "latency":
                section_latency(report[section], names)
            elif section == "decode":
                section_decode(report[section], names)
            elif section == "compiled":
                section_compiled(report[section], [n for n in a.compiled_models.split(",") if n],
                                 tuple(int(n) for n in a.compiled_sizes.split(",")))
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception:
            report[section]["error"] = traceback.format_exc()[-2000:]
            print(report[section]["error"], flush=True)
        report[section]["seconds"] = round(time.perf_counter() - start, 1)
        a.out.write_text(json.dumps(report, indent=1) + "\n")  # after every section: a timeout keeps the rest
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
