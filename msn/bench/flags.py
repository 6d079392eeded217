"""The flags the run commands share (``msn bench``, ``msn demo``, ``msn generate``, ``msn tune-tree``), checked
one way, before any model loads: a typo costs a second, not a model load."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from msn.errors import InputError

# The smallest value of each numeric run flag; a command checks the ones it has.
RUN_MINIMUMS = {"max_new_tokens": 1, "threads": 1, "warmup": 0, "limit": 1, "per_category": 1}


def at_least(args: argparse.Namespace, minimums: Mapping[str, int]) -> None:
    """Refuse the first flag in ``minimums`` below its minimum; a flag the command lacks, or left unset
    (None), passes."""
    for name, minimum in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def check_run_flags(args: argparse.Namespace) -> list[str]:
    """The methods named by ``--methods``, once they and every numeric run flag on ``args`` are valid."""
    from msn.bench.runner import parse_methods

    methods = parse_methods(args.methods)
    at_least(args, RUN_MINIMUMS)
    return methods
