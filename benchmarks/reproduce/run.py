"""Reproduce issue 5: plain SFT vs MSN on real models -- quality, speed-up, noise-length and retrieval ablations.

One command per budget; every stage is a documented ``msn`` command run as a subprocess, and every stage
skips itself when its output is already complete, so an interrupted run continues where it stopped:

    python benchmarks/reproduce/run.py --budget cpu --out runs/reproduce-cpu      # run or resume
    python benchmarks/reproduce/run.py --budget cpu --out runs/reproduce-cpu --dry-run

Stages, per variant (a base model untrained, or trained with one noise setting):
    train    msn train ... --resume            -> OUT/train/ID/msn.json (written last: complete)
    quality  msn eval --task heldout-loss|denoise[|humaneval] --out ...  -> OUT/quality/ID/TASK.json
    speed    msn bench --per-category K --methods ar,pld,jacobi,tr-jacobi -> OUT/bench/ID/summary.json
    report   OUT/report.md, OUT/report.json, OUT/report.png (always rewritten from what exists)

See benchmarks/reproduce/README.md for what each budget runs and how long it takes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
METHODS = ("ar", "pld", "jacobi", "tr-jacobi")
BY_JACOBI = "tr-jacobi, Jacobi-drafted"  # paired column: accepted drafts per step a Jacobi node drafted
PAIRED = ("pld", "jacobi", "tr-jacobi", BY_JACOBI)
DENOISE_L = 4  # every model's denoising accuracy is measured at the same L, so rows compare
PAPER = {
    "speedup": (2.3, 2.7),
    "best_length": 4,
}
QUALITY_LOSS_TOL = 0.02  # "quality kept": held-out loss at most 2% above plain SFT ...
QUALITY_HE_PROBLEMS = 2  # ... and HumanEval at most 2 problems below plain SFT


# ---------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Variant:
    name: str  # e.g. "msn-L4x8"
    noise: str | None  # None: the base model, untrained; "none": plain SFT; "ahead": MSN
    length: int = 4
    segments: int = 1


BASE = Variant("base", None)
SFT = Variant("sft", "none")


def msn(length: int, segments: int = 1) -> Variant:
    return Variant(f"msn-L{length}" + (f"x{segments}" if segments > 1 else ""), "ahead", length, segments)


@dataclass
class Group:
    """One domain: a base model, its data, and the training / evaluation / bench settings shared by its variants."""

    name: str
    model: str
    data: str
    variants: list[Variant]
    train: dict[str, Any]  # msn train flags (without --model/--data/--output/noise)
    lora: bool = False
    lora_r: int = 16
    eval_limit: int = 64  # held-out samples for heldout-loss / denoise
    eval_max_length: int = 256
    eval_dtype: str = "fp32"
    humaneval: bool = False
    humaneval_limit: int | None = None  # None: all 164
    humaneval_max_new_tokens: int = 512
    humaneval_dtype: str = "bf16"
    per_category: int = 1
    max_new_tokens: int = 128
    warmup: int = 1
    ablation: bool = False  # the noise-length ablation runs in this group
    ablation_segments: int = 1  # ... over the MSN variants with this many segments per sample


def _train(steps: int, batch: int, accum: int, lr: float, warmup: int, max_length: int, eval_steps: int,
           save_steps: int, eval_samples: int, logging_steps: int, bf16: bool = True) -> dict[str, Any]:
    return dict(max_steps=steps, batch_size=batch, grad_accum=accum, lr=lr, warmup_steps=warmup,
                max_length=max_length, eval_steps=eval_steps, save_steps=save_steps, eval_samples=eval_samples,
                logging_steps=logging_steps, bf16=bf16, seed=0)


def budget(name: str) -> list[Group]:
    """The experiment plan of a budget. Every variant of a group shares data, steps, batch and seed."""
    general_variants = [BASE, SFT, msn(4), msn(4, 8), msn(1), msn(8)]
    code_variants = [BASE, SFT, msn(4), msn(4, 8)]
    if name == "toy":  # seconds: proves the pipeline, measures nothing
        t = _train(2, 2, 1, 5e-5, 0, 64, 2, 2, 4, 1)
        common = dict(eval_limit=4, eval_max_length=64, per_category=1, max_new_tokens=8, warmup=0)
        return [
            Group("general", "smollm2-135m", "sharegpt", general_variants, t, ablation=True, **common),
            Group("code", "qwen2.5-coder-0.5b", "stdlib-code", code_variants, t, lora=True, lora_r=4,
                  humaneval=True, humaneval_limit=1, humaneval_max_new_tokens=8, **common),
        ]
    if name == "cpu":  # a 2-core CPU: general ~2 h idle, code ~4 h (README); enough to see the density trade-off
        # One segment per sample learns denoising slowly at ~250k tokens (issue 5's probe on code saw nothing;
        # docs/results.md section 8: .039 -> .063 on ShareGPT), so the noise-length ablation runs at 8 segments
        # per sample, where the differences between lengths are clearer.
        return [
            Group("general", "smollm2-135m", "sharegpt",
                  [BASE, SFT, msn(4), msn(4, 8), msn(1, 8), msn(8, 8)],
                  _train(120, 8, 1, 5e-5, 10, 256, 40, 40, 64, 10), ablation=True, ablation_segments=8,
                  eval_limit=128, eval_max_length=256, per_category=2, max_new_tokens=128),
            Group("code", "qwen2.5-coder-0.5b", "stdlib-code", code_variants,
                  _train(120, 4, 2, 2e-4, 10, 256, 40, 40, 64, 10), lora=True, lora_r=16,
                  eval_limit=128, eval_max_length=256, humaneval=True, humaneval_limit=None,  # all 164: ~15 min
                  humaneval_max_new_tokens=256, per_category=1, max_new_tokens=128),
        ]
    if name == "gpu":  # paper-like: full fine-tuning, long sequences, 130 Spec-Bench questions, all of HumanEval
        return [
            Group("general", "smollm2-135m", "sharegpt", general_variants,
                  _train(2000, 16, 1, 2e-5, 50, 1024, 200, 200, 256, 20), ablation=True,
                  eval_limit=512, eval_max_length=1024, per_category=10, max_new_tokens=256, warmup=2),
            Group("code", "qwen2.5-coder-0.5b", "stdlib-code", code_variants,
                  _train(2000, 16, 1, 2e-5, 50, 1024, 200, 200, 256, 20),
                  eval_limit=512, eval_max_length=1024, humaneval=True, humaneval_limit=None,
                  humaneval_max_new_tokens=512, per_category=10, max_new_tokens=256, warmup=2),
        ]
    raise ValueError(f"unknown budget {name!r}")


# ---------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    id: str  # "train:general-msn-L4"
    kind: str  # train | quality | speed
    variant_id: str
    argv: list[str]  # msn subcommand and flags (what follows "msn")
    output: Path  # the file whose completeness marks the stage done
    check: Callable[[Path], bool]
    needs: str | None = None  # stage id that must be complete first
    after: Callable[[], None] | None = None  # bookkeeping once complete (never changes results)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return "msn " + shlex.join(self.argv)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_done(steps: int) -> Callable[[Path], bool]:
    def check(p: Path) -> bool:
        meta = read_json(p)
        return isinstance(meta, dict) and int(meta.get("steps") or 0) >= steps

    return check


def eval_done(key: str) -> Callable[[Path], bool]:
    def check(p: Path) -> bool:
        res = read_json(p)
        return isinstance(res, dict) and res.get(key) is not None

    return check


def bench_done(p: Path) -> bool:
    s = read_json(p)
    return isinstance(s, dict) and s.get("status") == "complete" and bool(s.get("questions"))


def _flags(d: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [flag] if v else []
        elif v is not None:
            out += [flag, str(v)]
    return out


def plan(groups: Sequence[Group], out: Path, questions: str, threads: int | None, device: str | None,
         keep_checkpoints: bool) -> list[Stage]:
    stages: list[Stage] = []
    for g in groups:
        for v in g.variants:
            vid = f"{g.name}-{v.name}"
            if v.noise is None:
                model = g.model
                train_id = None
            else:
                run_dir = out / "train" / vid
                model = str(run_dir)
                train_id = f"train:{vid}"
                argv = ["train", "--model", g.model, "--data", g.data, "--output", str(run_dir),
                        "--noise", v.noise, "--noise-length", str(v.length), "--noise-segments", str(v.segments)]
                if g.lora:
                    argv += ["--lora", "--lora-r", str(g.lora_r)]
                argv += _flags(g.train) + ["--resume"]
                stages.append(Stage(
                    train_id, "train", vid, argv, run_dir / "msn.json", train_done(g.train["max_steps"]),
                    after=lambda run_dir=run_dir, vid=vid: _after_train(run_dir, out / "quality" / vid,
                                                                       keep_checkpoints),
                ))
            qdir = out / "quality" / vid
            dev = ["--device", device] if device else []  # eval's default is the CPU, bench's is auto
            common = ["--model", model, "--max-length", str(g.eval_max_length), *dev]
            for task, key in (("heldout-loss", "loss"), ("denoise", "acc")):
                argv = ["eval", *common, "--task", task, "--data", g.data, "--limit", str(g.eval_limit),
                        "--dtype", g.eval_dtype]
                if task == "denoise":
                    argv += ["--noise-length", str(DENOISE_L), "--seed", "0"]
                argv += ["--out", str(qdir / f"{task}.json")]
                stages.append(Stage(f"quality:{vid}:{task}", "quality", vid, argv, qdir / f"{task}.json",
                                    eval_done(key), needs=train_id))
            if g.humaneval:
                argv = ["eval", "--model", model, *dev, "--task", "humaneval", "--method", "ar",
                        "--max-new-tokens", str(g.humaneval_max_new_tokens), "--dtype", g.humaneval_dtype]
                if g.humaneval_limit is not None:
                    argv += ["--limit", str(g.humaneval_limit)]
                argv += ["--out", str(qdir / "humaneval.json")]
                stages.append(Stage(f"quality:{vid}:humaneval", "quality", vid, argv, qdir / "humaneval.json",
                                    eval_done("pass_at_1"), needs=train_id))
            bdir = out / "bench" / vid
            argv = ["bench", "--model", model, "--questions", questions, "--per-category", str(g.per_category),
                    "--methods", ",".join(METHODS), "--dtype", "bf16", "--max-new-tokens", str(g.max_new_tokens),
                    "--warmup", str(g.warmup)]
            if threads:
                argv += ["--threads", str(threads)]
            if device:
                argv += ["--device", device]
            argv += ["--out", str(bdir)]
            stages.append(Stage(f"speed:{vid}", "speed", vid, argv, bdir / "summary.json", bench_done,
                                needs=train_id))
    # All training first, then quality, then every bench back to back: the speed comparisons between models
    # then come from one stretch of time on one machine (same day, similar load).
    order = {"train": 0, "quality": 1, "speed": 2}
    return sorted(stages, key=lambda s: order[s.kind])


def _after_train(run_dir: Path, qdir: Path, keep_checkpoints: bool) -> None:
    """Save the training log (eval loss + denoising accuracy per evaluation) and drop all but the last checkpoint."""
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    if ckpts:
        state = read_json(ckpts[-1] / "trainer_state.json") or {}
        qdir.mkdir(parents=True, exist_ok=True)
        write_json(qdir / "train_log.json", state.get("log_history", []))
        if not keep_checkpoints:
            for p in ckpts[:-1]:
                shutil.rmtree(p, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- running


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"  # a piped child would hold its log lines (training loss, evaluations) for minutes
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
    return env


def launch_subprocess(stage: Stage, log: Path, env: dict[str, str], verbose: bool) -> int:
    cmd = [sys.executable, "-m", "msn.cli", *stage.argv]
    with open(log, "a", encoding="utf-8", buffering=1) as f:  # line-buffered: tail -f the log while it runs
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                errors="replace")
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                if verbose:
                    sys.stdout.write(line)
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too: let it write what it has, then stop
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            raise


def launch_inprocess(stage: Stage, log: Path, env: dict[str, str], verbose: bool) -> int:
    """Same argv through the same ``msn.cli.main`` in this process: only for tests (saves ~10 s of imports a stage)."""
    from msn.cli import main

    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"$ msn {shlex.join(stage.argv)}  (in process)", flush=True)
        try:
            return int(main(list(stage.argv)) or 0)
        except SystemExit as e:  # argparse
            return int(e.code or 0) if not isinstance(e.code, str) else 2


def run_stages(stages: Sequence[Stage], out: Path, launcher: str, threads: int | None, verbose: bool,
               dry_run: bool, kinds: set[str] | None = None, train_threads: int | None = None) -> dict[str, Any]:
    """Run every stage whose output is not complete (only the ``kinds`` asked for; others are just checked).

    Benchmarks run with ``threads`` (1 on a shared CPU keeps timings stable); training and evaluation run with
    ``train_threads`` (default: every core), since stages run one at a time and nothing else competes.
    """
    envs = {"speed": child_env(threads), "other": child_env(train_threads)}
    launch = launch_inprocess if launcher == "inprocess" else launch_subprocess
    status: dict[str, str] = {}
    counts = {"ran": 0, "skipped": 0, "failed": 0, "blocked": 0}
    outputs = {st.id: st.output for st in stages}
    for i, st in enumerate(stages, 1):
        env = envs["speed" if st.kind == "speed" else "other"]
        tag = f"[{i}/{len(stages)}] {st.id}"
        if kinds is not None and st.kind not in kinds:
            status[st.id] = "complete" if st.check(st.output) else "not selected"
            continue
        dep = outputs.get(st.needs) if st.needs else None
        stale = dep is not None and st.output.is_file() and dep.is_file() and \
            st.output.stat().st_mtime < dep.stat().st_mtime  # the model was (re)trained after this result
        if stale:
            print(f"{tag}: stale (older than {dep}): running again", flush=True)
        elif st.check(st.output):
            status[st.id] = "complete"
            counts["skipped"] += 1
            _warn_if_changed(st, out)
            if st.after:
                st.after()
            print(f"{tag}: skip (complete: {st.output})", flush=True)
            continue
        if st.needs and status.get(st.needs) not in ("complete", "ran", "dry-run"):
            status[st.id] = "blocked"
            counts["blocked"] += 1
            print(f"{tag}: blocked ({st.needs} is {status.get(st.needs, 'not planned')})", flush=True)
            continue
        if dry_run:
            status[st.id] = "dry-run"
            print(f"{tag}: would run  {st.display}", flush=True)
            continue
        log = out / "logs" / (st.id.replace(":", "_") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{tag}: run  {st.display}", flush=True)
        t0 = time.time()
        rc = launch(st, log, env, verbose)
        seconds = time.time() - t0
        ok = rc == 0 and st.check(st.output)
        if ok:
            status[st.id] = "ran"
            counts["ran"] += 1
            if st.after:
                st.after()
            write_json(out / "stamps" / (st.id.replace(":", "_") + ".json"), {
                "id": st.id, "command": st.display, "argv": st.argv, "seconds": round(seconds, 1),
                "finished": _now(), "launcher": launcher, "load_average": _load_average(),
            })
            print(f"{tag}: done in {seconds:.0f} s", flush=True)
        else:
            status[st.id] = "failed"
            counts["failed"] += 1
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
            print(f"{tag}: FAILED (exit {rc}) after {seconds:.0f} s; log {log}:\n    " + "\n    ".join(tail),
                  flush=True)
    return {"status": status, "counts": counts}


def _warn_if_changed(st: Stage, out: Path) -> None:
    stamp = read_json(out / "stamps" / (st.id.replace(":", "_") + ".json"))
    if isinstance(stamp, dict) and stamp.get("argv") not in (None, st.argv):
        print(f"  warning: {st.id} was produced by a different command:\n    {stamp.get('command')}\n"
              f"  delete {st.output} to redo it with the current settings", flush=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- report


def _fmt(x: Any, spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _sx(stats: dict | None) -> str:
    """'2.31x (MAT 3.10)'"""
    if not stats:
        return "n/a"
    return f"{_fmt(stats.get('speedup'), '.2f', 'x')} (MAT {_fmt(stats.get('mat'), '.2f')})"


def _sources(stats: dict | None) -> str:
    """'0.21 / 0.85': accepted draft tokens per step a Jacobi node / the retrieval chain drafted."""
    j, r = (stats or {}).get("jacobi_per_step"), (stats or {}).get("retrieval_per_step")
    return "n/a" if j is None or r is None else f"{j:.2f} / {r:.2f}"


def collect(groups: Sequence[Group], out: Path) -> dict[str, Any]:
    """Everything the report shows, read from the files the msn commands wrote."""
    variants: dict[str, Any] = {}
    for g in groups:
        for v in g.variants:
            vid = f"{g.name}-{v.name}"
            qdir, bdir, rdir = out / "quality" / vid, out / "bench" / vid, out / "train" / vid
            entry: dict[str, Any] = {
                "group": g.name, "variant": v.name, "base_model": g.model, "data": g.data,
                "trained": v.noise is not None,
                "noise": None if v.noise is None else {"type": v.noise, "length": v.length, "segments": v.segments},
                "train": None, "quality": {}, "speed": None,
            }
            meta = read_json(rdir / "msn.json") if v.noise is not None else None
            if isinstance(meta, dict):
                entry["train"] = {k: meta.get(k) for k in ("steps", "epochs", "seed", "batch_size", "grad_accum",
                                                           "lr", "bf16", "lora", "noise", "metrics", "data")}
                stamp = read_json(out / "stamps" / f"train_{vid}.json")
                entry["train"]["seconds"] = stamp.get("seconds") if isinstance(stamp, dict) else None
                entry["train"]["log"] = _train_log(read_json(qdir / "train_log.json"))
            for task in ("heldout-loss", "denoise", "humaneval"):
                res = read_json(qdir / f"{task}.json")
                if isinstance(res, dict):
                    res.pop("results", None)  # per-problem detail stays in the file
                    entry["quality"][task] = res
            summ = read_json(bdir / "summary.json")
            if isinstance(summ, dict) and summ.get("methods"):
                entry["speed"] = {
                    "status": summ.get("status"), "questions": summ.get("questions"),
                    "categories": summ.get("categories"),
                    "meta": {k: summ.get(k) for k in ("device", "device_name", "dtype", "torch_threads", "tree",
                                                       "max_new_tokens", "started", "finished",
                                                       "load_average_start", "load_average_end")},
                    "overall": {m: e["overall"] for m, e in summ["methods"].items()},
                    "per_category": {m: e["categories"] for m, e in summ["methods"].items()},
                    "per_question_mat": {m: _per_question_mat(bdir / "answers" / f"{m}.jsonl")
                                         for m in summ["methods"]},
                }
                by_jacobi = _per_question_mat(bdir / "answers" / "tr-jacobi.jsonl", "jacobi_accepted")
                if by_jacobi:  # benches before the per-source counts existed have none
                    entry["speed"]["per_question_mat"][BY_JACOBI] = by_jacobi
            variants[vid] = entry
    return variants


def _per_question_mat(path: Path, drafted_by: str | None = None) -> dict[str, float]:
    """question_id -> new tokens / decoding steps over all turns of one answer file (Spec-Bench answer JSONL);
    with ``drafted_by`` (``jacobi_accepted``), that per-step count's mean instead: one source's share of MAT."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, ZeroDivisionError):
                rec = json.loads(line)
                c = rec["choices"][0]
                if drafted_by:
                    value = sum(c[drafted_by]) / len(c[drafted_by])
                else:
                    value = sum(c["new_tokens"]) / sum(c["decoding_steps"])
                out[str(rec["question_id"])] = value
    return out


def paired(a: dict[str, float], b: dict[str, float], resamples: int = 2000) -> dict[str, Any] | None:
    """Per-question differences a - b on the questions both answered: mean, 95% bootstrap CI, wins/losses.

    Each model writes its own text, so a model-level MAT mixes "better drafts" with "easier text"; pairing by
    question and reporting the spread says whether a difference is larger than that question-to-question noise.
    """
    import random

    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    d = [a[k] - b[k] for k in keys]
    rng = random.Random(0)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(resamples))
    return {"n": len(d), "mean": sum(d) / len(d), "ci95": (means[int(0.025 * resamples)],
                                                          means[int(0.975 * resamples) - 1]),
            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d)}


def _train_log(history: Any) -> list[dict[str, Any]]:
    """Per evaluation step: held-out loss and denoising accuracy (from Trainer's log history)."""
    if not isinstance(history, list):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for e in history:
        if not isinstance(e, dict) or "step" not in e:
            continue
        row = by_step.setdefault(int(e["step"]), {"step": int(e["step"])})
        if "eval_loss" in e:
            row["eval_loss"] = e["eval_loss"]
        accs = {k: v for k, v in e.items() if k.startswith("eval_denoise_acc")}
        row.update(accs)
    return [r for _, r in sorted(by_step.items()) if len(r) > 1]


def _q(entry: dict, task: str, key: str) -> Any:
    return (entry["quality"].get(task) or {}).get(key)


def _speed(entry: dict, method: str) -> dict | None:
    return (entry.get("speed") or {}).get("overall", {}).get(method)


def _noise_label(entry: dict) -> str:
    n = entry["noise"]
    if n is None:
        return "untrained"
    if n["type"] == "none":
        return "plain SFT"
    return f"{n['type']} L={n['length']} x{n['segments']}"


def tables(groups: Sequence[Group], variants: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"side_by_side": {}, "decoders": {}, "noise_length_ablation": [], "paired_vs_sft": {},
                           "retrieval_ablation": {}, "claims": [], "training_curves": {}, "bench_runs": []}
    for g in groups:
        rows = []
        ids = [f"{g.name}-{v.name}" for v in g.variants]
        for vid in ids:
            e = variants[vid]
            rows.append({
                "variant": vid, "noise": _noise_label(e), "steps": (e["train"] or {}).get("steps"),
                "heldout_loss": _q(e, "heldout-loss", "loss"), "perplexity": _q(e, "heldout-loss", "perplexity"),
                "next_token_acc": _q(e, "heldout-loss", "next_token_acc"),
                "denoise_acc": _q(e, "denoise", "acc"),
                "denoise_acc_k": [_q(e, "denoise", f"acc_{k}") for k in range(DENOISE_L)],
                "humaneval_pass_at_1": _q(e, "humaneval", "pass_at_1") if g.humaneval else None,
                "humaneval_n": _q(e, "humaneval", "n") if g.humaneval else None,
                "ar_tokens_per_s": (_speed(e, "ar") or {}).get("tokens_per_s"),
                **{f"{m}_speedup": (_speed(e, m) or {}).get("speedup") for m in METHODS if m != "ar"},
                **{f"{m}_mat": (_speed(e, m) or {}).get("mat") for m in METHODS if m != "ar"},
                "tr-jacobi_identical": (_speed(e, "tr-jacobi") or {}).get("identical_rate"),
            })
        out["side_by_side"][g.name] = rows
        out["decoders"][g.name] = {
            m: {vid: _speed(variants[vid], m) for vid in ids} for m in METHODS if m != "ar"
        }
        # retrieval ablation: jacobi vs tr-jacobi, per category, from the same bench runs
        retr: dict[str, Any] = {}
        for vid in ids:
            sp = variants[vid].get("speed")
            if not sp:
                continue
            cats = {}
            for c in sp["categories"] or []:
                j = sp["per_category"].get("jacobi", {}).get(c)
                t = sp["per_category"].get("tr-jacobi", {}).get(c)
                if j and t:
                    cats[c] = {"jacobi": j, "tr-jacobi": t,
                               "helps": (t.get("speedup") or 0) > (j.get("speedup") or 0)}
            retr[vid] = {"categories": cats, "helped": sum(c["helps"] for c in cats.values()), "n": len(cats),
                         "overall": {"jacobi": _speed(variants[vid], "jacobi"),
                                     "tr-jacobi": _speed(variants[vid], "tr-jacobi")}}
        out["retrieval_ablation"][g.name] = retr
        sft_speed = (variants.get(f"{g.name}-sft") or {}).get("speed")
        if sft_speed:
            out["paired_vs_sft"][g.name] = {
                vid: {m: paired(variants[vid]["speed"]["per_question_mat"].get(m, {}),
                                sft_speed["per_question_mat"].get(m, {})) for m in PAIRED}
                for vid in ids if vid != f"{g.name}-sft" and variants[vid].get("speed")}
        for vid in ids:
            e = variants[vid]
            if e["train"] and e["train"].get("log"):
                out["training_curves"][vid] = e["train"]["log"]
            if e.get("speed"):
                out["bench_runs"].append({"variant": vid, "questions": e["speed"]["questions"],
                                          "status": e["speed"]["status"], **e["speed"]["meta"]})
        if g.ablation:
            abl = [v for v in g.variants if v.noise == "ahead" and v.segments == g.ablation_segments]
            for v in sorted(abl, key=lambda v: v.length):
                e = variants[f"{g.name}-{v.name}"]
                out["noise_length_ablation"].append({
                    "variant": f"{g.name}-{v.name}", "length": v.length, "segments": v.segments,
                    "denoise_acc": _q(e, "denoise", "acc"), "heldout_loss": _q(e, "heldout-loss", "loss"),
                    "next_token_acc": _q(e, "heldout-loss", "next_token_acc"),
                    "jacobi_mat": (_speed(e, "jacobi") or {}).get("mat"),
                    "tr-jacobi_mat": (_speed(e, "tr-jacobi") or {}).get("mat"),
                    "tr-jacobi_speedup": (_speed(e, "tr-jacobi") or {}).get("speedup"),
                    "jacobi_mat_vs_sft": (out["paired_vs_sft"].get(g.name, {}).get(f"{g.name}-{v.name}")
                                          or {}).get("jacobi"),
                })
    out["claims"] = claims(groups, variants, out)
    return out


def claims(groups: Sequence[Group], variants: dict[str, Any], t: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def holds(x: bool | None) -> str:
        return "n/a" if x is None else ("yes" if x else "no")

    for g in groups:
        sft = variants.get(f"{g.name}-sft")
        for v in g.variants:
            if v.noise != "ahead" or (v.length != PAPER["best_length"]):
                continue
            vid = f"{g.name}-{v.name}"
            e = variants[vid]
            tr = _speed(e, "tr-jacobi") or {}
            s = tr.get("speedup")
            rows.append({"claim": "tr-jacobi speed-up 2.3-2.7x", "paper": "2.3-2.7x (Vicuna-7B, A100)",
                         "variant": vid, "ours": _fmt(s, ".2f", "x"),
                         "holds": holds(None if s is None else s >= PAPER["speedup"][0])})
            if sft:
                mj, sj = (_speed(e, "jacobi") or {}).get("mat"), (_speed(sft, "jacobi") or {}).get("mat")
                mt, st = tr.get("mat"), (_speed(sft, "tr-jacobi") or {}).get("mat")
                ok = None if None in (mj, sj, mt, st) else (mj > sj and mt > st)
                rows.append({"claim": "noisy SFT unlocks Jacobi: more accepted tokens than plain SFT",
                             "paper": "yes", "variant": vid,
                             "ours": f"MAT jacobi {_fmt(mj, '.2f')} vs {_fmt(sj, '.2f')}, "
                                     f"tr-jacobi {_fmt(mt, '.2f')} vs {_fmt(st, '.2f')}", "holds": holds(ok)})
                ml, sl = _q(e, "heldout-loss", "loss"), _q(sft, "heldout-loss", "loss")
                ok_loss = None if None in (ml, sl) else ml <= sl * (1 + QUALITY_LOSS_TOL)
                text = f"held-out loss {_fmt(ml)} vs SFT {_fmt(sl)}"
                ok = ok_loss
                if g.humaneval:
                    mh, sh, n = _q(e, "humaneval", "pass_at_1"), _q(sft, "humaneval", "pass_at_1"), _q(e, "humaneval", "n")
                    text += f"; HumanEval {_fmt(mh)} vs {_fmt(sh)} (n={n})"
                    ok_he = None if None in (mh, sh) or not n else mh >= sh - QUALITY_HE_PROBLEMS / n
                    ok = None if None in (ok_loss, ok_he) else (ok_loss and ok_he)
                rows.append({"claim": "quality kept (vs plain SFT, same data/steps/seed)", "paper": "yes",
                             "variant": vid, "ours": text, "holds": holds(ok)})
            r = t["retrieval_ablation"][g.name].get(vid)
            if r and r["n"]:
                rows.append({"claim": "retrieval helps every category (tr-jacobi > jacobi)", "paper": "yes",
                             "variant": vid, "ours": f"{r['helped']}/{r['n']} categories",
                             "holds": holds(r["helped"] == r["n"])})
        if g.ablation:
            abl = [r for r in t["noise_length_ablation"] if r["variant"].startswith(f"{g.name}-")]
            scored = [r for r in abl if r["tr-jacobi_speedup"] is not None]
            if {r["length"] for r in scored} >= {1, 4, 8}:
                best = max(scored, key=lambda r: r["tr-jacobi_speedup"])
                ours = ", ".join(f"L={r['length']}: {r['tr-jacobi_speedup']:.2f}x" for r in scored)
                rows.append({"claim": "noise length 4 is best of {1, 4, 8}", "paper": "L=4",
                             "variant": f"{g.name} ablation", "ours": ours + f" (best L={best['length']})",
                             "holds": holds(best["length"] == PAPER["best_length"])})
            else:
                rows.append({"claim": "noise length 4 is best of {1, 4, 8}", "paper": "L=4",
                             "variant": f"{g.name} ablation", "ours": "n/a (ablation incomplete)", "holds": "n/a"})
    return rows


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "load_average": _load_average()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):  # no torch import: the report stays instant
        info["torch"] = importlib.metadata.version("torch")
    info["gpu"] = None
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            info["gpu"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                         timeout=30).stdout.strip() or None
    return info


def render_markdown(report: dict[str, Any], groups: Sequence[Group]) -> str:
    t = report["tables"]
    L: list[str] = [
        f"# Reproduction of issue 5: plain SFT vs MSN ({report['budget']} budget)", "",
        f"- generated: {report['created']}",
        f"- machine: {report['machine'].get('cpu', '?')} ({report['machine'].get('cpu_count')} cores), "
        f"GPU {report['machine'].get('gpu') or 'none'}, torch {report['machine'].get('torch', '?')}, "
        f"{report['machine'].get('platform')}",
        f"- questions: `{report['questions']}`",
        f"- stages: {report['stage_counts']}", "",
        "Speed-up is tokens/s relative to `ar` within the same bench run (Spec-Bench conventions, bf16, greedy, "
        "batch 1); MAT = mean accepted tokens per decoding step, bonus token included. Denoising accuracy: one "
        f"ahead-noise segment of {DENOISE_L} in held-out text, accuracy of the argmax at noised position k for "
        "the clean next token, mean over k (the same L for every model).", "",
    ]
    for g in groups:
        rows = t["side_by_side"][g.name]
        L += [f"## {g.name}: `{g.model}` on `{g.data}`" + (" (LoRA)" if g.lora else ""), "",
              "### Quality and speed side by side", ""]
        he = " HumanEval pass@1 |" if g.humaneval else ""
        L.append("| variant | noise | steps | held-out loss | ppl | next-token acc | denoise acc (k=0..3) |" + he +
                 " AR tok/s | pld | jacobi | tr-jacobi | tr-jacobi identical |")
        L.append("|---|---|---:|---:|---:|---:|---|" + ("---:|" if g.humaneval else "") + "---:|---:|---:|---:|---:|")
        for r in rows:
            ks = " ".join(_fmt(a, ".2f") for a in r["denoise_acc_k"])
            steps = "0" if r["noise"] == "untrained" else _fmt(r["steps"], "d")
            cells = [r["variant"], r["noise"], steps,
                     _fmt(r["heldout_loss"]), _fmt(r["perplexity"], ".2f"), _fmt(r["next_token_acc"]),
                     f"{_fmt(r['denoise_acc'])} ({ks})"]
            if g.humaneval:
                cells.append(f"{_fmt(r['humaneval_pass_at_1'])} (n={r['humaneval_n'] or 0})")
            cells += [_fmt(r["ar_tokens_per_s"], ".1f")]
            for m in ("pld", "jacobi", "tr-jacobi"):
                cells.append(f"{_fmt(r[f'{m}_speedup'], '.2f', 'x')} (MAT {_fmt(r[f'{m}_mat'], '.2f')})")
            ident = r["tr-jacobi_identical"]
            cells.append(_fmt(None if ident is None else 100 * ident, ".0f", "%"))
            L.append("| " + " | ".join(cells) + " |")
        L += ["", "### Each decoder across models (speed-up vs the same model's ar, MAT)", ""]
        dec = t["decoders"][g.name]
        vids = [r["variant"] for r in rows]
        L.append("| decoder | " + " | ".join(vids) + " |")
        L.append("|---|" + "---:|" * len(vids))
        for m, by in dec.items():
            L.append(f"| {m} | " + " | ".join(_sx(by[v]) for v in vids) + " |")
        tr = dec.get("tr-jacobi", {})
        if any((tr.get(v) or {}).get("jacobi_per_step") is not None for v in vids):
            L.append("| tr-jacobi: accepted drafts per step by Jacobi / retrieval | "
                     + " | ".join(_sources(tr.get(v)) for v in vids) + " |")
        retr = t["retrieval_ablation"][g.name]
        if retr:
            cats = list(dict.fromkeys(c for r in retr.values() for c in r["categories"]))
            L += ["", "### Retrieval ablation: jacobi -> tr-jacobi speed-up per category (same bench runs)", ""]
            L.append("| category | " + " | ".join(retr) + " |")
            L.append("|---|" + "---:|" * len(retr))
            for c in cats:
                cells = []
                for r in retr.values():
                    x = r["categories"].get(c)
                    cells.append("n/a" if not x else f"{_fmt(x['jacobi'].get('speedup'), '.2f')} -> "
                                 f"{_fmt(x['tr-jacobi'].get('speedup'), '.2f')}x" + (" +" if x["helps"] else " -"))
                L.append(f"| {c} | " + " | ".join(cells) + " |")
            L.append("| **helped** | " + " | ".join(f"{r['helped']}/{r['n']}" for r in retr.values()) + " |")
        L.append("")
    for gname, rows in t["paired_vs_sft"].items():
        if not rows:
            continue
        L += [f"## {gname}: MAT per question against plain SFT (paired)", "",
              "Each model writes its own answers, so its MAT mixes better drafts with easier (more repetitive) text. "
              "Per question: this model's MAT minus plain SFT's; mean, 95% bootstrap interval, questions won/lost.", "",
              f"`{BY_JACOBI}`: accepted draft tokens per step that a Jacobi node drafted inside tr-jacobi (Jacobi's "
              "part of tr-jacobi's MAT, without the retrieval chain's).", "",
              "| variant | " + " | ".join(PAIRED) + " |",
              "|---|" + "---:|" * len(PAIRED)]
        for vid, per in rows.items():
            cells = ["n/a" if not r else f"{r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] "
                     f"{r['wins']}/{r['losses']} of {r['n']}" for r in per.values()]
            L.append(f"| {vid} | " + " | ".join(cells) + " |")
        L.append("")
    if t["noise_length_ablation"]:
        segs = sorted({r["segments"] for r in t["noise_length_ablation"]})
        per = " / ".join(f"{n} segment{'s' if n > 1 else ''}" for n in segs)
        L += [f"## Noise-length ablation ({per} per sample, same data/steps/seed)", "",
              "| variant | L | denoise acc | held-out loss | next-token acc | jacobi MAT | jacobi MAT - SFT's (paired) "
              "| tr-jacobi MAT | tr-jacobi speed-up |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in t["noise_length_ablation"]:
            d = r.get("jacobi_mat_vs_sft")
            vs = "n/a" if not d else f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            L.append(f"| {r['variant']} | {r['length']} | {_fmt(r['denoise_acc'])} | {_fmt(r['heldout_loss'])} | "
                     f"{_fmt(r['next_token_acc'])} | {_fmt(r['jacobi_mat'], '.2f')} | {vs} | "
                     f"{_fmt(r['tr-jacobi_mat'], '.2f')} | {_fmt(r['tr-jacobi_speedup'], '.2f', 'x')} |")
        L.append("")
    L += ["## The paper's claims", "",
          f"Quality kept means: held-out loss at most {100 * QUALITY_LOSS_TOL:.0f}% above plain SFT and HumanEval "
          f"pass@1 at most {QUALITY_HE_PROBLEMS} problems below it.", "",
          "| claim | paper | variant | ours | holds here |", "|---|---|---|---|---|"]
    for c in t["claims"]:
        L.append(f"| {c['claim']} | {c['paper']} | {c['variant']} | {c['ours']} | {c['holds']} |")
    L.append("")
    if t["training_curves"]:
        L += ["## Denoising accuracy during training (msn train's evaluations)", "",
              "The in-training denoise metric uses each run's own --noise-length; the tables above use "
              f"L={DENOISE_L} for every model.", "",
              "| variant | step | held-out loss | denoise acc k=0.. |", "|---|---:|---:|---|"]
        for vid, log in t["training_curves"].items():
            for r in log:
                ks = sorted((k for k in r if k.startswith("eval_denoise_acc_")), key=lambda k: int(k.rsplit("_", 1)[1]))
                L.append(f"| {vid} | {r['step']} | {_fmt(r.get('eval_loss'))} | "
                         + " ".join(_fmt(r[k], ".3f") for k in ks) + " |")
        L.append("")
    if t["bench_runs"]:
        L += ["## Bench runs (timing context)", "",
              "| variant | questions | status | device | threads | tree | started | finished | load start/end |",
              "|---|---:|---|---|---:|---|---|---|---|"]
        for r in t["bench_runs"]:
            L.append(f"| {r['variant']} | {r['questions']} | {r['status']} | {r.get('device_name') or r.get('device')} | "
                     f"{r.get('torch_threads')} | {r.get('tree')} | {r.get('started')} | {r.get('finished')} | "
                     f"{r.get('load_average_start')}/{r.get('load_average_end')} |")
        L.append("")
    missing = [s for s in report["stages"] if s["status"] not in ("ran", "complete")]
    if missing:
        L += ["## Missing results", "", "These stages have no complete output yet (logs in `logs/`); rerun the "
              "driver command below to continue.", "", "| stage | status |", "|---|---|"]
        L += [f"| {s['id']} | {s['status'] or 'not selected in this invocation'} |" for s in missing]
        L.append("")
    L += ["![MAT and speed-up per variant](report.png)", "", "## How to reproduce", "",
          "The whole pipeline (resumable; completed stages are skipped):", "", "```",
          report["driver_command"], "```", "",
          "Each stage is one documented command (`msn` = `python -m msn.cli`), in this order:", "", "```"]
    L += [s["command"] + (f"    # {s['seconds']} s" if s.get("seconds") is not None else "") for s in report["stages"]]
    L += ["```", ""]
    return "\n".join(L)


def plot(report: dict[str, Any], path: Path) -> bool:
    rows = [r for g in report["tables"]["side_by_side"].values() for r in g]
    rows = [r for r in rows if r["ar_tokens_per_s"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ("pld", "jacobi", "tr-jacobi")
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.8 * len(rows) + 2), 7.0), sharex=True)
    width = 0.8 / len(methods)
    for ax, key, label in ((axes[0], "mat", "MAT (tokens / step)"), (axes[1], "speedup", "speed-up vs ar")):
        for i, m in enumerate(methods):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            ax.bar(xs, [r[f"{m}_{key}"] or 0.0 for r in rows], width, label=m)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the legend
    axes[0].legend(fontsize="small", ncol=len(methods), loc="upper left")
    axes[0].set_title(f"MSN reproduction ({report['budget']} budget)")
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels([r["variant"] for r in rows], rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(groups: Sequence[Group], stages: Sequence[Stage], out: Path, budget_name: str, questions: str,
                 driver_command: str, result: dict[str, Any]) -> dict[str, Any]:
    variants = collect(groups, out)
    stage_rows = []
    for st in stages:
        stamp = read_json(out / "stamps" / (st.id.replace(":", "_") + ".json"))
        stage_rows.append({"id": st.id, "kind": st.kind, "variant": st.variant_id, "command": st.display,
                           "status": result["status"].get(st.id), "output": str(st.output),
                           "seconds": stamp.get("seconds") if isinstance(stamp, dict) else None,
                           "finished": stamp.get("finished") if isinstance(stamp, dict) else None})
    report = {
        "budget": budget_name, "created": _now(), "out": str(out), "questions": questions,
        "driver_command": driver_command, "machine": machine(), "stage_counts": result["counts"],
        "variants": variants, "stages": stage_rows,
    }
    report["tables"] = tables(groups, variants)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report, groups))
    report["plot"] = plot(report, out / "report.png")
    return report


# ---------------------------------------------------------------------------------------------- CLI


def default_questions() -> str:
    env = os.environ.get("MSN_SPEC_BENCH")
    if env:
        return env
    return str(REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", required=True, choices=["toy", "cpu", "gpu"],
                   help="toy: seconds, proves the pipeline; cpu: a 2-core CPU, hours; gpu: paper-like")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce-BUDGET); rerun to resume")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default $MSN_SPEC_BENCH or "
                   "../shared/data/spec_bench/question.jsonl)")
    p.add_argument("--groups", default="general,code", help="comma-separated: general, code (default both)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants to keep: NAME (every group) or GROUP:NAME, e.g. "
                        "base,sft,msn-L4 or general:msn-L1 (default all)")
    p.add_argument("--stages", default="train,quality,speed",
                   help="comma-separated stage kinds to run: train, quality, speed (the report is always written; "
                        "--stages '' only rewrites it)")
    p.add_argument("--model-general", default=None, help="base model of the general group (preset/folder/hub id)")
    p.add_argument("--model-code", default=None, help="base model of the code group")
    p.add_argument("--data-general", default=None, help="training/held-out data of the general group")
    p.add_argument("--data-code", default=None, help="training/held-out data of the code group")
    p.add_argument("--max-steps", type=int, default=None, help="override every group's training steps")
    p.add_argument("--per-category", type=int, default=None, help="override the bench's questions per category")
    p.add_argument("--humaneval-limit", type=int, default=None, help="override the HumanEval problem count")
    p.add_argument("--no-lora", action="store_true", help="full fine-tuning for the code group too")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per command (OMP_NUM_THREADS and msn bench --threads); default 1 for "
                        "toy/cpu, torch's choice for gpu")
    p.add_argument("--train-threads", type=int, default=None,
                   help="CPU threads of the training and evaluation commands (default: torch's choice, every core)")
    p.add_argument("--device", default=None, help="--device of msn bench and msn eval (default: bench auto, eval cpu)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every checkpoint of a finished run (default: keep only the last)")
    p.add_argument("--launcher", default="subprocess", choices=["subprocess", "inprocess"],
                   help="subprocess (default): each stage is `python -m msn.cli ...`; inprocess: the same argv "
                        "through msn.cli.main in this process (tests only: saves the imports)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing, write no report")
    p.add_argument("-v", "--verbose", action="store_true", help="stream each command's output")
    return p.parse_args(argv)


def configure(a: argparse.Namespace) -> list[Group]:
    groups = {g.name: g for g in budget(a.budget)}
    wanted = [x.strip() for x in a.groups.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in groups]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; choose from {list(groups)}")
    chosen = [copy.deepcopy(groups[x]) for x in wanted]
    keep = {x.strip() for x in a.variants.split(",") if x.strip()} if a.variants else None
    for g in chosen:
        model, data = getattr(a, f"model_{g.name}"), getattr(a, f"data_{g.name}")
        g.model = model or g.model
        g.data = data or g.data
        if keep is not None:  # "name" keeps it in every group, "group:name" in that group only
            g.variants = [v for v in g.variants if v.name in keep or f"{g.name}:{v.name}" in keep]
        if a.max_steps is not None:
            g.train["max_steps"] = a.max_steps
        if a.per_category is not None:
            g.per_category = a.per_category
        if a.humaneval_limit is not None:
            g.humaneval_limit = a.humaneval_limit
        if a.no_lora:
            g.lora = False
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out or f"runs/reproduce-{a.budget}")
    questions = a.questions or default_questions()
    if not Path(questions).is_file():
        print(f"questions file not found: {questions} (pass --questions or set MSN_SPEC_BENCH)", file=sys.stderr)
        return 2
    threads = a.threads if a.threads is not None else (None if a.budget == "gpu" else 1)
    if threads and a.launcher == "inprocess":
        import torch

        torch.set_num_threads(threads)
    groups = configure(a)
    kinds = {x.strip() for x in a.stages.split(",") if x.strip()}
    unknown = kinds - {"train", "quality", "speed"}
    if unknown:
        raise SystemExit(f"unknown stage kind(s) {sorted(unknown)}; choose from train, quality, speed")
    stages = plan(groups, out, questions, threads, a.device, a.keep_checkpoints)
    driver_command = shlex.join(["python", "benchmarks/reproduce/run.py", *(sys.argv[1:] if argv is None else argv)])
    out.mkdir(parents=True, exist_ok=True)
    print(f"reproduce ({a.budget}): {sum(s.kind in kinds for s in stages)} stages -> {out}", flush=True)
    t0 = time.time()
    try:
        result = run_stages(stages, out, a.launcher, threads, a.verbose, a.dry_run, kinds, a.train_threads)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    if a.dry_run:
        return 0
    write_report(groups, stages, out, a.budget, questions, driver_command, result)
    c = result["counts"]
    print(f"ran {c['ran']}, skipped {c['skipped']}, failed {c['failed']}, blocked {c['blocked']} "
          f"in {time.time() - t0:.0f} s; report: {out / 'report.md'}", flush=True)
    return 1 if c["failed"] or c["blocked"] else 0


if __name__ == "__main__":
    sys.exit(main())
