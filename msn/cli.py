"""The ``msn`` command: a thin dispatcher. Each subcommand lives in the module that does the work.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their command runs, so ``msn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from msn.errors import MsnError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("msn.training.train", "fine-tune a model with MSN noise (or plain SFT with --noise none)"),
    "eval": ("msn.eval.cli", "evaluate quality: denoising accuracy, held-out loss, HumanEval"),
    "generate": ("msn.generate_cli", "generate text with TR-Jacobi (or ar / jacobi / retrieval) decoding"),
    "bench": ("msn.bench.cli", "Spec-Bench compatible speed benchmark, methods side by side"),
    "demo": ("msn.bench.demo", "offline demo: a small benchmark on built-in prompts with the default model"),
    "distill": ("msn.distill", "answer prompts with the model itself: a self-distilled training set"),
    "tune-tree": ("msn.bench.tune", "measure this device and model, write the fastest draft tree"),
    "serve": ("msn.serve.cli", "OpenAI-compatible local server (chat/completions, SSE streaming) for one model"),
}


class _ArgumentError(Exception):
    pass


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (raised to main) instead of usage text plus an exit."""

    def error(self, message: str):  # type: ignore[override]
        raise _ArgumentError(message)


# Flags that name input files: a file that is not UTF-8 text is reported by the first of these that is set.
_INPUT_FLAGS = ("file", "questions", "data", "tree", "prompts")


def _text_error(args: argparse.Namespace | None, e: UnicodeDecodeError) -> str:
    for flag in _INPUT_FLAGS:
        value = getattr(args, flag, None) if args is not None else None
        if isinstance(value, str) and value != "-" and Path(value).is_file():
            return (f"{value}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8 "
                    f"(--{flag})")
    return f"an input is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"


def _os_error(e: OSError) -> str:
    from msn.outputs import os_error_reason

    where = e.filename if e.filename is not None else "a file"
    return f"{where}: {os_error_reason(e)}; fix the path (or free space) and rerun"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msn", description="Make Some Noise: noisy SFT + TR-Jacobi decoding.")
    parser.add_argument("--version", action="version", version=f"msn {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def _version() -> str:
    from msn import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version, or an unknown command: argparse explains
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sub = _OneLineParser(prog=f"msn {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(sub)
    args = None
    try:
        args = sub.parse_args(argv[1:])
    except _ArgumentError as e:
        return _fail(argv[0], f"{e} (see msn {argv[0]} --help)")
    logging.basicConfig(format="%(message)s")
    logging.getLogger("msn").setLevel(logging.INFO)  # one-time notices (e.g. a first t(n) measurement)
    try:
        return int(module.run(args) or 0)
    except _ArgumentError as e:
        return _fail(argv[0], f"{e} (see msn {argv[0]} --help)")
    except MsnError as e:
        return _fail(argv[0], str(e))
    except UnicodeDecodeError as e:
        return _fail(argv[0], _text_error(args, e))
    except OSError as e:  # disk full, read-only folder, permission: found while working, reported in one line
        return _fail(argv[0], _os_error(e))
    except KeyboardInterrupt:
        print(f"msn {argv[0]}: interrupted", file=sys.stderr)
        return 130


def _fail(command: str, message: str) -> int:
    print(f"msn {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
