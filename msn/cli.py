"""The ``msn`` command: a thin dispatcher. Each subcommand lives in the module that does the work.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their command runs, so ``msn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from msn.errors import MsnError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("msn.train", "fine-tune a model with MSN noise (or plain SFT with --noise none)"),
    "eval": ("msn.eval.cli", "evaluate quality: denoising accuracy, held-out loss, HumanEval"),
    "generate": ("msn.decoding.cli", "generate text with TR-Jacobi (or ar / jacobi / retrieval) decoding"),
    "bench": ("msn.bench.cli", "Spec-Bench compatible speed benchmark, methods side by side"),
    "demo": ("msn.bench.demo", "offline demo: a small benchmark on built-in prompts with the default model"),
    "tune-tree": ("msn.bench.tune", "measure this device and model, write the fastest draft tree"),
}


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
        args = parser.parse_args(argv)  # --help, --version, or an unknown command: argparse explains
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sub = argparse.ArgumentParser(prog=f"msn {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except MsnError as e:
        print(f"msn {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msn {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
