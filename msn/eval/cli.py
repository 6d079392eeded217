"""``msn eval``: one command for the quality side -- denoising accuracy, held-out loss, greedy agreement with
the answers in a data file (the base model's own, for ``msn distill`` data), HumanEval pass@1."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from msn.errors import InputError, MsnError
from msn.flags import add_quantize_argument
from msn.models import DEFAULT_MODEL
from msn.outputs import OWNER_KEY, atomic_write_text, owned, read_small_json

TASKS = ("denoise", "heldout-loss", "agreement", "humaneval")
_DATA_TASKS = ("denoise", "heldout-loss", "agreement")
# flag -> (the tasks that read it, its default). The parser's default is None, so a flag the user gave to a task
# that does not read it is refused instead of silently ignored.
TASK_FLAGS: dict[str, tuple[tuple[str, ...], Any]] = {
    "data": (_DATA_TASKS, "stdlib-code"),
    "split": (_DATA_TASKS, None),
    "method": (("humaneval",), "ar"),
    "noise_length": (("denoise",), 4),
    "seed": (("denoise",), 0),
    "max_length": (("denoise", "heldout-loss"), 512),
    "max_new_tokens": (("humaneval",), 512),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset, local folder (a run's --output) or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--task", required=True, help="denoise | heldout-loss | agreement | humaneval")
    p.add_argument("--data", default=None,
                   help="denoise / heldout-loss / agreement: built-in name or a JSONL file (see --split; "
                        "default stdlib-code)")
    p.add_argument("--split", default=None, choices=["heldout", "all"],
                   help="denoise / heldout-loss / agreement: which records of --data: heldout (the records "
                        "msn train held out) or all (default: "
                        "heldout for a built-in name, all for a file; use heldout for a file you trained on)")
    p.add_argument("--method", default=None,
                   help="humaneval: decoding method (ar, jacobi, retrieval, tr-jacobi; default ar)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N samples / problems")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--noise-length", type=int, default=None, help="denoise: noise segment length L (default 4)")
    p.add_argument("--max-length", type=int, default=None,
                   help="denoise / heldout-loss: tokens per sample (longer ones are cut; default 512)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="humaneval: generation budget per problem (default 512)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per forward (default 4); humaneval: problems per batched greedy generate call "
                        "(default 1, one at a time; more needs --method ar)")
    p.add_argument("--seed", type=int, default=None, help="denoise: seed of the (fixed) evaluation noise (default 0)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); use 1 when the CPU is shared and busy")
    add_quantize_argument(p)


def evaluate(args: argparse.Namespace, model, tokenizer) -> dict[str, Any]:
    """Run one task on a loaded model; returns a flat dict of results."""
    if args.task == "humaneval":
        from msn.eval.humaneval import evaluate_humaneval

        return dict(
            evaluate_humaneval(
                model, tokenizer, method=args.method, limit=args.limit, max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
            )
        )
    from msn.data import BUILTIN_DATASETS, build_dataset

    split = args.split or ("heldout" if args.data in BUILTIN_DATASETS else "all")
    if args.task == "agreement":
        from itertools import islice

        from msn.data import iter_records
        from msn.eval.agreement import greedy_agreement

        if split == "heldout" and args.data not in BUILTIN_DATASETS:
            where = set(train_heldout(args, tokenizer, None).sources)
            records = list(islice((r for r in iter_records(args.data, "all") if r.where in where), args.limit))
        else:
            records = list(islice(iter_records(args.data, split), args.limit))
        if not records:
            raise InputError(f"no {split} records to compare with", where=str(args.data))
        return {"split": split, **greedy_agreement(model, tokenizer, records, args.batch_size)}
    if split == "heldout" and args.data not in BUILTIN_DATASETS:
        ds = train_heldout(args, tokenizer, args.max_length)
    else:
        ds = build_dataset(args.data, tokenizer, split, args.max_length, args.limit)
    if args.task == "denoise":
        from msn.training.denoise import denoise_accuracy

        res = denoise_accuracy(model, ds.samples, args.noise_length, args.seed, args.batch_size)
        res["noise_length"] = args.noise_length
    else:
        from msn.eval.loss import heldout_loss

        res = heldout_loss(model, ds.samples, args.batch_size)
    return {"samples": len(ds), "split": split, **res}


def check_has_records(data: str) -> None:
    """A missing or empty data file is named before the model loads (build_dataset would say so only after)."""
    from msn.data import BUILTIN_DATASETS, iter_records

    if data not in BUILTIN_DATASETS and next(iter_records(data, "all"), None) is None:
        raise InputError("holds no records; give a JSONL file with at least one conversation", where=data,
                         field="data")


def train_heldout(args: argparse.Namespace, tokenizer, max_length: int | None):
    """The samples ``msn train`` held out of the file ``args.data``: train's own ``split_dataset``, so a small
    file whose hash split holds out nothing gives the last records train set aside by hand, as in training."""
    from msn.data import split_dataset

    # A train-side limit of 1 is enough: that side only decides whether train fell back to its split by hand.
    _, held = split_dataset(args.data, tokenizer, max_length, 1, args.limit)
    if held is None:
        raise InputError("the heldout split is empty: msn train holds out nothing from a file with fewer than 2 "
                         "usable records (it trains on all of them); use --split all", where=args.data,
                         field="split")
    return held


OWNER = "eval"  # the marker eval results carry: {"msn_output": "eval", ...}


def check_out(path: str | os.PathLike) -> None:
    """``--out`` may replace only a result ``msn eval`` wrote: a slip such as ``--out data.jsonl`` must never
    destroy the user's file. Recognised by the marker only msn writes (``"msn_output": "eval"``), not by keys a
    user's JSON may have too (``task``, ``model``); results from before the marker are refused as well."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return
    if not owned(read_small_json(p), OWNER):
        raise InputError(f"exists and was not written by msn eval (no \"{OWNER_KEY}\": \"{OWNER}\" in it); choose "
                         "another --out (or delete the file)", where=str(p))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically: a reader never sees half a file."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"msn eval: {results.get('task')} ({results.get('model')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        if k == OWNER_KEY:
            continue
        if isinstance(v, dict | list):
            v = json.dumps(v, default=str)
            if len(v) > 80:
                v = v[:77] + "..."
        elif isinstance(v, float):
            v = f"{v:.4f}"
        table.add_row(str(k), str(v))
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise InputError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}", field="task")
    for name, (tasks, default) in TASK_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.task not in tasks:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} is not used by --task {args.task} (only by {', '.join(tasks)}); drop {flag}",
                             field=name)
    if args.batch_size is None:  # HumanEval one problem at a time unless asked: batching may flip a near tie
        args.batch_size = 1 if args.task == "humaneval" else 4
    for name in ("noise_length", "max_length", "batch_size", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}", field=name)
    if args.task == "humaneval":
        from msn.eval.humaneval import check_batching

        check_batching(args.method, args.batch_size)
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be positive, got {args.limit}", field="limit")
    from msn.flags import at_least

    at_least(args, {"threads": 1})
    if args.task == "denoise" and args.noise_length >= args.max_length:
        raise InputError(f"--noise-length {args.noise_length} does not fit in --max-length {args.max_length} tokens; "
                         "use a noise length below the max length", field="noise_length")
    from msn.flags import check_quantize_flag
    from msn.models import check_device, load_model, parse_dtype

    parse_dtype(args.dtype)
    check_device(args.device)
    quantize = check_quantize_flag(args, args.device)
    if args.out:  # before the model loads: a bad --out must not cost an evaluation
        from msn.outputs import check_output_file

        check_output_file(args.out, "--out")
        check_out(args.out)
    if args.task != "humaneval":  # a missing or empty data file, too
        check_has_records(args.data)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, quantize=quantize)
    except MsnError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(str(e).splitlines()[0], where=args.model, field="model") from None
    results = {OWNER_KEY: OWNER, "task": args.task, "model": args.model}
    if quantize != "none":  # the int4 model's quality is a different number from its float weights'
        results["quantize"] = quantize
    if args.task != "humaneval":
        results["data"] = args.data
    else:
        results["method"] = args.method
    results.update(evaluate(args, model, tokenizer))
    print_table(results)
    if args.out:
        write_json(args.out, results)
    return 0
