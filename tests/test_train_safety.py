"""Issue 13 items 2, 5, 6 and the training faults of 9: kill / rerun / overwrite / resume on real run folders."""

from __future__ import annotations

import errno
import json

import pytest
from helpers import Crash, fast, write_jsonl

from msn.errors import InputError, MsnError
from msn.training.train import RUN_FILE, last_checkpoint, train, validate


def crash_at(step):
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash

    return CrashAt()


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_keeps_foreign_files_and_the_old_model_until_the_new_one_is_published(tmp_path, tiny_dir, data_file):
    out = tmp_path / "run"
    train(fast(tiny_dir, data_file, out, max_steps=2, save_steps=1))
    (out / "notes.txt").write_text("my notes")
    (out / "eval-results.json").write_text("{}")
    old_model = (out / "model.safetensors").read_bytes()
    assert json.loads((out / "msn.json").read_text())["files"]  # the final model's files are recorded
    with pytest.raises(Crash):  # the new run dies before it has a model
        train(fast(tiny_dir, data_file, out, max_steps=3, save_steps=1, lr=2e-3, overwrite=True),
              callbacks=[crash_at(2)])
    assert (out / "model.safetensors").read_bytes() == old_model, "old final model deleted before a new one exists"
    assert json.loads((out / "msn.json").read_text())["steps"] == 2
    assert (out / "notes.txt").read_text() == "my notes" and (out / "eval-results.json").read_text() == "{}"
    assert not (out / "checkpoint-2").exists() or json.loads(
        (out / "checkpoint-2" / "trainer_state.json").read_text())["max_steps"] == 3  # old checkpoints are gone
    meta = train(fast(tiny_dir, data_file, out, max_steps=3, save_steps=1, lr=2e-3, overwrite=True))
    assert meta["steps"] == 3 and json.loads((out / "msn.json").read_text())["steps"] == 3
    assert (out / "model.safetensors").read_bytes() != old_model
    assert (out / "notes.txt").read_text() == "my notes" and (out / "eval-results.json").read_text() == "{}"


def test_resume_refuses_changed_settings_and_reports_the_whole_run_loss(tmp_path, tiny_dir, data_file):
    full = train(fast(tiny_dir, data_file, tmp_path / "full", max_steps=6, save_steps=3))
    out = tmp_path / "cut"
    with pytest.raises(Crash):
        train(fast(tiny_dir, data_file, out, max_steps=6, save_steps=3), callbacks=[crash_at(4)])
    assert last_checkpoint(out).name == "checkpoint-3"
    record = (out / RUN_FILE).read_bytes()
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text().replace("Count", "Add"))
    for changed, flag in ((dict(lr=2e-3), "--lr"), (dict(data=str(other)), "--data"), (dict(noise="uniform"), "--noise"),
                          (dict(noise_length=2), "--noise-length"), (dict(seed=1), "--seed")):
        with pytest.raises(InputError, match=f"{flag} .*the run has"):
            train(fast(tiny_dir, data_file, out, max_steps=6, save_steps=3, resume=True, **changed))
        assert (out / RUN_FILE).read_bytes() == record and not (out / "msn.json").exists()
    resumed = train(fast(tiny_dir, data_file, out, max_steps=6, save_steps=3, resume=True))
    assert resumed["steps"] == 6
    # the loss of the whole run, not of the 3 resumed steps
    assert resumed["metrics"]["train_loss"] == pytest.approx(full["metrics"]["train_loss"], abs=1e-4)
    run = json.loads((out / RUN_FILE).read_text())
    assert run["config"]["lr"] == 1e-3 and run["resumed"][0]["from"] == "checkpoint-3"
    # resuming the finished run trains nothing; its loss is still the whole run's, not 0.0
    again = train(fast(tiny_dir, data_file, out, max_steps=6, save_steps=3, resume=True))
    assert again["metrics"]["train_loss"] == pytest.approx(full["metrics"]["train_loss"], abs=1e-4)
    assert json.loads((out / "msn.json").read_text())["metrics"]["train_loss"] > 0


@pytest.mark.parametrize(("changed", "message"), [
    (dict(noise_length=10000), "--noise-length 10000 does not fit in --max-length 64"),
    (dict(noise_length=64), "--noise-length 64 does not fit"),
    (dict(lr=-1.0), "--lr must be a positive number"),
    (dict(lr=float("nan")), "--lr must be a positive number"),
    (dict(epochs=0.0, max_steps=-1), "--epochs must be a positive number"),
    (dict(warmup_steps=-5), "--warmup-steps must be >= 0"),
    (dict(max_steps=0), "--max-steps must be positive"),
    (dict(seed=-1), "--seed must be between 0 and 4294967295, got -1"),  # set_seed refused it after writing
    (dict(seed=2**32), "--seed must be between 0 and 4294967295, got 4294967296"),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, tiny_dir, data_file, changed, message):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=message):
        train(fast(tiny_dir, data_file, out, **changed))
    assert not out.exists()
    if "lr" in changed:  # the corrected rerun is not refused by a leftover msn-run.json
        assert train(fast(tiny_dir, data_file, out, max_steps=1))["steps"] == 1


def test_disk_full_during_final_save_keeps_checkpoints_and_resumes(tmp_path, tiny_dir, data_file, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "run"
    real = Trainer.save_model

    def full_disk(self, output_dir=None, *a, **kw):
        if output_dir and output_dir.endswith(".msn-final-tmp"):
            (tmp_path / "run" / ".msn-final-tmp").mkdir(exist_ok=True)
            (tmp_path / "run" / ".msn-final-tmp" / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, *a, **kw)

    monkeypatch.setattr(Trainer, "save_model", full_disk)
    with pytest.raises(MsnError, match="disk full.*--resume"):
        train(fast(tiny_dir, data_file, out, max_steps=2, save_steps=2))
    assert not (out / ".msn-final-tmp").exists() and not (out / "msn.json").exists()
    assert last_checkpoint(out).name == "checkpoint-2"
    monkeypatch.setattr(Trainer, "save_model", real)
    meta = train(fast(tiny_dir, data_file, out, max_steps=2, save_steps=2, resume=True))
    assert meta["steps"] == 2 and (out / "msn.json").is_file() and (out / "model.safetensors").is_file()


def test_the_largest_seed_is_accepted(tiny_dir, data_file, tmp_path):
    validate(fast(tiny_dir, data_file, tmp_path / "run", seed=2**32 - 1))


def test_a_folder_with_checkpoints_msn_did_not_write_is_never_cleared_or_resumed(tmp_path, tiny_dir, data_file):
    out = tmp_path / "hf-trainer-run"  # a plain HF Trainer output: checkpoints, no msn-run.json / msn.json
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "model.safetensors").write_text("my weights")
    (out / "checkpoint-500" / "trainer_state.json").write_text('{"global_step": 500}')
    (out / "README.md").write_text("notes")
    before = snapshot(out)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(InputError, match=r"holds checkpoints msn did not write \(checkpoint-500\); choose "
                                             "another --output") as e:
            train(fast(tiny_dir, data_file, out, **flags))
        assert "--overwrite" not in str(e.value) and "--resume" not in str(e.value), flags
        assert snapshot(out) == before, flags


def test_an_empty_data_file_says_so_and_only_length_drops_blame_max_length(tmp_path, tiny_dir, data_file):
    out = tmp_path / "run"
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        empty = tmp_path / name
        empty.write_text(text)
        with pytest.raises(InputError, match=f"^{empty}: no usable samples: the data file is empty") as e:
            train(fast(tiny_dir, empty, out))
        assert "max_length" not in str(e.value) and not out.exists()
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 200, "response": "y"}] * 3)
    with pytest.raises(InputError, match="all 3 records have no assistant token within max_length=64; raise "
                                         "--max-length"):
        train(fast(tiny_dir, long, out))
    assert not out.exists()
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Count from 1.", "response": "1 2 3"}])
    assert train(fast(tiny_dir, one, out, max_steps=1))["data"]["train_samples"] == 1  # a tiny file still trains


# -- issue 36 item 6: --overwrite deletes what the run family recorded, nothing by its name ---------------------
def test_a_checkpoint_named_folder_the_run_did_not_write_is_never_deleted(tmp_path, tiny_dir, data_file):
    out = tmp_path / "t1"
    train(fast(tiny_dir, data_file, out, max_steps=2, save_steps=1))
    assert json.loads((out / RUN_FILE).read_text())["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    (out / "checkpoint-77").mkdir()
    (out / "checkpoint-77" / "notes.md").write_text("my notes")
    before = snapshot(out)
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(InputError, match=r"holds checkpoint-77, which this run did not write .*move it out"):
            train(fast(tiny_dir, data_file, out, max_steps=2, save_steps=1, **flags))
        assert snapshot(out) == before, flags
    (out / "checkpoint-77" / "notes.md").rename(tmp_path / "notes.md")
    (out / "checkpoint-77").rmdir()
    meta = train(fast(tiny_dir, data_file, out, max_steps=1, save_steps=1, overwrite=True))
    assert meta["steps"] == 1 and not (out / "checkpoint-2").exists()  # the recorded ones were deleted
    assert json.loads((out / RUN_FILE).read_text())["checkpoints"] == ["checkpoint-1"]


def test_a_run_recorded_before_the_list_deletes_only_complete_checkpoints(tmp_path, tiny_dir, data_file):
    """Runs from before msn-run.json listed its checkpoints: the complete ones (trainer_state.json) are the run's;
    a user's folder named like one (no trainer_state.json) is refused, not deleted."""
    out = tmp_path / "old"
    train(fast(tiny_dir, data_file, out, max_steps=2, save_steps=1))
    record = json.loads((out / RUN_FILE).read_text())
    del record["checkpoints"]
    (out / RUN_FILE).write_text(json.dumps(record))
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "mine.txt").write_text("mine")
    with pytest.raises(InputError, match="holds checkpoint-9, which this run did not write"):
        train(fast(tiny_dir, data_file, out, max_steps=2, save_steps=1, overwrite=True))
    assert (out / "checkpoint-9" / "mine.txt").read_text() == "mine" and (out / "checkpoint-2").is_dir()
    (out / "checkpoint-9" / "mine.txt").unlink()
    (out / "checkpoint-9").rmdir()
    resumed = train(fast(tiny_dir, data_file, out, max_steps=3, save_steps=1, resume=True))
    assert resumed["steps"] == 3  # resumed from the legacy checkpoint-2, and the record now lists them all
    assert json.loads((out / RUN_FILE).read_text())["checkpoints"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_final_model_without_a_file_list_loses_no_file_by_its_name(tmp_path, tiny_dir, data_file):
    out = tmp_path / "run"
    train(fast(tiny_dir, data_file, out, max_steps=1, save_steps=1))
    meta = json.loads((out / "msn.json").read_text())
    del meta["files"]
    (out / "msn.json").write_text(json.dumps(meta))
    (out / "vocab.txt").write_text("the user's vocab notes")  # a name save_pretrained could write
    train(fast(tiny_dir, data_file, out, max_steps=1, save_steps=1, overwrite=True))
    assert (out / "vocab.txt").read_text() == "the user's vocab notes"


def test_ctrl_c_says_what_is_kept_on_a_line_of_its_own(tmp_path, tiny_dir, data_file, monkeypatch, capsys):
    """Issue 36 item 12: Ctrl-C used to end msn train with 130 and a word lost inside the progress bar."""
    from transformers import Trainer

    from msn.cli import main

    real = Trainer.training_step

    def interrupted(self, *a, **kw):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", interrupted)
    argv = ["train", "--model", str(tiny_dir), "--data", str(data_file), "--max-length", "64", "--eval-steps", "0",
            "--max-steps", "10", "--save-steps", "2", "--threads", "1"]
    assert main([*argv, "--output", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "\nmsn train: interrupted; checkpoint-2 is kept: rerun with --resume" in err, err[-500:]
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main([*argv, "--output", str(tmp_path / "fresh")]) == 130
    assert "interrupted; no checkpoint was saved yet: rerun to start again" in capsys.readouterr().err
