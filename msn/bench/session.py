"""One benchmark run end to end: load, run with a live progress bar, write answers, summary and plot.

Shared by ``msn bench`` and ``msn demo``. Answers are appended question by question, so Ctrl-C (or a
crash) leaves every finished question on disk; the summary is then written from those.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from msn.bench import runner
from msn.bench.plot import plot_speedup
from msn.bench.questions import Question
from msn.bench.summary import BASELINE, answers_path, summarize_dir, write_summary
from msn.decoding.tree import TreeTemplate, resolve_tree
from msn.errors import MsnError
from msn.models import parse_dtype


@dataclass
class BenchConfig:
    model: str
    questions: Sequence[Question]
    methods: Sequence[str]
    out: Path
    dtype: str = "bf16"
    device: str = "cpu"
    max_new_tokens: int = 128
    tree: str | None = None
    warmup: int = 1
    command: str | None = None
    threads: int | None = None  # torch intra-op threads; 1 avoids collapse on an oversubscribed CPU


@dataclass
class BenchResult:
    summary: dict
    interrupted: bool
    out: Path


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MsnError(f"device {device!r} requested but CUDA is not available")
    return device


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def resolve_bench_tree(tree: str | None, device: str, dtype: str) -> TreeTemplate:
    return resolve_tree(tree, torch.device(device), parse_dtype(dtype))


def _load(cfg: BenchConfig, device: str):
    from msn.models import load_model

    return load_model(cfg.model, dtype=cfg.dtype, device=device)


def run_bench(cfg: BenchConfig, model=None, tokenizer=None, console=None) -> BenchResult:
    """Run ``cfg``; a preloaded ``model``/``tokenizer`` skips loading (tests, demo reuse)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from msn.progress import progress as make_progress

    console = console or Console(stderr=True)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tree = resolve_bench_tree(cfg.tree, device, cfg.dtype)
    if model is None:
        console.print(f"loading {cfg.model} ({cfg.dtype}, {device}) ...")
        model, tokenizer = _load(cfg, device)
    out = Path(cfg.out)
    (out / "answers").mkdir(parents=True, exist_ok=True)
    files = {m: open(answers_path(out, m), "w", encoding="utf-8") for m in cfg.methods}  # noqa: SIM115
    meta = {
        "model": cfg.model,
        "dtype": cfg.dtype,
        "device": device,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": cfg.max_new_tokens,
        "tree": f"{tree.name} ({tree.size} nodes)",
        "tree_template": tree.to_dict(),
        "method_order": list(cfg.methods),
        "command": cfg.command,
        "started": _now(),
        "load_average_start": _load_average(),
        "torch": torch.__version__,
    }
    speeds: dict[str, list[float]] = {m: [] for m in cfg.methods}
    done = 0
    interrupted = False
    progress = make_progress(
        "bench", TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[speedups]}"), console=console, fields="{speedups}",
    )

    def running_speedups() -> str:
        if BASELINE not in speeds or not speeds[BASELINE]:
            return ""
        base = sum(speeds[BASELINE]) / len(speeds[BASELINE])
        return "  ".join(f"{m} {sum(v) / len(v) / base:.2f}x" for m, v in speeds.items() if m != BASELINE and v)

    try:
        with progress:
            task = progress.add_task("", total=len(cfg.questions), speedups="warming up")

            def on_question(q: Question, records: dict[str, dict]) -> None:
                nonlocal done
                for m, rec in records.items():
                    files[m].write(json.dumps(rec) + "\n")
                    files[m].flush()
                    c = rec["choices"][0]
                    speeds[m].append(sum(c["new_tokens"]) / max(sum(c["wall_time"]), 1e-9))
                done += 1
                progress.update(task, advance=1, speedups=running_speedups())

            runner.run_questions(
                model, tokenizer, cfg.questions, cfg.methods, cfg.max_new_tokens, on_question,
                tree=tree, model_id=Path(cfg.model).name, warmup=cfg.warmup,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for f in files.values():
            f.close()
    meta["finished"] = _now()
    meta["load_average_end"] = _load_average()
    meta["status"] = (
        f"interrupted: {done} of {len(cfg.questions)} questions finished" if interrupted else "complete"
    )
    summary = summarize_dir(out, cfg.methods, meta=meta)
    write_summary(out, summary)
    if summary["questions"]:
        plot_speedup(summary, out / "speedup.png")
    return BenchResult(summary, interrupted, out)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load_average() -> float | None:
    """1-minute load: on a shared machine, the context every timing needs."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def command_line() -> str | None:
    """The ``msn ...`` command as typed, for the report (None when called from Python)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog == "msn":
        return " ".join(["msn", *sys.argv[1:]])
    if prog == "cli.py" and sys.argv[0].endswith(os.path.join("msn", "cli.py")):  # python -m msn.cli
        return " ".join(["python -m msn.cli", *sys.argv[1:]])
    return None
