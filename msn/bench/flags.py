"""The flags only the benchmark commands share (``msn bench``, ``msn demo``): ``--methods`` and the numeric run
flags, checked before any model loads, and the help of their ``--seed``. The flags every command shares
(threads, device, dtype, sampling, quantization) are :mod:`msn.flags`; their old names here still resolve,
with a ``DeprecationWarning``, until msn 0.2."""

from __future__ import annotations

import argparse
import warnings

from msn import flags as _shared

# The smallest value of each numeric run flag; a command checks the ones it has.
RUN_MINIMUMS = {"max_new_tokens": 1, "threads": 1, "warmup": 0, "limit": 1, "per_category": 1}

BENCH_SEED_HELP = ("each question's (each turn's) seed derives from it, the same for every method, so for a seed "
                   "msn's methods give the same text (default: 0)")


def check_run_flags(args: argparse.Namespace) -> list[str]:
    """The methods named by ``--methods``, once they and every numeric run flag on ``args`` are valid."""
    from msn.bench.runner import parse_methods

    methods = parse_methods(args.methods)
    _shared.at_least(args, RUN_MINIMUMS)
    return methods


_MOVED = ("usable_cpus", "at_least", "QUANTIZE_CHOICES", "add_quantize_argument", "check_quantize_flag",
          "add_sampling_arguments", "sampling_settings", "sampling_kwargs")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"msn.bench.flags.{name} moved to msn.flags.{name}; import it from there (the old path goes "
                      "in msn 0.2)", DeprecationWarning, stacklevel=2)
        return getattr(_shared, name)
    raise AttributeError(f"module 'msn.bench.flags' has no attribute {name!r}")
