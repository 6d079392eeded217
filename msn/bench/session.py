"""One benchmark run end to end: load, run with a live progress bar, write answers, summary and plot.

Shared by ``msn bench`` and ``msn demo``. Answers are appended question by question, so Ctrl-C (or a
crash) leaves every finished question on disk; the summary is then written from those.

The output folder is never clobbered: ``bench.json`` records the settings of the run that owns it, and a
rerun into the same ``--out`` resumes -- it skips every question a method has already answered and
appends the rest -- as long as model, dtype, device, tree, token budget and sampling settings (greedy, or
temperature/top-k/top-p/min-p and seed) are the same (otherwise it refuses, naming the setting), and as long as
each question already answered is the same question (category and turns) in this run's question file. A
non-empty folder without ``bench.json`` holds no bench and is refused, ``--overwrite`` or not: files there that
merely have a bench's names are the user's. ``--overwrite`` deletes only what the benches recorded in
``bench.json`` wrote (the answers of the methods its runs list, the report), and only once the model has loaded
and every question's first turn is known to fit its context.
"""

from __future__ import annotations

import contextlib
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
from msn.bench.questions import Question, qid_key
from msn.bench.summary import BASELINE, answers_path, sampling_text, summarize_dir, write_summary
from msn.clock import load_average, now
from msn.decoding.sampling import Sampling
from msn.decoding.tree import TreeTemplate, resolve_tree
from msn.errors import InputError, MsnError  # noqa: F401  (MsnError: session.MsnError, as before pick_device moved)
from msn.flags import pick_device
from msn.models import parse_dtype
from msn.outputs import atomic_write_text, check_output_dir

BENCH_FILE = "bench.json"  # the settings of the run that owns the folder; written before any answer
REPORT_FILES = ("summary.json", "summary.md", "speedup.png")
SETTINGS = ("model", "dtype", "device", "max_new_tokens", "tree", "sampling", "quantize")


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
    overwrite: bool = False  # replace the bench in ``out`` instead of resuming it
    sampling: Sampling | None = None  # None: greedy
    leave_out: str = runner.LEAVE_OUT  # how the user skips a question that does not fit the context
    quantize: str = "none"  # "int4": 4-bit Linear layers on the CPU (msn.int4)


@dataclass
class BenchResult:
    summary: dict
    interrupted: bool
    out: Path


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def _load(cfg: BenchConfig, device: str):
    from msn.models import load_model

    return load_model(cfg.model, dtype=cfg.dtype, device=device, quantize=cfg.quantize)


def _model_key(model: str) -> str:
    """The same model named two ways (``runs/x`` and ``./runs/x/``) is the same model."""
    return str(Path(model).resolve()) if os.path.isdir(model) else model


def bench_settings(cfg: BenchConfig, device: str, tree: TreeTemplate) -> dict:
    return {"model": cfg.model, "dtype": cfg.dtype, "device": device, "max_new_tokens": cfg.max_new_tokens,
            "tree": tree.to_dict(), "sampling": runner.sampling_record(cfg.sampling), "quantize": cfg.quantize}


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in SETTINGS:
        a, b = old.get(key), new.get(key)
        if key == "tree":
            a, b = _tree_record(a), _tree_record(b)
        if key == "quantize":  # a bench recorded before --quantize existed was float
            a, b = a or "none", b or "none"
        if key == "sampling":  # a bench recorded before sampling existed was greedy: None
            diffs += _sampling_differences(a, b)
            continue
        same = _model_key(str(a)) == _model_key(str(b)) if key == "model" else a == b
        if not same:
            shown = (a, b) if key != "tree" else (_tree_name(a), _tree_name(b))
            diffs.append(f"{key} {shown[0]!r} -> {shown[1]!r}")
    return diffs


def _sampling_differences(a: dict | None, b: dict | None) -> list[str]:
    """``temperature 0.7 -> 0.9`` for each changed sampling setting; greedy against sampled as a whole."""
    if a is None or b is None:
        return [] if a == b else [f"decoding {sampling_text(a)!r} -> {sampling_text(b)!r}"]
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def _tree_record(t):
    """A recorded tree as it is written today: benches from before ``retrieval_depth`` was named so
    recorded it as ``retrieval``, and still resume."""
    if isinstance(t, dict) and "retrieval" in t and "retrieval_depth" not in t:
        return {**{k: v for k, v in t.items() if k != "retrieval"}, "retrieval_depth": t["retrieval"]}
    return t


def _tree_name(t) -> str:
    if isinstance(t, dict):
        return (f"{t.get('name', '?')} ({len(t.get('jacobi', []))} Jacobi nodes, "
                f"retrieval depth {t.get('retrieval_depth')})")
    return str(t)


def check_bench_out(out: Path) -> bool:
    """Whether ``out`` holds a bench (False: empty or new); refuses an unusable path or a non-empty folder
    without ``bench.json``, even with --overwrite: files there named like a bench's are the user's."""
    check_output_dir(out, "--out")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not (out / BENCH_FILE).is_file():
        raise InputError(f"{out} is not empty and holds no msn bench ({BENCH_FILE} missing), so there is no bench "
                         "to resume or overwrite there; choose an empty or new --out", field="out")
    return True


def plan_out(out: Path, settings: dict, overwrite: bool) -> str:
    """``fresh``, ``resume`` or ``overwrite``; refuses (InputError) before anything is loaded or written."""
    if not check_bench_out(out):
        return "fresh"
    record = out / BENCH_FILE
    try:
        loaded = json.loads(record.read_text(encoding="utf-8"))
        old, _ = loaded["settings"], recorded_methods(loaded)
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{record} is unreadable, so msn cannot tell which files there it wrote; restore it, or "
                         "choose another --out", field="out") from None
    if overwrite:
        return "overwrite"
    diffs = _differences(old, settings)
    if diffs:
        raise InputError(f"{out} holds a bench with other settings ({'; '.join(diffs)}); rerun with the recorded "
                         "settings to resume it, choose another --out, or pass --overwrite", field="out")
    return "resume"


def recorded_methods(record: dict) -> list[str]:
    """The methods the runs in a ``bench.json`` answered with: whose answer files a bench wrote."""
    runs = record.get("runs", [])
    if not isinstance(runs, list):
        raise TypeError("runs")
    return sorted({m for r in runs for m in r.get("methods", []) if m in runner.BENCH_METHODS})


def _owned_files(out: Path) -> list[Path]:
    """What the benches recorded in ``bench.json`` wrote: the record, the report, and the answers of the methods
    its runs list (never a method's file by its name alone: ``answers/pld.jsonl`` the user put there stays)."""
    record = json.loads((out / BENCH_FILE).read_text(encoding="utf-8"))
    files = [out / BENCH_FILE, *(out / f for f in REPORT_FILES)]
    files += [answers_path(out, m) for m in recorded_methods(record)]
    return files


def check_foreign_answers(out: Path, methods: Sequence[str]) -> None:
    """Refuse an answers file of one of ``methods`` that no recorded run wrote: this run would append to it (and
    count its lines as answers), or --overwrite would have to delete a file msn did not write."""
    record = json.loads((out / BENCH_FILE).read_text(encoding="utf-8"))
    ours = set(recorded_methods(record))
    for m in methods:
        path = answers_path(out, m)
        if m not in ours and (path.exists() or path.is_symlink()):
            raise InputError(f"{path} exists, but no bench recorded in {out / BENCH_FILE} answered with {m}, so it is "
                             "not msn's to extend or replace; move it away, or choose another --out", field="out")


def clear_bench(out: Path) -> None:
    """Delete what the recorded benches wrote, nothing else (a folder of other files keeps them)."""
    for f in _owned_files(out):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    with contextlib.suppress(OSError):
        (out / "answers").rmdir()  # only when empty


def answered(path: Path) -> set:
    """Question ids in an answers file. A torn last line (a kill mid-write) is cut off; a malformed
    line elsewhere is an error naming it."""
    return set(answer_records(path))


def answer_records(path: Path) -> dict[str, tuple[int, dict]]:
    """Each answered question (by :func:`qid_key`) -> its line number and record, read as :func:`answered`."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good = {}, 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            records[qid_key(rec["question_id"])] = (lineno, rec)
        except (ValueError, KeyError, TypeError):
            if lineno == len(lines):  # no newline after it: the write was cut short
                with open(path, "r+b") as f:
                    f.truncate(good)
                break
            raise InputError("malformed answer record; delete the line or pass --overwrite",
                             where=f"{path}:{lineno}") from None
        good += len(line) + 1
    return records


def check_same_questions(out: Path, methods: Sequence[str], questions: Sequence[Question]) -> None:
    """Refuse to resume when an answer on disk is to another question than this run's with its id (another
    question file, or an edited question): it would be counted as this question's answer."""
    check_answer_files([answers_path(out, m) for m in methods], questions)


def check_answer_files(paths: Sequence[Path], questions: Sequence[Question]) -> None:
    """:func:`check_same_questions` for any answer files (the paired benchmarks keep one per model and method).
    Answers written before ``question_sha256`` was recorded can only be compared by category; their turns are
    taken on trust."""
    for path in paths:
        records = answer_records(path)
        for q in questions:
            lineno, rec = records.get(qid_key(q.question_id), (None, None))
            if rec is None:
                continue
            old_hash = rec.get("question_sha256")
            if rec.get("category") != q.category:
                what = f"category {rec.get('category')!r}, now {q.category!r}"
            elif old_hash is not None and old_hash != runner.question_hash(q):
                what = "other turns than now"
            else:
                continue
            now_at = f" ({q.where})" if q.where else ""
            raise InputError(f"question {q.question_id!r}{now_at} was answered here as another question ({what}); "
                             "pass --overwrite to answer this question file from scratch, or choose another --out",
                             where=f"{path}:{lineno}")


def run_bench(cfg: BenchConfig, model=None, tokenizer=None, console=None) -> BenchResult:
    """Run ``cfg``; a preloaded ``model``/``tokenizer`` skips loading (tests, demo reuse)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from msn.progress import progress as make_progress

    console = console or Console(stderr=True)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tree = resolve_tree(cfg.tree, torch.device(device), parse_dtype(cfg.dtype))
    out = Path(cfg.out)
    settings = bench_settings(cfg, device, tree)
    mode = plan_out(out, settings, cfg.overwrite)
    if mode != "fresh":
        check_foreign_answers(out, cfg.methods)
    if mode == "resume":  # read (and check) what is there before the model loads
        check_same_questions(out, cfg.methods, cfg.questions)
    if model is None:
        console.print(f"loading {cfg.model} ({cfg.dtype}, {device}) ...")
        model, tokenizer = _load(cfg, device)
    runner.check_first_turns(model, tokenizer, cfg.questions, cfg.max_new_tokens, cfg.leave_out)
    if mode == "overwrite":
        clear_bench(out)
    runs = []
    if mode == "resume":
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            runs = list(json.loads((out / BENCH_FILE).read_text(encoding="utf-8")).get("runs", []))
    runs.append({"started": now(), "command": cfg.command, "methods": list(cfg.methods)})
    # bench.json first: a folder this run created always names its owner, even if the run dies right here
    atomic_write_text(out / BENCH_FILE, json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    (out / "answers").mkdir(parents=True, exist_ok=True)
    done_ids = {m: answered(answers_path(out, m)) for m in cfg.methods}
    todo = [(q, [m for m in cfg.methods if qid_key(q.question_id) not in done_ids[m]]) for q in cfg.questions]
    todo = [(q, ms) for q, ms in todo if ms]
    if mode == "resume":
        kept = len(cfg.questions) - len(todo)
        console.print(f"resuming {out}: {kept} of {len(cfg.questions)} questions already answered by every method")
    files = {m: open(answers_path(out, m), "a", encoding="utf-8") for m in cfg.methods}  # noqa: SIM115
    meta = {
        "model": cfg.model,
        "dtype": cfg.dtype,
        "quantize": cfg.quantize,
        "device": device,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": cfg.max_new_tokens,
        "sampling": runner.sampling_record(cfg.sampling),
        "tree": f"{tree.name} ({tree.size} nodes)",
        "tree_template": tree.to_dict(),
        "method_order": list(cfg.methods),
        "command": cfg.command,
        "started": now(),
        "load_average_start": load_average(),
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
            task = progress.add_task("", total=len(todo), speedups="warming up")

            def on_question(q: Question, records: dict[str, dict]) -> None:
                nonlocal done
                for m, rec in records.items():
                    files[m].write(json.dumps(rec) + "\n")
                    files[m].flush()
                    c = rec["choices"][0]
                    speeds[m].append(sum(c["new_tokens"]) / max(sum(c["wall_time"]), 1e-9))
                done += 1
                progress.update(task, advance=1, speedups=running_speedups())

            # Consecutive questions that miss the same methods run as one interleaved group.
            start = 0
            while start < len(todo):
                end = start
                while end < len(todo) and todo[end][1] == todo[start][1]:
                    end += 1
                runner.run_questions(
                    model, tokenizer, [q for q, _ in todo[start:end]], todo[start][1], cfg.max_new_tokens,
                    on_question, tree=tree, model_id=Path(cfg.model).name, warmup=cfg.warmup if start == 0 else 0,
                    sampling=cfg.sampling,
                )
                start = end
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for f in files.values():
            f.close()
    meta["finished"] = now()
    meta["load_average_end"] = load_average()
    finished = len(cfg.questions) - len(todo) + done
    meta["status"] = (
        f"interrupted: {finished} of {len(cfg.questions)} questions finished" if interrupted else "complete"
    )
    if mode == "resume":
        meta["resumed"] = len(runs) - 1
    summary = summarize_dir(out, cfg.methods, meta=meta, question_ids=[q.question_id for q in cfg.questions])
    write_summary(out, summary)
    if summary["questions"]:
        plot_speedup(summary, out / "speedup.png")
    else:  # a plot of an earlier summary must not stand beside this one
        with contextlib.suppress(FileNotFoundError):
            (out / "speedup.png").unlink()
    return BenchResult(summary, interrupted, out)


def command_line() -> str | None:
    """The ``msn ...`` command as typed, for the report (None when called from Python)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog == "msn":
        return " ".join(["msn", *sys.argv[1:]])
    if prog == "cli.py" and sys.argv[0].endswith(os.path.join("msn", "cli.py")):  # python -m msn.cli
        return " ".join(["python -m msn.cli", *sys.argv[1:]])
    return None
