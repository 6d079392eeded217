"""``msn generate``: decode one prompt and print the text plus a one-line speed summary.

The prompt goes through the model's chat template when its tokenizer has one; ``--raw`` sends the text as
is. ``--chat``, once needed for the template, is still accepted: it only turns a model without a template
into an error instead of sending the text as is. Dtype, device and tree default as in ``msn bench`` (bf16,
``auto``: cuda when available, the tree preset for that device and dtype), and the prompt is encoded and
the EOS ids taken as there, so a prompt decodes here as the same question does in a benchmark.

A command beside its peers (``msn/distill.py``, ``msn/bench/cli.py``, ``msn/serve/cli.py``), not inside the
decoding room it drives: decoding is a library the commands stand on, and its flags are the shared ones
(:mod:`msn.flags`). Not named ``msn/generate.py``: importing that would replace the ``msn.generate`` function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msn.decoding.tree import METHODS, TREE_HELP
from msn.errors import InputError, MsnError
from msn.flags import (
    add_device_argument,
    add_dtype_argument,
    add_quantize_argument,
    add_sampling_arguments,
    add_threads_argument,
    sampling_kwargs,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from msn.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="preset, local folder or hub id (default: %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--file", help="read the prompt from this file ('-' = stdin)")
    p.add_argument("--method", choices=METHODS, default="tr-jacobi")
    p.add_argument("--tree", default=None,
                   help=TREE_HELP)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--raw", action="store_true",
                     help="send the text as is (default: wrap it in the model's chat template when it has one)")
    fmt.add_argument("--chat", action="store_true",
                     help="kept for old scripts: the chat template is the default now (with --chat, a model "
                          "without one is an error instead of getting the text as is)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_dtype_argument(p)
    add_device_argument(p)
    add_quantize_argument(p)
    add_threads_argument(p)
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="verify through a static KV cache and a torch.compile-d forward (first use compiles, ~30 s "
                        "per tree size; default: on for a CUDA device, where it is several times faster, off on a "
                        "CPU, where it is not)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="on a CPU, verify with the linear weights packed once for oneDNN: draft trees cost less "
                        "(default: on for bf16/fp32 CPU models; costs the weights' memory once more)")
    add_sampling_arguments(p)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.file)
        if path.is_dir():
            raise InputError("is a folder, not a prompt file; give the path of a text file to --file", where=str(path))
        if not path.is_file():
            raise InputError("prompt file not found", where=str(path))
        text = path.read_text()
    if not text.strip():
        raise InputError("empty prompt", where=args.file or "--prompt")
    return text


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from msn.decoding.engine import generate
    from msn.decoding.tree import resolve_tree
    from msn.flags import at_least, check_quantize_flag, pick_device
    from msn.models import load_model, parse_dtype
    from msn.prompting import encode_prompt, eos_ids

    text = _read_prompt(args)
    at_least(args, {"max_new_tokens": 1, "threads": 1})
    if args.method == "ar" and args.tree is not None:
        raise InputError(f"--tree {args.tree} has no effect with --method ar (it drafts nothing); drop --tree or "
                         "choose a drafting method")
    device = pick_device(args.device)
    quantize = check_quantize_flag(args, device)
    tree = resolve_tree(args.tree, torch.device(device), parse_dtype(args.dtype))  # as bench; fails before loading
    sampling = sampling_kwargs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=device, quantize=quantize)
    if args.chat and not getattr(tok, "chat_template", None):
        raise MsnError(f"model {args.model!r} has no chat template: drop --chat (the text is then sent as is)")
    ids = encode_prompt(tok, text, raw=args.raw).to(device)
    streamer = None if args.no_stream else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = generate(
        model, ids, max_new_tokens=args.max_new_tokens, method=args.method, tree=tree,
        eos_token_id=eos_ids(model, tok), streamer=streamer, seed=args.seed, compile=args.compile, pack=args.pack, **sampling,
    )  # fmt: skip
    if streamer is None:
        print(tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True))
    speed = out.new_tokens / max(out.wall_time, 1e-9)
    mode = "greedy" if not sampling else "sampled " + ", ".join(f"{k}={v}" for k, v in sampling.items()
                                                                  if k != "do_sample") + f", seed={args.seed}"
    print(
        f"[{args.method}, {mode}] {out.new_tokens} tokens in {out.wall_time:.2f}s = {speed:.1f} tok/s, "
        f"MAT {out.mean_accepted:.2f}, {out.steps} steps, tree {out.tree.name} ({out.tree.size} nodes), "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    return 0
