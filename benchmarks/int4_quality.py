"""What 4-bit weights cost in quality: held-out loss and greedy agreement, int4 against the bf16 model.

    python benchmarks/int4_quality.py --model smollm2-135m --limit 64 --prompts 24 --out runs/int4-quality.json

Three weight formats of one preset: ``bf16`` (today's dequantized weights), ``int4`` as it decodes (the 4-bit
kernel for forwards of up to ``WIDE_ROWS`` rows, packed bf16 of the same codes for wider ones) and
``int4-kernel`` (every forward on the 4-bit kernel, the scales rounded to bf16). Held-out loss on the built-in
``stdlib-code`` held-out split (a long forward: the ``int4`` row runs it on the wide path, ``int4-kernel`` on the
kernel); greedy agreement: ``ar`` answers to ShareGPT first turns, each format against bf16, token for token
(share identical, mean share of the bf16 answer's tokens before the first difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from msn.data import build_dataset, iter_records
from msn.decoding import generate
from msn.eval.loss import heldout_loss
from msn.int4 import Int4Linear
from msn.models import load_model
from msn.outputs import atomic_write_text
from msn.prompting import encode_chat, eos_ids


def kernel_only(model) -> None:
    """Every forward on the 4-bit kernel, however many rows (no packed bf16 copy)."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.wide = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=64, help="held-out samples")
    p.add_argument("--prompts", type=int, default=24, help="ShareGPT first turns for greedy agreement")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    formats = {"bf16": load_model(a.model, dtype="bf16")}
    formats["int4"] = load_model(a.model, dtype="bf16", quantize="int4")
    formats["int4-kernel"] = load_model(a.model, dtype="bf16", quantize="int4")
    kernel_only(formats["int4-kernel"][0])
    tok = formats["bf16"][1]
    samples = build_dataset("stdlib-code", tok, "heldout", 512, a.limit).samples
    prompts = []
    for record in iter_records("sharegpt", "heldout"):
        user = next((m["content"] for m in record.messages if m["role"] == "user"), "")
        if 0 < len(user) < 1500:
            prompts.append(user)
        if len(prompts) >= a.prompts:
            break
    results: dict[str, dict] = {}
    answers: dict[str, list[list[int]]] = {}
    for name, (model, _) in formats.items():
        res = heldout_loss(model, samples, batch_size=4)
        eos = eos_ids(model, tok)
        answers[name] = []
        for text in prompts:
            ids = encode_chat(tok, [{"role": "user", "content": text}])
            out = generate(model, ids, max_new_tokens=a.max_new_tokens, method="ar", eos_token_id=eos)
            answers[name].append(out.sequences[0, ids.shape[1]:].tolist())
        results[name] = {"heldout_loss": res["loss"], "next_token_acc": res["next_token_acc"], "tokens": res["tokens"]}
        print(f"{name}: held-out loss {res['loss']:.4f} (acc {res['next_token_acc']:.4f}, {res['tokens']} tokens)",
              flush=True)
    for name in ("int4", "int4-kernel"):
        same, prefix = [], []
        for ref, got in zip(answers["bf16"], answers[name], strict=True):
            n = next((i for i, (x, y) in enumerate(zip(ref, got, strict=False)) if x != y), min(len(ref), len(got)))
            same.append(ref == got)
            prefix.append(n / max(len(ref), 1))
        results[name]["greedy_identical"] = sum(same) / len(same)
        results[name]["greedy_prefix"] = statistics.mean(prefix)
        loss_delta = results[name]["heldout_loss"] / results["bf16"]["heldout_loss"] - 1
        print(f"{name} vs bf16: held-out loss {loss_delta:+.2%}, greedy answers identical {sum(same)}/{len(same)}, "
              f"mean shared prefix {statistics.mean(prefix):.0%}")
    if a.out:
        atomic_write_text(Path(a.out), json.dumps({"settings": vars(a), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
