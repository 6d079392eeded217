"""A model folder that cannot be used (no tokenizer, a corrupt weights file, a broken tokenizer file) is one line
naming the folder or file and the fix, in every command; and ``msn distill --out`` makes its missing folder."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import write_jsonl

from msn.cli import main
from msn.errors import MsnError
from msn.models import load_model


def one_line(argv, capsys) -> tuple[int, str]:
    """The command's exit code and its error line: the last of stderr (bench says what it loads first)."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("error:") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith(f"msn {argv[0]}: error: "), err
    return rc, last


def copy_model(tiny_dir, tmp_path, name="m"):
    return shutil.copytree(tiny_dir, tmp_path / name)


def commands(model, tmp_path, data_file) -> dict[str, list[str]]:
    """Each command that loads ``model``, with the smallest useful flags."""
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "a", "turns": ["Hi"]}])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    m = str(model)
    return {
        "generate": ["generate", "--model", m, "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "fp32"],
        "eval": ["eval", "--model", m, "--task", "denoise", "--data", str(data_file), "--limit", "1"],
        "train": ["train", "--model", m, "--data", str(data_file), "--output", str(tmp_path / "run"),
                  "--max-steps", "1", "--max-length", "64"],
        "bench": ["bench", "--model", m, "--questions", str(questions), "--out", str(tmp_path / "bench"),
                  "--methods", "ar", "--max-new-tokens", "2", "--dtype", "fp32"],
        "distill": ["distill", "--model", m, "--prompts", str(prompts), "--out", str(tmp_path / "d.jsonl"),
                    "--max-new-tokens", "2", "--dtype", "fp32", "--device", "cpu"],
    }


@pytest.mark.parametrize("command", ["generate", "eval", "train", "bench", "distill"])
def test_a_folder_without_tokenizer_is_one_line_in_every_command(command, tmp_path, tiny_dir, data_file, capsys):
    model = copy_model(tiny_dir, tmp_path)  # weights saved with model.save_pretrained only
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    rc, err = one_line(commands(model, tmp_path, data_file)[command], capsys)
    assert rc == 2
    assert (f"{model}: no tokenizer in this folder (tokenizer.json / tokenizer_config.json missing); save it beside "
            "the weights with tokenizer.save_pretrained(...)") in err, err
    assert "sentencepiece" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "d.jsonl").exists()


def test_a_folder_missing_only_its_vocabulary_says_which_file(tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path)
    (model / "tokenizer.json").unlink()
    with pytest.raises(MsnError, match=r"no tokenizer in this folder \(tokenizer\.json missing\)"):
        load_model(str(model))


@pytest.mark.parametrize("cut", ["header", "tail"])
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_a_corrupt_weights_file_is_one_line_naming_it(command, cut, tmp_path, tiny_dir, data_file, capsys):
    model = copy_model(tiny_dir, tmp_path)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # an interrupted copy: cut in the header, or short of the last tensor
        f.truncate(1000 if cut == "header" else size - 100)
    rc, err = one_line(commands(model, tmp_path, data_file)[command], capsys)
    assert rc == 2 and f"{weights}: the weights file is corrupt or incomplete" in err and "re-copy or re-save" in err
    assert not (tmp_path / "run").exists()


def test_broken_tokenizer_files_are_named(tmp_path, tiny_dir):
    bad_json = copy_model(tiny_dir, tmp_path, "bad_json")
    (bad_json / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(MsnError, match=r"tokenizer_config\.json: not valid JSON .*tokenizer\.save_pretrained"):
        load_model(str(bad_json))
    wrong_shape = copy_model(tiny_dir, tmp_path, "wrong_shape")
    (wrong_shape / "tokenizer.json").write_text("{}")  # valid JSON, not a tokenizer: transformers' KeyError
    with pytest.raises(MsnError, match=f"^{wrong_shape}: cannot load the tokenizer: ") as e:
        load_model(str(wrong_shape))
    assert "\n" not in str(e.value)


def test_a_programming_error_while_loading_is_not_hidden(tmp_path, tiny_dir, monkeypatch):
    def broken(*a, **kw):
        raise TypeError("a bug, not a bad folder")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", broken)
    with pytest.raises(TypeError, match="a bug"):
        load_model(str(tiny_dir))


def test_distill_creates_the_missing_folder_of_out_and_removes_it_when_the_run_fails(tmp_path, tiny_dir,
                                                                                     data_file, capsys):
    argv = commands(tiny_dir, tmp_path, data_file)["distill"]
    out = tmp_path / "new" / "sub" / "out.jsonl"
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0, capsys.readouterr().err
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["Hi"]

    no_tok = copy_model(tiny_dir, tmp_path, "no_tok")
    (no_tok / "tokenizer.json").unlink()
    argv[argv.index("--model") + 1] = str(no_tok)
    argv[argv.index("--out") + 1] = str(tmp_path / "other" / "deeper" / "out.jsonl")
    rc, err = one_line(argv, capsys)
    assert rc == 2 and "no tokenizer" in err
    assert not (tmp_path / "other").exists(), "a failed run leaves no folder behind"
