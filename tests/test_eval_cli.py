"""`msn eval`: denoising accuracy means what it says, held-out loss, the CLI, JSON output, humaneval hand-off."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from msn.cli import main
from msn.data import IGNORE
from msn.eval.loss import heldout_loss
from msn.training.denoise import denoise_accuracy

V = 64


class _Logits(torch.nn.Module):
    """A fake LM: ``logits_for(ids)`` returns the index to put the argmax on, per position."""

    def __init__(self, logits_for):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logits_for = logits_for

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.nn.functional.one_hot(self.logits_for(input_ids) % V, V).float() * 30)


def counting_samples(n=6, length=30):
    """ids[p] = p: the clean next token of position p is p + 1."""
    out = []
    for i in range(n):
        ids = torch.arange(length - i)
        labels = ids.clone()
        labels[:8] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_denoise_accuracy_is_one_for_a_perfect_denoiser_and_zero_for_a_copycat():
    samples = counting_samples()
    oracle = _Logits(lambda ids: torch.arange(ids.shape[1]).expand_as(ids) + 1)  # knows position -> clean next
    copycat = _Logits(lambda ids: ids + 1)  # trusts its (noised) input
    good = denoise_accuracy(oracle, samples, noise_length=4)
    bad = denoise_accuracy(copycat, samples, noise_length=4)
    assert [good[f"acc_{k}"] for k in range(4)] == [1.0] * 4 and good["acc"] == 1.0
    # Ahead noise at p copies an id j < p, so a model that trusts its input predicts j + 1 <= p, never p + 1.
    assert bad["acc"] == 0.0
    assert all(good[f"n_{k}"] == len(samples) for k in range(4))


def test_evaluation_noise_is_fixed_by_the_seed_and_another_seed_draws_other_noise():
    samples = counting_samples()

    def run(seed):
        seen: list[torch.Tensor] = []
        half = _Logits(lambda ids: seen.append(ids.clone()) or torch.where(  # denoises at even positions only
            torch.arange(ids.shape[1]) % 2 == 0, torch.arange(ids.shape[1]) + 1, ids + 1))
        return denoise_accuracy(half, samples, noise_length=4, seed=seed), seen

    (a, inputs_a), (b, inputs_b), (c, inputs_c) = run(3), run(3), run(4)
    assert a == b and all(torch.equal(x, y) for x, y in zip(inputs_a, inputs_b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(inputs_a, inputs_c, strict=True)), "the seed picks the noise"
    assert a != c, "and so what is scored"


def test_heldout_loss_counts_only_label_positions():
    samples = counting_samples(2, 20)
    perfect = heldout_loss(_Logits(lambda ids: ids + 1), samples)
    assert perfect["next_token_acc"] == 1.0 and perfect["loss"] < 1e-3
    assert perfect["tokens"] == (20 - 8) + (19 - 8)


@pytest.mark.parametrize("task, key", [("denoise", "acc_3"), ("heldout-loss", "loss")])
def test_eval_cli_prints_a_table_and_writes_json(task, key, tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"
    rc = main(["eval", "--model", str(tiny_dir), "--task", task, "--data", str(data_file), "--limit", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert task in printed and key in printed
    res = json.loads(out.read_text())
    assert res["task"] == task and res["samples"] == 3 and key in res
    assert not [p for p in out.parent.iterdir() if p.name != "r.json"], "temp file left behind"


def test_eval_cli_errors_are_one_line(tiny_dir, data_file, tmp_path, capsys):
    cases = [
        (["--task", "bleu"], "unknown task 'bleu'"),
        (["--task", "denoise", "--noise-length", "0"], "--noise-length must be positive"),
        (["--task", "denoise", "--data", str(tmp_path / "none.jsonl")], "data file not found"),
        (["--task", "humaneval", "--method", "tr-jacobi", "--batch-size", "4"], "batched HumanEval generates plainly"),
    ]
    for extra, msg in cases:
        rc = main(["eval", "--model", str(tiny_dir), *extra])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and err.startswith("msn eval: error:") and msg in err, err


def test_humaneval_hands_off_to_the_evaluator(tiny_dir, tmp_path, capsys, monkeypatch):
    import msn.eval as pkg

    calls = {}

    def fake(model, tokenizer, *, method, limit, max_new_tokens, batch_size):
        calls.update(method=method, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return {"pass@1": 0.5, "problems": 2}

    fake_mod = type(sys)("msn.eval.humaneval")
    fake_mod.evaluate_humaneval = fake
    fake_mod.check_batching = lambda method, batch_size: None
    monkeypatch.setitem(sys.modules, "msn.eval.humaneval", fake_mod)
    monkeypatch.setattr(pkg, "humaneval", fake_mod, raising=False)
    out = tmp_path / "h.json"
    argv = ["eval", "--model", str(tiny_dir), "--task", "humaneval", "--method", "tr-jacobi", "--limit", "2"]
    assert main([*argv, "--max-new-tokens", "64", "--out", str(out)]) == 0
    assert calls == {"method": "tr-jacobi", "limit": 2, "max_new_tokens": 64, "batch_size": 1}  # one at a time
    assert json.loads(out.read_text())["pass@1"] == 0.5


def test_eval_out_never_replaces_a_file_eval_did_not_write(tiny_dir, data_file, tmp_path, capsys):
    precious = tmp_path / "precious.jsonl"
    precious.write_bytes(data_file.read_bytes())
    argv = ["eval", "--model", str(tiny_dir), "--task", "heldout-loss", "--data", str(data_file), "--limit", "1"]
    assert main([*argv, "--out", str(precious)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "precious.jsonl: exists and was not written by msn eval" in err and "choose another --out" in err, err
    assert precious.read_bytes() == data_file.read_bytes(), "the user's file is untouched"
    ours = tmp_path / "r.json"
    assert main([*argv, "--out", str(ours)]) == 0
    assert main([*argv[:-1], "2", "--out", str(ours)]) == 0  # its own result: replaced
    assert json.loads(ours.read_text())["samples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.jsonl", "r.json"], "temp file left behind"


def test_heldout_split_of_a_small_file_is_the_record_train_held_out(tiny_dir, tmp_path, capsys):
    """For a file whose hash split holds out nothing, msn train sets its last record aside: eval scores that."""
    from helpers import counting_rows, write_jsonl

    rows = counting_rows(5, 10)
    small, last = write_jsonl(tmp_path / "small.jsonl", rows), write_jsonl(tmp_path / "last.jsonl", rows[-1:])

    def loss(data, split):
        out = tmp_path / f"{data.stem}-{split}.json"
        argv = ["eval", "--model", str(tiny_dir), "--task", "heldout-loss", "--data", str(data), "--split", split]
        assert main([*argv, "--max-length", "128", "--out", str(out)]) == 0, capsys.readouterr().err
        return json.loads(out.read_text())

    held = loss(small, "heldout")
    assert held["samples"] == 1 and held["loss"] == loss(last, "all")["loss"]


@pytest.mark.parametrize("n, message", [
    (0, "holds no records"),  # not "0 dropped: no assistant token within max_length"
    (1, "the heldout split is empty: msn train holds out nothing from a file with fewer than 2"),
])
def test_an_empty_split_is_called_empty_not_blamed_on_max_length(n, message, tiny_dir, tmp_path, capsys):
    from helpers import counting_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", counting_rows(n, 10))
    argv = ["eval", "--model", str(tiny_dir), "--task", "heldout-loss", "--data", str(data), "--split", "heldout"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and "max_length" not in err, err


@pytest.mark.parametrize("task, extra, flag", [
    ("humaneval", ["--data", "train.jsonl"], "--data"),
    ("humaneval", ["--split", "all"], "--split"),
    ("humaneval", ["--max-length", "64"], "--max-length"),
    ("humaneval", ["--seed", "0"], "--seed"),
    ("denoise", ["--method", "foo"], "--method"),
    ("heldout-loss", ["--max-new-tokens", "8"], "--max-new-tokens"),
    ("heldout-loss", ["--noise-length", "4"], "--noise-length"),  # even at its default value
    ("agreement", ["--max-length", "64"], "--max-length"),
])
def test_a_flag_the_task_does_not_use_is_refused_not_ignored(task, extra, flag, tiny_dir, data_file, monkeypatch,
                                                             capsys):
    fake = type(sys)("msn.eval.humaneval")  # were the flag ignored, HumanEval would "run" here, not for real
    fake.evaluate_humaneval = lambda *a, **k: {"pass@1": 0.0}
    fake.check_batching = lambda method, batch_size: None
    monkeypatch.setitem(sys.modules, "msn.eval.humaneval", fake)
    data = [] if task == "humaneval" or "--data" in extra else ["--data", str(data_file)]
    rc = main(["eval", "--model", str(tiny_dir), "--task", task, *data, "--limit", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and f"{flag} is not used by --task {task}" in err, err


def test_eval_out_owns_a_file_by_its_marker_and_writes_through_a_symlink(tiny_dir, data_file, tmp_path, capsys):
    """Issue 36 item 5: a user's JSON that merely has "task" and "model" keys is not ours; a symlinked --out
    keeps its link (the target is written, readable like any other file: 0644 under umask 022)."""
    import os

    argv = ["eval", "--model", str(tiny_dir), "--task", "heldout-loss", "--data", str(data_file), "--limit", "1"]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"task": "denoise", "model": "my-notes", "notes": "keep me"}))
    before = mine.read_bytes()
    assert main([*argv, "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mine.json: exists and was not written by msn eval" in err[0], err
    assert mine.read_bytes() == before
    target = tmp_path / "results" / "r.json"
    link = tmp_path / "latest.json"
    target.parent.mkdir()
    link.symlink_to(target)
    old = os.umask(0o022)
    try:
        assert main([*argv, "--out", str(link)]) == 0  # a dangling link: its target is created
        assert main([*argv, "--out", str(link)]) == 0  # and then replaced, as eval's own
    finally:
        os.umask(old)
    assert link.is_symlink() and os.readlink(link) == str(target)
    result = json.loads(target.read_text())
    assert result["msn_output"] == "eval" and result["samples"] == 1
    assert target.stat().st_mode & 0o777 == 0o644
    assert "msn_output" not in capsys.readouterr().out  # the marker is not a result to print
