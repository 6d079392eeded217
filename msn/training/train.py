"""``msn train``: ordinary SFT on HF ``Trainer`` with MSN noise in the data collator (``--noise predicted``
also refills the noise with the model's own guesses in the loss: ``msn.training.predicted_noise``;
``--noise-loss-weight`` counts the predictions made at noised inputs more: ``msn.training.noise_loss``).

Everything distributed (DDP through ``torchrun`` / ``accelerate launch``, FSDP / DeepSpeed via their
configs), checkpointing and resuming is Trainer's own; this module only wires the data, the collator, the
denoising-accuracy callback and an output folder that is never left half-written:

- bad input is detected before anything is written;
- a folder holding another run is refused unless ``--resume`` or ``--overwrite``; a folder with checkpoints
  but no ``msn-run.json`` / ``msn.json`` (a plain Trainer run) is not ours and refused even with them;
- ``--resume`` restarts from the last *complete* checkpoint (Trainer writes ``trainer_state.json`` last),
  and refuses a setting that differs from the one recorded in ``msn-run.json`` (only the length of the
  run -- ``--max-steps`` / ``--epochs`` -- and how often it logs, evaluates and saves may change);
- ``--overwrite`` deletes only what this run family recorded writing (the checkpoints listed in
  ``msn-run.json``, which names each one before the Trainer writes it, and ``msn-run.json``), never a folder by
  its name, and keeps the old final model until the new one replaces it; a ``checkpoint-N`` folder the record
  does not list is the user's, and a run into its folder is refused (the Trainer's checkpoint rotation deletes
  ``checkpoint-*`` folders by name);
- the final model goes to a temporary folder first; its files are moved in with ``os.replace`` and
  ``msn.json`` last, so ``msn.json`` present means the final model is complete. ``msn.json`` lists the
  model's files, so the next ``--overwrite`` knows which files are ours.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msn.data import split_dataset
from msn.errors import InputError, MsnError
from msn.flags import add_threads_argument
from msn.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from msn.training.collator import MSNCollator
from msn.training.noise import NoiseConfig

RUN_FILE = "msn-run.json"  # written when a run starts: marks the folder as ours
FINAL_FILE = "msn.json"  # written last: marks the final model as complete
TMP_FINAL = ".msn-final-tmp"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# Settings a resumed run must share with the run it continues; the others only say how long it runs and
# how often it logs / evaluates / saves.
RESUME_FIXED = ("model", "data", "noise", "noise_length", "noise_segments", "noise_prob", "noise_loss_weight",
                "lora", "lora_r", "bf16", "batch_size", "grad_accum", "lr", "warmup_steps", "max_length", "max_samples",
                "eval_samples", "seed")


@dataclass
class TrainConfig:
    """Everything ``msn train`` needs; the CLI flags map one to one onto these fields."""

    model: str = DEFAULT_MODEL
    data: str = "stdlib-code"
    output: str = "runs/msn"
    noise: str = "ahead"
    noise_length: int = 4
    noise_segments: int = 1
    noise_prob: float = 1.0
    noise_loss_weight: float = 1.0
    lora: bool = False
    lora_r: int = 16
    max_steps: int = -1
    epochs: float = 1.0
    bf16: bool = False
    resume: bool = False
    overwrite: bool = False
    eval_steps: int = 50
    save_steps: int = 100
    save_total_limit: int = 3
    logging_steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    max_length: int = 512
    max_samples: int | None = None
    eval_samples: int = 64
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    extra: dict[str, Any] = field(default_factory=dict)  # extra TrainingArguments (advanced / tests)

    def noise_config(self) -> NoiseConfig:
        return NoiseConfig(self.noise, self.noise_length, self.noise_segments, self.noise_prob)


# ---------------------------------------------------------------------------------------------- output dir


def last_checkpoint(output: str | os.PathLike) -> Path | None:
    """The highest-numbered checkpoint that was written completely (has ``trainer_state.json``)."""
    p = Path(output)
    if not p.is_dir():
        return None
    done = [
        (int(m.group(1)), d)
        for d in p.iterdir()
        if (m := _CKPT.match(d.name)) and d.is_dir() and (d / "trainer_state.json").is_file()
    ]
    return max(done)[1] if done else None


def recorded_checkpoints(output: Path) -> set[str] | None:
    """The checkpoint folders this run family wrote, from ``msn-run.json`` (None: a record from before msn
    listed them, or none)."""
    try:
        listed = json.loads((output / RUN_FILE).read_text()).get("checkpoints")
    except (OSError, ValueError, AttributeError):
        return None
    return {str(c) for c in listed if _CKPT.match(str(c))} if isinstance(listed, list) else None


def our_checkpoints(output: Path) -> list[Path]:
    """The checkpoint folders in ``output`` that this run family wrote: the recorded ones; for a record from
    before the list, the complete ones (``trainer_state.json``, which the Trainer writes last)."""
    if not output.is_dir():
        return []
    recorded = recorded_checkpoints(output)
    dirs = [d for d in output.iterdir() if _CKPT.match(d.name) and d.is_dir() and not d.is_symlink()]
    if recorded is None:
        return [d for d in dirs if (d / "trainer_state.json").is_file()]
    return [d for d in dirs if d.name in recorded]


def record_checkpoint(output: Path, name: str) -> None:
    """Add ``name`` to the run's record, before the Trainer writes the folder (a crash in between leaves a name
    without a folder, never a folder msn wrote without its name)."""
    from msn.outputs import atomic_write_text

    record = json.loads((output / RUN_FILE).read_text())
    listed = record.get("checkpoints") if isinstance(record.get("checkpoints"), list) else []
    if name not in listed:
        record["checkpoints"] = [*listed, name]
        atomic_write_text(output / RUN_FILE, json.dumps(record, indent=2, default=str) + "\n")


def _record_checkpoints_callback(output: Path):
    """Records each checkpoint's name at the end of the step that saves it (the Trainer saves right after)."""
    from transformers import TrainerCallback

    class RecordCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and state.is_world_process_zero:
                record_checkpoint(output, f"checkpoint-{state.global_step}")

    return RecordCheckpoints()


def check_output_dir(output: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds another run (or anything else) unless told to resume or overwrite it."""
    p = Path(output)
    if p.exists() and not p.is_dir():
        raise InputError("output path exists and is not a folder", where=str(p), field="output")
    if not p.is_dir() or not any(p.iterdir()):
        return
    # Only msn's own markers make a run: a plain Trainer folder has checkpoint-N folders too, and --overwrite
    # deletes checkpoints, --resume continues from them.
    is_run = (p / RUN_FILE).is_file() or (p / FINAL_FILE).is_file()
    if not is_run:
        foreign = sorted(d.name for d in p.iterdir() if _CKPT.match(d.name))
        if foreign:
            raise InputError(f"output folder holds checkpoints msn did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose another --output", str(p), "output")
        raise InputError("output folder is not empty and holds no msn run; choose an empty or new folder", str(p), "output")
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other", str(p), "output")
    ours = {d.name for d in our_checkpoints(p)}
    foreign = sorted((d.name for d in p.iterdir() if _CKPT.match(d.name) and d.name not in ours),
                     key=lambda n: int(n.split("-")[1]))
    if foreign:
        raise InputError(f"output folder holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, which "
                         f"this run did not write (not in {RUN_FILE}): --overwrite would delete it and the Trainer's "
                         "checkpoint rotation could; move it out of the folder, or choose another --output", str(p),
                         "output")
    if not (resume or overwrite):
        raise InputError("output folder holds another run; pass --resume to continue it or --overwrite to replace it", str(p), "output")


def clear_run(output: Path) -> None:
    """For ``--overwrite``: delete the previous run's checkpoints (those its record lists) and run record -- and
    nothing else. The old final model (and its ``msn.json``) stays until :func:`publish_final` replaces it;
    files msn did not write are never touched."""
    for d in our_checkpoints(output):
        shutil.rmtree(d)
    if (output / TMP_FINAL).is_dir() and not (output / TMP_FINAL).is_symlink():
        shutil.rmtree(output / TMP_FINAL)
    with contextlib.suppress(FileNotFoundError):
        (output / RUN_FILE).unlink()


def final_model_files(output: Path) -> set[str]:
    """Names of the files of the final model now in ``output`` (from ``msn.json``; by name for old runs)."""
    try:
        listed = json.loads((output / FINAL_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    if isinstance(listed, list):
        return {str(f) for f in listed if "/" not in str(f)}
    return set()  # a final model from before msn.json listed its files: nothing is deleted by its name


def check_resume(output: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with a setting that differs from the one the run was started with."""
    try:
        old = json.loads((output / RUN_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record (a run from before msn-run.json): nothing to compare with
    new = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    diffs = [f"--{k.replace('_', '-')} {new.get(k)!r} (the run has {old[k]!r})"
             for k in RESUME_FIXED if k in old and old[k] != new.get(k)]
    if diffs:
        raise InputError(f"--resume with other settings than the run: {'; '.join(diffs)}; resume with the recorded "
                         f"settings ({RUN_FILE}) or start a new --output", str(output), "resume")


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    import msn

    return {
        "msn": msn.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def publish_final(tmp: Path, output: Path, meta: dict[str, Any]) -> None:
    """Move the finished model from ``tmp`` into ``output`` file by file, writing ``msn.json`` last.

    Files of the previous final model that the new one does not have (a full model replaced by an adapter)
    are removed; ``msn.json`` records the new model's files for the next time."""
    new_files = sorted(f.name for f in tmp.iterdir() if f.is_file() and f.name != FINAL_FILE)
    old_files = final_model_files(output)
    meta = {**meta, "files": new_files}
    (tmp / FINAL_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    stale = output / FINAL_FILE
    if stale.exists():
        stale.unlink()  # the old marker must not vouch for a half-replaced model
    for name in new_files:
        os.replace(tmp / name, output / name)
    for name in sorted(old_files - set(new_files) - {FINAL_FILE, RUN_FILE}):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (output / name).unlink()
    os.replace(tmp / FINAL_FILE, output / FINAL_FILE)
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- training


def _has_accelerator() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _print(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(msg)


def _wrap_lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _denoise_callback(samples, noise_length: int, seed: int, batch_size: int):
    """A Trainer callback adding denoising accuracy to every evaluation (see ``msn.training.denoise``)."""
    from transformers import TrainerCallback

    from msn.training.denoise import denoise_accuracy

    class DenoiseCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            res = denoise_accuracy(model, samples, noise_length, seed, batch_size)
            extra = {f"eval_denoise_{k}": v for k, v in res.items() if k.startswith("acc")}
            if metrics is not None:
                metrics.update(extra)
            state.log_history.append({**extra, "step": state.global_step})
            if state.is_world_process_zero:
                accs = " ".join(f"{res[f'acc_{k}']:.3f}" for k in range(noise_length))
                loss = (metrics or {}).get("eval_loss", float("nan"))
                _print(f"step {state.global_step}: held-out loss {loss:.4f} | denoise acc k=0..{noise_length - 1}: {accs} (mean {res['acc']:.3f})")

    return DenoiseCallback()


def _load_tokenizer(model_path: str):
    """The tokenizer alone, so data errors surface before the (slower) model load."""
    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def validate(cfg: TrainConfig) -> None:
    """Every numeric flag, before anything is loaded or written."""
    for name in ("max_length", "batch_size", "grad_accum", "save_steps", "eval_samples", "lora_r", "logging_steps",
                 "save_total_limit"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}", field=name)
    for name in ("lr", "epochs"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise InputError(f"--{name} must be a positive number, got {v}", field=name)
    for name in ("warmup_steps", "eval_steps"):
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}", field=name)
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise InputError(f"--max-steps must be positive (or -1 for --epochs), got {cfg.max_steps}", field="max_steps")
    if cfg.max_samples is not None and cfg.max_samples <= 0:
        raise InputError(f"--max-samples must be positive, got {cfg.max_samples}", field="max_samples")
    if not 0 <= cfg.seed <= 2**32 - 1:  # transformers' set_seed refuses others, after the run folder is written
        raise InputError(f"--seed must be between 0 and {2**32 - 1}, got {cfg.seed}", field="seed")
    from msn.flags import at_least

    at_least(cfg, {"threads": 1})  # type: ignore[arg-type]  # reads the field like a flag
    if not (math.isfinite(cfg.noise_loss_weight) and cfg.noise_loss_weight > 0):
        raise InputError("--noise-loss-weight must be a positive number (1 = the paper's loss), got "
                         f"{cfg.noise_loss_weight}", field="noise_loss_weight")
    if cfg.noise_loss_weight != 1.0 and not cfg.noise_config().enabled:
        raise InputError(f"--noise-loss-weight {cfg.noise_loss_weight} weights noised positions, but --noise "
                         f"{cfg.noise} (prob {cfg.noise_prob}) places none; drop the flag or choose a noise",
                         field="noise_loss_weight")
    if cfg.noise_length >= cfg.max_length:
        raise InputError(f"--noise-length {cfg.noise_length} does not fit in --max-length {cfg.max_length} tokens; "
                         "use a noise length below the max length", field="noise_length")


def _segment_start(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = _CKPT.match(checkpoint.name)
        return int(m.group(1)) if m else 0


def full_train_loss(history: list[dict[str, Any]], final_step: int, start: int, segment_loss: float) -> float:
    """Mean training loss per step over the whole run, also when it was resumed.

    Trainer's ``training_loss`` averages only the steps of this process (0.0 when resumed from the final
    checkpoint). Steps before ``start`` come from the logged losses in the checkpoint's history (each the mean
    since the previous log), the steps of this segment from ``segment_loss``."""
    total, prev = 0.0, 0
    for entry in history:
        step, loss = entry.get("step"), entry.get("loss")
        if isinstance(step, int) and isinstance(loss, int | float) and prev < step <= start:
            total += float(loss) * (step - prev)
            prev = step
    seg = max(final_step - start, 0)
    total += segment_loss * seg
    covered = prev + seg
    return total / covered if covered else segment_loss


def training_arguments(cfg: TrainConfig, output: Path, evaluate: bool):
    """HF ``TrainingArguments`` for ``cfg``: the flags one to one, plus what msn's data and collator need."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        bf16=cfg.bf16,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,  # the collator reads the noise masks
        dataloader_num_workers=0,
        # Without an accelerator, accelerate treats torchrun processes as distributed (gloo) only with use_cpu.
        use_cpu=not _has_accelerator(),
        **cfg.extra,
    )


def run_record(cfg: TrainConfig, model_path: str, output: Path, resume_from: Path | None) -> dict[str, Any]:
    """What ``msn-run.json`` holds: the settings the run started with; a resumed run keeps that record and
    adds a note of each resumed segment."""
    record: dict[str, Any] = {"config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
                              "model_path": model_path, "checkpoints": []}
    if cfg.resume:
        # the checkpoints it continues from are this family's (a record from before the list: the complete ones)
        ours = sorted(d.name for d in our_checkpoints(output))
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            old = json.loads((output / RUN_FILE).read_text())
            segments = list(old.get("resumed", []))
            record = {**old, "resumed": [*segments, {
                "from": resume_from.name if resume_from else None,
                "max_steps": cfg.max_steps, "epochs": cfg.epochs}]}
        record["checkpoints"] = sorted(set(record.get("checkpoints") or []) | set(ours))
    return record


def final_metadata(cfg: TrainConfig, model_path: str, train_set, held, noise: NoiseConfig, trainer,
                   world_size: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What ``msn.json`` holds about the final model: its data, noise, steps, settings, metrics, versions."""
    return {
        "model": cfg.model,
        "model_path": model_path,
        "lora": cfg.lora,
        "data": {
            "spec": cfg.data,
            "train_samples": len(train_set),
            "train_tokens": train_set.num_tokens(),  # per epoch, after --max-length
            "heldout_samples": len(held) if held is not None else 0,
            "max_length": cfg.max_length,
            "dropped": train_set.dropped,
        },
        "noise": noise.to_dict(),
        "noise_loss_weight": cfg.noise_loss_weight,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens_seen": round((trainer.state.epoch or 0) * train_set.num_tokens()),  # what "a 1M-token run" counts
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": world_size,
        "lr": cfg.lr,
        "bf16": cfg.bf16,
        "metrics": metrics,
        "versions": _versions(),
    }


def trainer_class(noise: NoiseConfig, noise_loss_weight: float = 1.0) -> type:
    """Plain HF ``Trainer``, plus what the noise needs: ``PredictedNoiseTrainer`` for ``--noise predicted`` (its
    noise needs the model), ``NoiseWeightedLossTrainer`` for ``--noise-loss-weight`` (its loss needs the mask)."""
    from transformers import Trainer

    bases: list[type] = []
    if noise.type == "predicted":
        from msn.training.predicted_noise import PredictedNoiseTrainer

        bases.append(PredictedNoiseTrainer)
    if noise_loss_weight != 1.0:
        from msn.training.noise_loss import NoiseWeightedLossTrainer

        bases.append(NoiseWeightedLossTrainer)
    if len(bases) > 1:  # refill the noise first, then the weighted loss
        return type("MSNTrainer", tuple(bases), {})
    return bases[0] if bases else Trainer


def train(cfg: TrainConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; return the metadata written to ``msn.json``."""
    validate(cfg)
    noise = cfg.noise_config()  # validates noise flags before anything heavy
    output = Path(cfg.output)
    check_output_dir(output, cfg.resume, cfg.overwrite)
    if cfg.resume:
        check_resume(output, cfg)
    from msn.outputs import check_output_dir as check_writable

    check_writable(output, "--output")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    model_path = resolve_model(cfg.model)
    # The loaders name a model folder they cannot use themselves (MsnError); an OSError of the data reading
    # names its own file, so nothing here is blamed on --model.
    tokenizer = _load_tokenizer(model_path)
    limit = cfg.max_samples
    if limit is None and cfg.max_steps > 0:  # stream only what the steps will consume
        limit = cfg.max_steps * cfg.batch_size * cfg.grad_accum * _world_size()
    train_set, held = split_dataset(cfg.data, tokenizer, cfg.max_length, limit, cfg.eval_samples)
    model, _ = load_model(model_path, dtype="fp32", device="cpu")
    evaluate = cfg.eval_steps > 0 and held is not None
    if cfg.lora:
        model = _wrap_lora(model, cfg.lora_r)

    # All input is valid: from here on we write.
    resume_from = last_checkpoint(output) if cfg.resume else None
    args = training_arguments(cfg, output, evaluate)
    with args.main_process_first(desc="prepare output folder"):
        if args.process_index == 0:
            output.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite:
                clear_run(output)
            shutil.rmtree(output / TMP_FINAL, ignore_errors=True)
            run_meta = run_record(cfg, model_path, output, resume_from)
            from msn.outputs import atomic_write_text

            atomic_write_text(output / RUN_FILE, json.dumps(run_meta, indent=2, default=str) + "\n")
    if cfg.resume:
        _print(f"resuming from {resume_from}" if resume_from else "no complete checkpoint found: starting from scratch")

    all_callbacks = [_record_checkpoints_callback(output), *(callbacks or [])]
    if evaluate:
        all_callbacks.append(_denoise_callback(held.samples, cfg.noise_length, cfg.seed, cfg.batch_size))
    trainer = trainer_class(noise, cfg.noise_loss_weight)(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=held.clean() if evaluate else None,
        data_collator=MSNCollator(tokenizer, noise, seed=cfg.seed, noise_loss_weight=cfg.noise_loss_weight),
        processing_class=tokenizer,
        callbacks=all_callbacks,
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_loss = full_train_loss(trainer.state.log_history, trainer.state.global_step, _segment_start(resume_from),
                                 result.training_loss)
    metrics: dict[str, Any] = {"train_loss": train_loss}
    if evaluate and trainer.state.global_step % cfg.eval_steps != 0:
        metrics.update(trainer.evaluate())
    elif evaluate:
        metrics.update(_last_eval(trainer.state.log_history))

    tmp = output / TMP_FINAL
    try:
        trainer.save_model(str(tmp))  # every rank calls it (FSDP / DeepSpeed gather); only the main one writes
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(e, output) from None
    meta = final_metadata(cfg, model_path, train_set, held, noise, trainer, args.world_size, metrics)
    if trainer.is_world_process_zero():
        try:
            publish_final(tmp, output, meta)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _save_error(e, output) from None
        _print(f"[green]saved[/green] {'LoRA adapter' if cfg.lora else 'model'} to {output} (steps {meta['steps']})")
    args.distributed_state.wait_for_everyone()
    return meta


def _save_error(e: OSError, output: Path) -> MsnError:
    from msn.outputs import os_error_reason

    what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else os_error_reason(e)
    return MsnError(f"{output}: saving the final model failed ({what}); the checkpoints are kept: free space and "
                    "rerun with --resume to save it")


def _last_eval(history: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for entry in history:
        if any(k.startswith("eval_") for k in entry):
            merged.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return merged


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help=f"preset, local folder or hub id (default {d.model})")
    p.add_argument("--data", default=d.data, help="JSONL file, or a built-in dataset: sharegpt, stdlib-code")
    p.add_argument("--output", required=True, help="run folder: checkpoints, final model, msn.json")
    p.add_argument("--noise", default=d.noise, help="ahead (default) | uniform | none (plain SFT, the control) | "
                   "predicted (ahead segments refilled with the model's own shifted guesses, like Jacobi drafts)")
    p.add_argument("--noise-length", type=int, default=d.noise_length, help="positions per noise segment (default 4)")
    p.add_argument("--noise-segments", type=int, default=d.noise_segments, help="segments per sample (default 1, the paper's; 8 learns denoising "
                   "faster on short runs at ~3%% held-out loss: docs/results.md section 8)")
    p.add_argument("--noise-prob", type=float, default=d.noise_prob, help="chance a sample is noised (default 1)")
    p.add_argument("--noise-loss-weight", type=float, default=d.noise_loss_weight, help="weight of the loss at "
                   "predictions made from a noised input (default 1, the paper's mean; 4 raised pure-Jacobi acceptance "
                   "1.5x at +26%% held-out loss: docs/results.md section 14h)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (all linear layers) instead of all weights")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast; also on CPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --output and start again")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="evaluate every N steps and at the end; 0: never")
    p.add_argument("--save-steps", type=int, default=d.save_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per device")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per sample (longer ones are cut)")
    p.add_argument("--max-samples", type=int, default=None, help="training samples to read (default: all, or what --max-steps uses)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out samples per evaluation")
    p.add_argument("--logging-steps", type=int, default=d.logging_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    add_threads_argument(p)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(TrainConfig.__dataclass_fields__) - {"extra"}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        train(cfg)
    except KeyboardInterrupt:  # on a line of its own (the progress bar holds the cursor), saying what is kept
        last = last_checkpoint(cfg.output)
        kept = (f"{last.name} is kept: rerun with --resume (instead of --overwrite) to continue from it" if last
                else "no checkpoint was saved yet: rerun to start again")
        print(f"\nmsn train: interrupted; {kept}", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover  (``python -m msn.training.train ...`` = ``msn train ...``)
    parser = argparse.ArgumentParser(prog="python -m msn.training.train",
                                     description="fine-tune a model with MSN noise")
    add_arguments(parser)
    try:
        sys.exit(run(parser.parse_args()))
    except MsnError as e:
        sys.exit(f"msn train: error: {e}")
