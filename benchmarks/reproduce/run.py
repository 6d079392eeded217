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
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # budgets.py and report.py beside this script

from budgets import DENOISE_L, METHODS, REPO, Group, budget  # noqa: E402
from report import read_json, write_json, write_report  # noqa: E402

from msn.clock import load_average, now  # noqa: E402

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


def distill_done(p: Path) -> bool:
    meta = read_json(p)
    counts = meta.get("counts") if isinstance(meta, dict) else None
    return isinstance(counts, dict) and counts.get("prompts", 0) > 0 and counts.get("answered") == counts["prompts"]


def distill_stage(g: Group, out: Path, device: str | None) -> Stage:
    """The base model answers the group's prompts; the group then trains and evaluates on that file."""
    path = out / "distill" / f"{g.distill_key}.jsonl"
    argv = ["distill", "--model", g.model, *_flags(g.distill or {}), "--out", str(path)]
    if device:
        argv += ["--device", device]
    return Stage(f"distill:{g.distill_key}", "train", g.distill_key, argv, path.with_name(path.name + ".meta.json"),
                 distill_done)


def plan(groups: Sequence[Group], out: Path, questions: str, threads: int | None, device: str | None,
         keep_checkpoints: bool) -> list[Stage]:
    stages: list[Stage] = []
    for g in groups:
        data_id = None
        if g.distill:
            dst = distill_stage(g, out, device)
            g.data, data_id = str(dst.output.with_name(dst.output.name.removesuffix(".meta.json"))), dst.id
            if dst.id not in {s.id for s in stages}:  # groups with the same prompts share it
                stages.append(dst)
        split = ["--split", "heldout"] if g.distill else []  # a distilled file: score the part training left out
        for v in g.variants:
            vid = f"{g.name}-{v.name}"
            if v.noise is None:
                model = g.model
                train_id = data_id
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
                    train_id, "train", vid, argv, run_dir / "msn.json", train_done(g.train["max_steps"]), needs=data_id,
                    after=lambda run_dir=run_dir, vid=vid: _after_train(run_dir, out / "quality" / vid,
                                                                       keep_checkpoints),
                ))
            qdir = out / "quality" / vid
            dev = ["--device", device] if device else []  # eval's default is the CPU, bench's is auto
            common = ["--model", model, "--max-length", str(g.eval_max_length), *dev]
            for task, key in (("heldout-loss", "loss"), ("denoise", "acc")):
                argv = ["eval", *common, "--task", task, "--data", g.data, *split, "--limit", str(g.eval_limit),
                        "--dtype", g.eval_dtype]
                if task == "denoise":
                    argv += ["--noise-length", str(DENOISE_L), "--seed", "0"]
                argv += ["--out", str(qdir / f"{task}.json")]
                stages.append(Stage(f"quality:{vid}:{task}", "quality", vid, argv, qdir / f"{task}.json",
                                    eval_done(key), needs=train_id))
            if g.distill:  # does the trained model still answer as the base model did?
                d = g.distill
                argv = ["eval", "--model", model, *dev, "--task", "agreement", "--data", g.data, *split,
                        "--limit", str(g.agreement_limit), "--dtype", d["dtype"], "--batch-size", str(d["batch_size"]),
                        "--out", str(qdir / "agreement.json")]
                stages.append(Stage(f"quality:{vid}:agreement", "quality", vid, argv, qdir / "agreement.json",
                                    eval_done("exact"), needs=train_id))
            if g.humaneval:
                argv = ["eval", "--model", model, *dev, "--task", "humaneval", "--method", "ar",
                        "--max-new-tokens", str(g.humaneval_max_new_tokens), "--dtype", g.humaneval_dtype,
                        "--batch-size", str(g.humaneval_batch_size)]
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
                "finished": now(), "launcher": launcher, "load_average": load_average(),
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


# ---------------------------------------------------------------------------------------------- CLI


def default_questions() -> str:
    env = os.environ.get("MSN_SPEC_BENCH")
    if env:
        return env
    return str(REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", required=True, choices=["toy", "cpu", "gpu", "distill"],
                   help="toy: seconds, proves the pipeline; cpu: a 2-core CPU, hours; gpu: paper-like; distill: issue 11, SFT vs MSN on the base model's own answers at ~1M tokens (groups general, ablation, code)")
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
    p.add_argument("--distill-limit", type=int, default=None,
                   help="override the number of prompts every distilled group's base model answers")
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
        model, data = getattr(a, f"model_{g.name}", None), getattr(a, f"data_{g.name}", None)
        g.model = model or g.model
        g.data = data or g.data
        if keep is not None:  # "name" keeps it in every group, "group:name" in that group only
            g.variants = [v for v in g.variants if v.name in keep or f"{g.name}:{v.name}" in keep]
        if a.max_steps is not None:
            g.train["max_steps"] = a.max_steps
        if a.distill_limit is not None and g.distill:
            g.distill["limit"] = a.distill_limit
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
