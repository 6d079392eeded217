"""``msn generate``: decode one prompt and print the text plus a one-line speed summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msn.decoding.engine import METHODS
from msn.errors import InputError, MsnError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from msn.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="preset, local folder or hub id (default: %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--file", help="read the prompt from this file ('-' = stdin)")
    p.add_argument("--method", choices=METHODS, default="tr-jacobi")
    p.add_argument("--tree", default=None, help="tree preset name or JSON file (default: chosen by device/dtype)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16 (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")


def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.file)
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
    from msn.models import load_model

    text = _read_prompt(args)
    if args.max_new_tokens < 1:
        raise MsnError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise MsnError(f"model {args.model!r} has no chat template: drop --chat")
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
        ids = enc if isinstance(enc, torch.Tensor) else enc["input_ids"]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"]
    ids = ids.to(args.device)
    streamer = None if args.no_stream else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = generate(
        model, ids, max_new_tokens=args.max_new_tokens, method=args.method, tree=args.tree,
        eos_token_id=tok.eos_token_id, streamer=streamer,
    )  # fmt: skip
    if streamer is None:
        print(tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True))
    speed = out.new_tokens / max(out.wall_time, 1e-9)
    print(
        f"[{args.method}] {out.new_tokens} tokens in {out.wall_time:.2f}s = {speed:.1f} tok/s, "
        f"MAT {out.mean_accepted:.2f}, {out.steps} steps, tree {out.tree.name} ({out.tree.size} nodes)",
        file=sys.stderr,
    )
    return 0
