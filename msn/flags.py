"""The flags every command shares -- threads, device, dtype, sampling, quantization -- defined here once and
checked one way, before any model loads: a typo costs a second, not a model load.

Why here, at the package root beside ``errors.py`` and ``models.py``: every command room uses these (``msn
generate``, ``bench``/``demo``/``tune-tree``, ``eval``, ``distill``, ``serve``, ``train``) and none owns them. In
``msn/bench/`` (where they were) the decoding room's command had to climb up into bench for them; inside a
``msn/cli/`` package they would sit above every room, under the dispatcher. At the root each room reaches down
to them. Importing this module costs no torch: ``torch``, ``msn.int4``, ``msn.models`` and
``msn.decoding.sampling`` are imported inside the functions that need them, so ``--help`` stays fast.

What only the benchmark commands share (``--methods``, ``--warmup``, ``--limit``, their seed help) stays in
``msn.bench.flags``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from msn.errors import InputError, MsnError

if TYPE_CHECKING:
    from msn.decoding.sampling import Sampling

DTYPES = ("bf16", "fp32", "fp16")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: auto)"
THREADS_HELP = "torch CPU threads (default: torch's choice); use 1 when the CPU is shared and busy"


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
    """``--dtype``, bf16 by default (``msn eval`` keeps its own: fp32 and free text)."""
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="default: bf16")


def add_device_argument(p: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    """``--device``, ``auto`` by default; resolved by :func:`pick_device`."""
    p.add_argument("--device", default="auto", help=help)


def add_threads_argument(p: argparse.ArgumentParser, help: str = THREADS_HELP) -> None:
    """``--threads``, torch's choice by default; checked by :func:`at_least` against :func:`usable_cpus`."""
    p.add_argument("--threads", type=int, default=None, help=help)


def pick_device(device: str) -> str:
    """``--device`` resolved: ``auto`` is cuda when available, else cpu; a device this machine lacks is one
    line naming the fix."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MsnError(f"device {device!r} requested but CUDA is not available; use --device cpu (or auto)")
    if device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto", field="device")
    return device


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one): more torch threads than
    that only oversubscribe, and thousands crash or hang the thread pool."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def at_least(args: argparse.Namespace, minimums: Mapping[str, int]) -> None:
    """Refuse the first flag in ``minimums`` below its minimum; a flag the command lacks, or left unset
    (None), passes. ``--threads`` is also held to :func:`usable_cpus` here, so every command that has it
    (generate, bench, demo, tune-tree, serve, distill) checks it the same way."""
    for name, minimum in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
        if name == "threads" and value is not None and value > (cpus := usable_cpus()):
            raise InputError(f"--threads {value} is more than the {cpus} CPUs this process may use; use "
                             f"--threads {cpus} or less (or leave it out for torch's choice)")


QUANTIZE_CHOICES = ("none", "int4")  # msn.int4.QUANTIZE, kept here so --help imports no torch (a test ties them)


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    """``--quantize``, the same on every command that loads a model."""
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="int4: Linear layers (LM head included) with 4-bit weights on the CPU, a third of bf16's "
                        "bytes per step; a preset runs its own GGUF codes, another model is rounded in groups of "
                        "32; layers left in float are named (default: none)")


def check_quantize_flag(args: argparse.Namespace, device: str) -> str:
    """``--quantize`` against the (resolved) device and ``--dtype``: one line before any model loads."""
    from msn.int4 import check_quantize
    from msn.models import parse_dtype

    return check_quantize(getattr(args, "quantize", "none"), device, parse_dtype(args.dtype))


def add_sampling_arguments(p: argparse.ArgumentParser, seed_help: str = "same seed, same text for every method "
                           "(default: 0)") -> None:
    """``--temperature``, ``--top-p``, ``--top-k``, ``--min-p`` and ``--seed``; any of the first four samples,
    except ``--temperature 0``: greedy, as in ``msn serve`` and OpenAI's API."""
    samp = p.add_argument_group("sampling (any of these samples instead of greedy decoding, but --temperature 0; "
                                "exact, seeded)")
    samp.add_argument("--temperature", type=float, default=None,
                      help="e.g. 0.7 samples; 0 = greedy decoding, as in msn serve (default: greedy)")
    samp.add_argument("--top-p", type=float, default=None, help="nucleus sampling, e.g. 0.9")
    samp.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    samp.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    samp.add_argument("--seed", type=int, default=0, help=seed_help)


def _given_sampling(args: argparse.Namespace) -> dict:
    """The sampling flags given; none (greedy) for ``--temperature 0``, which no other sampling flag may join."""
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p}
    given = {k: v for k, v in given.items() if v is not None}
    t = given.get("temperature")
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise InputError(f"--temperature must be > 0 to sample (or 0 for greedy decoding), got {t}")
    if t == 0:
        others = [f"--{k.replace('_', '-')}" for k in given if k != "temperature"]
        if others:
            raise InputError(f"--temperature 0 means greedy decoding, which {' and '.join(others)} cannot change; "
                             f"drop {' and '.join(others)}, or give a temperature > 0 to sample")
        return {}
    return given


def sampling_settings(args: argparse.Namespace) -> Sampling | None:
    """The sampling flags as checked settings (``--seed`` included), or None for greedy decoding (no sampling
    flag given, or ``--temperature 0``). A bad value is one clear error, before any model loads."""
    from msn.decoding.sampling import sampling_from

    given = _given_sampling(args)
    return sampling_from(given, seed=args.seed) if given else None


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """``do_sample`` plus the given settings (for ``msn.generate``), checked as :func:`sampling_settings`."""
    if sampling_settings(args) is None:
        return {}
    return {"do_sample": True, **_given_sampling(args)}
