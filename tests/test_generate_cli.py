"""``msn generate``: chat template by default (``--raw`` to opt out), ``--threads``, bench's defaults, and
one-line errors for bad input before any model loads."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from fakes import ByteChatTokenizer

import msn.decoding.engine as engine
import msn.models
from msn.cli import main

PROMPT = "What is the capital of France?"


class PlainTokenizer(ByteChatTokenizer):
    chat_template = None


@pytest.fixture
def calls(monkeypatch):
    """Stand-in loader (records its arguments) and a spy on the engine's generate (records the prompt ids
    and settings it got), for a tiny random model."""
    seen: dict = {"load": [], "generate": []}
    model = tiny_model("llama")
    tokenizers = {"chat": ByteChatTokenizer(), "plain": PlainTokenizer()}

    def load_model(name, dtype=None, device=None, quantize="none"):
        seen["load"].append({"name": name, "dtype": dtype, "device": device, "quantize": quantize})
        return model, tokenizers[seen.get("tok", "chat")]

    real = engine.generate

    def spy(m, input_ids, **kw):
        seen["generate"].append({"ids": input_ids[0].tolist(), **kw})
        return real(m, input_ids, **kw)

    monkeypatch.setattr(msn.models, "load_model", load_model)
    monkeypatch.setattr(engine, "generate", spy)
    return seen


def run(*args):
    return main(["generate", "--prompt", PROMPT, "--max-new-tokens", "6", "--no-stream", *args])


def sent_text(calls) -> str:
    return ByteChatTokenizer().decode(calls["generate"][-1]["ids"])


def test_chat_template_is_the_default(calls):
    assert run() == 0
    assert sent_text(calls) == f"<user>{PROMPT}</user><assistant>"


def test_chat_flag_is_an_accepted_no_op(calls):
    assert run("--chat") == 0
    assert sent_text(calls) == f"<user>{PROMPT}</user><assistant>"


def test_raw_sends_the_text_as_is(calls):
    assert run("--raw") == 0
    assert sent_text(calls) == PROMPT


def test_no_template_sends_the_text_as_is(calls):
    calls["tok"] = "plain"
    assert run() == 0
    assert sent_text(calls) == PROMPT


def test_chat_flag_without_a_template_is_one_line_error(calls, capsys):
    calls["tok"] = "plain"
    assert run("--chat") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msn generate: error: ") and "no chat template" in err and "\n" not in err


def test_defaults_match_msn_bench(calls, capsys):
    from msn.bench.cli import add_arguments as bench_arguments
    from msn.decoding.tree import resolve_tree
    from msn.flags import pick_device
    from msn.models import parse_dtype

    assert run() == 0
    bench = __import__("argparse").ArgumentParser()
    bench_arguments(bench)
    defaults = bench.parse_args([])
    load = calls["load"][-1]
    assert load["dtype"] == defaults.dtype == "bf16"
    assert load["device"] == pick_device(defaults.device)
    tree = calls["generate"][-1]["tree"]
    assert tree == resolve_tree(defaults.tree, torch.device(load["device"]), parse_dtype(defaults.dtype))
    assert f"tree {tree.name} " in capsys.readouterr().err


def test_quantize_reaches_the_loader(calls):
    assert run() == 0 and calls["load"][-1]["quantize"] == "none"
    assert run("--quantize", "int4") == 0 and calls["load"][-1]["quantize"] == "int4"


def test_threads_sets_torch_threads(calls, capsys):
    torch.set_num_threads(2)
    assert run("--threads", "1") == 0
    assert torch.get_num_threads() == 1
    assert ", 1 threads" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (("--threads", "0"), "--threads must be >= 1, got 0"),
    (("--threads", "100000"), "--threads 100000 is more than the "),  # segfaulted in the thread pool
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1, got 0"),
    (("--tree", "no-such-tree"), "unknown tree 'no-such-tree'"),
])
def test_bad_input_is_one_line_before_loading(calls, capsys, args, message):
    assert main(["generate", "--prompt", PROMPT, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msn generate: error: ") and message in err and "\n" not in err
    assert calls["load"] == []


def test_raw_and_chat_together_are_refused(calls, capsys):
    assert run("--raw", "--chat") == 2
    err = capsys.readouterr().err.strip()
    assert "not allowed with argument" in err and "\n" not in err and calls["load"] == []


@pytest.mark.slow
def test_smollm2_answers_as_a_chat_model_without_flags(smollm2, monkeypatch, capsys):
    model, tok = smollm2
    sent = []
    real = engine.generate
    monkeypatch.setattr(msn.models, "load_model", lambda *a, **kw: (model, tok))
    monkeypatch.setattr(engine, "generate", lambda m, ids, **kw: sent.append(ids) or real(m, ids, **kw))
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "16", "--threads", "1"]) == 0
    prompt = tok.decode(sent[0][0])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    out = capsys.readouterr()
    assert "Paris" in out.out and "MAT" in out.err


def test_sampling_flags_sample_and_the_seed_decides(calls, capsys):
    assert run("--temperature", "0.9", "--top-k", "40", "--seed", "3") == 0
    got = calls["generate"][-1]
    assert got["do_sample"] is True and got["temperature"] == 0.9 and got["top_k"] == 40 and got["seed"] == 3
    first = capsys.readouterr()
    assert "sampled temperature=0.9, top_k=40, seed=3" in first.err
    assert run("--temperature", "0.9", "--top-k", "40", "--seed", "3") == 0
    assert capsys.readouterr().out == first.out, "same seed, same text"
    assert run("--temperature", "0.9", "--top-k", "40", "--seed", "4") == 0
    assert calls["generate"][-1]["seed"] == 4
    assert capsys.readouterr().out != first.out, "another seed, another sample"
    assert run() == 0
    assert "do_sample" not in calls["generate"][-1] and "greedy" in capsys.readouterr().err


def test_temperature_0_is_greedy_as_in_msn_serve(calls, capsys):
    assert run("--temperature", "0", "--seed", "5") == 0
    assert "do_sample" not in calls["generate"][-1] and "[tr-jacobi, greedy]" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (("--temperature", "0", "--top-k", "5"), "--temperature 0 means greedy decoding, which --top-k cannot change"),
    (("--temperature", "0", "--top-p", "0.9", "--min-p", "0.1"), "drop --top-p and --min-p, or give a temperature"),
    (("--temperature", "-1"), "--temperature must be > 0 to sample (or 0 for greedy decoding), got -1.0"),
    (("--temperature", "inf"), "--temperature must be > 0 to sample (or 0 for greedy decoding), got inf"),
    (("--top-p", "1.5"), "top_p must be in [0, 1]"),
    (("--top-k", "-2"), "top_k must be an integer >= 0"),
])
def test_bad_sampling_flags_are_one_line_before_loading(calls, capsys, flags, message):
    assert run(*flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and calls["load"] == []


def test_a_folder_given_as_prompt_file_is_named_a_folder(calls, capsys, tmp_path):
    assert main(["generate", "--file", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path}: is a folder, not a prompt file" in err and "\n" not in err and calls["load"] == []
