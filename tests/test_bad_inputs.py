"""Issue 13 item 9: bad inputs through the real CLI. Each one must give exit code 2, exactly one line on
stderr (no traceback) naming the problem, and write or delete nothing -- checked on a snapshot of the
folder the command ran in. All are found before a model loads or a measurement starts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import counting_rows, write_jsonl

import msn.outputs
from msn.cli import main

QUESTION = json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi?"]}) + "\n"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file with its size and mtime, every folder by name (a write probe touches a folder's mtime)."""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with good and bad inputs; commands run inside it so a stray default output would show."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text(QUESTION)
    (tmp_path / "utf16.jsonl").write_bytes(QUESTION.encode("utf-16"))
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "prompt-utf16.txt").write_bytes("Write a haiku.".encode("utf-16"))
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    write_jsonl(tmp_path / "train.jsonl", counting_rows(8, 8))
    return tmp_path


def read_only(monkeypatch, folder: Path):
    """Make ``folder`` behave as on a read-only mount (root ignores permission bits, so no chmod)."""
    real = msn.outputs.tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(msn.outputs.tempfile, "mkstemp", mkstemp)


B = ["bench", "--questions", "q.jsonl", "--device", "cpu", "--dtype", "fp32"]
E = ["eval", "--task", "denoise", "--data", "train.jsonl"]
T = ["tune-tree", "--device", "cpu", "--dtype", "fp32"]

CASES = [
    # msn bench
    ("bench-dtype-int8", [*B[:-2], "--dtype", "int8", "--out", "o"], "invalid choice: 'int8'"),
    ("bench-device-tpu", [*B[:3], "--device", "tpu", "--out", "o"], "unknown device 'tpu'"),
    ("bench-out-is-file", [*B, "--out", "a-file"], "a-file is a file, not a folder"),
    ("bench-out-under-file", [*B, "--out", "a-file/sub"], "is a file, so a-file/sub cannot be a folder"),
    ("bench-out-read-only", [*B, "--out", "ro/bench"], "read-only file system"),
    ("bench-out-foreign", [*B, "--out", "foreign"], "holds no msn bench"),
    ("bench-questions-missing", [*B[:1], "--questions", "nope.jsonl", "--out", "o"], "nope.jsonl"),
    ("bench-questions-utf16", [*B[:1], "--questions", "utf16.jsonl", "--out", "o"], "utf16.jsonl"),
    ("bench-questions-binary", [*B[:1], "--questions", "binary.bin", "--out", "o"], "binary.bin"),
    ("bench-methods", [*B, "--methods", "ar,warp", "--out", "o"], "unknown method(s) warp"),
    ("bench-max-new-tokens", [*B, "--max-new-tokens", "0", "--out", "o"], "--max-new-tokens must be >= 1"),
    ("bench-limit", [*B, "--limit", "0", "--out", "o"], "--limit must be >= 1"),
    ("bench-threads", [*B, "--threads", "0", "--out", "o"], "--threads must be >= 1"),
    ("bench-warmup", [*B, "--warmup", "-1", "--out", "o"], "--warmup must be >= 0"),
    ("bench-max-new-tokens-text", [*B, "--max-new-tokens", "many", "--out", "o"], "invalid int value: 'many'"),
    # msn demo
    ("demo-dtype", ["demo", "--dtype", "int8", "--out", "o"], "invalid choice: 'int8'"),
    ("demo-max-new-tokens", ["demo", "--max-new-tokens", "0", "--out", "o"], "--max-new-tokens must be >= 1"),
    ("demo-out-is-file", ["demo", "--device", "cpu", "--out", "a-file"], "a-file is a file, not a folder"),
    # msn eval
    ("eval-task", ["eval", "--task", "speed"], "unknown task 'speed'"),
    ("eval-dtype-int8", [*E, "--dtype", "int8"], "unknown dtype 'int8'"),
    ("eval-device-tpu", [*E, "--device", "tpu"], "unknown device 'tpu'"),
    ("eval-out-is-folder", [*E, "--out", "a-folder"], "a-folder is a folder; give a file name"),
    ("eval-out-under-file", [*E, "--out", "a-file/r.json"], "is a file, so a-file/r.json cannot be created"),
    ("eval-out-read-only", [*E, "--out", "ro/r.json"], "read-only file system"),
    ("eval-noise-length", [*E, "--noise-length", "10000"], "--noise-length 10000 does not fit in --max-length 512"),
    ("eval-limit", [*E, "--limit", "0"], "--limit must be positive"),
    ("eval-empty-model", [*E, "--model", "empty-model"], "empty-model: folder holds no model"),
    ("eval-threads", [*E, "--threads", "0"], "--threads must be >= 1"),
    # msn tune-tree
    ("tune-out-is-folder", [*T, "--out", "a-folder"], "a-folder is a folder; give a file name"),
    ("tune-out-read-only", [*T, "--out", "ro/tree.json"], "read-only file system"),
    ("tune-sizes", [*T, "--sizes", "a,b", "--out", "t.json"], "--sizes must be comma-separated integers"),
    ("tune-dtype", [*T[:3], "--dtype", "int8", "--out", "t.json"], "invalid choice: 'int8'"),
    ("tune-repeats", [*T, "--repeats", "0", "--out", "t.json"], "--repeats must be >= 1"),
    # msn train (needs the tiny model folder for the tokenizer: {tiny})
    ("train-lr-negative", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--lr", "-1"],
     "--lr must be a positive number, got -1.0"),
    ("train-noise-length", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "r",
                            "--noise-length", "10000"], "--noise-length 10000 does not fit in --max-length 512"),
    ("train-data-utf16", ["train", "--model", "{tiny}", "--data", "utf16.jsonl", "--output", "r"],
     "utf16.jsonl: not UTF-8 text"),
    ("train-data-binary", ["train", "--model", "{tiny}", "--data", "binary.bin", "--output", "r"],
     "binary.bin: not UTF-8 text"),
    ("train-empty-model", ["train", "--model", "empty-model", "--data", "train.jsonl", "--output", "r"],
     "empty-model: folder holds no model"),
    ("train-output-is-file", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "a-file"],
     "output path exists and is not a folder"),
    ("train-output-read-only", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "ro/run"],
     "read-only file system"),
    ("train-epochs", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--epochs", "0"],
     "--epochs must be a positive number"),
    ("train-batch-size", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "r",
                          "--batch-size", "0"], "--batch-size must be positive"),
    ("train-threads", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--threads", "0"],
     "--threads must be >= 1"),
    ("train-threads-too-many", ["train", "--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--threads",
                                "100000"], "--threads 100000 is more than the"),
    ("train-resume-and-overwrite-flags", ["train", "--output", "r", "--lr", "nan"], "--lr must be a positive number"),
    # msn generate (its module belongs to decoding; these reach the CLI boundary)
    ("generate-prompt-utf16", ["generate", "--file", "prompt-utf16.txt", "--model", "{tiny}", "--device", "cpu"],
     "prompt-utf16.txt: not UTF-8 text"),
    ("generate-dtype-int8", ["generate", "--prompt", "hi", "--model", "{tiny}", "--dtype", "int8"],
     "'int8'"),
    ("generate-empty-model", ["generate", "--prompt", "hi", "--model", "empty-model"], "folder holds no model"),
    ("generate-tree-with-ar", ["generate", "--prompt", "hi", "--model", "{tiny}", "--method", "ar", "--tree",
                               "official-68"], "--tree official-68 has no effect with --method ar"),
    # issue 36 item 8: a temperature so small that logits / temperature overflows sampled token 0 every step
    ("generate-temperature-1e-300", ["generate", "--prompt", "hi", "--model", "{tiny}", "--temperature", "1e-300"],
     "temperature 1e-300 is below 1e-06: that is greedy decoding"),
    ("bench-temperature-1e-40", [*B, "--temperature", "1e-40", "--out", "o"], "temperature 1e-40 is below 1e-06"),
    ("demo-temperature-1e-300", ["demo", "--temperature", "1e-300", "--out", "o"], "temperature 0 in msn serve"),
]


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_touches_nothing(work, tiny_dir, monkeypatch, capsys, argv, expected):
    (work / "ro").mkdir()
    read_only(monkeypatch, work / "ro")
    argv = [str(tiny_dir) if a == "{tiny}" else a for a in argv]
    before = snapshot(work)
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, (rc, captured.err)
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith(f"msn {argv[0]}: error: ")
    assert expected in lines[0], lines[0]
    assert snapshot(work) == before, "a bad input wrote or deleted something"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("argv", [
    ["bench", "--questions", "q.jsonl", "--device", "cuda", "--out", "o"],
    ["eval", "--task", "denoise", "--device", "cuda"],
    ["tune-tree", "--device", "cuda", "--out", "t.json"],
    ["generate", "--prompt", "hi", "--device", "cuda:0"],
], ids=["bench", "eval", "tune-tree", "generate"])
def test_cuda_without_a_gpu(work, capsys, argv):
    before = snapshot(work)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], lines
    assert snapshot(work) == before


def run_subprocess(argv, cwd, **env):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "msn.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=180)


def test_hub_id_while_offline_in_a_real_process(work):
    before = snapshot(work)
    proc = run_subprocess(["eval", "--task", "denoise", "--model", "nobody-here/no-such-model-xyz"], work)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "nobody-here/no-such-model-xyz: cannot load the model" in lines[0] and "network" in lines[0]
    assert snapshot(work) == before


def test_bad_flag_in_a_real_process_is_one_line(work):
    proc = run_subprocess(["bench", "--dtype", "int8"], work)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "invalid choice: 'int8'" in lines[0], proc.stderr


def test_at_least_thirty_bad_inputs():
    assert len(CASES) >= 30
