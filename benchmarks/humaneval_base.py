"""HumanEval pass@1 (greedy) of an untrained model: the quality baseline the trained models are read against.

    python benchmarks/humaneval_base.py --model smollm2-135m --limit 20 --max-new-tokens 256 --dtype fp32

Prints the summary and writes the full result (per-problem status and completion) as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from msn import load_model
from msn.eval.humaneval import evaluate_humaneval
from msn.eval.sandbox import isolation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--method", default="ar")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--out", default="humaneval_base.json")
    args = ap.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    chat = None if args.chat == "auto" else args.chat == "yes"
    start = time.perf_counter()
    res = evaluate_humaneval(model, tokenizer, method=args.method, limit=args.limit,
                             max_new_tokens=args.max_new_tokens, chat=chat)
    res["total_s"] = time.perf_counter() - start
    res["setup"] = {**vars(args), "torch_threads": torch.get_num_threads(), "machine": platform.processor(),
                    "sandbox": repr(isolation()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{args.model} {args.dtype} {args.method} chat={res['chat']}: pass@1 {res['pass_at_1']:.3f} "
          f"({res['passed']}/{res['n']}), {res['new_tokens']} tokens, {res['tokens_per_s']:.1f} tok/s, "
          f"generation {res['wall_time']:.0f} s, total {res['total_s']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
