"""HumanEval: data loading, code extraction, sandboxed checking, and the evaluation loop end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model

from msn.errors import InputError
from msn.eval.humaneval import (
    build_prompt,
    check_completion,
    evaluate_humaneval,
    extract_code,
    load_problems,
    program,
    truncate_completion,
)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


def test_load_problems(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert set(problems[0]) >= {"task_id", "prompt", "entry_point", "canonical_solution", "test"}
    assert [p["task_id"] for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


@pytest.mark.parametrize("index", [0, 2, 13, 57, 163])
def test_canonical_solution_passes(problems, index):
    problem = problems[index]
    r = check_completion(problem, problem["canonical_solution"], timeout=10)
    assert r.passed and r.status == "passed", r.stderr


@pytest.mark.slow
def test_all_canonical_solutions_pass_under_the_guard(problems):
    """The guard must not break legitimate code: all 164 reference solutions pass (about 10-30 s)."""
    failed = [p["task_id"] for p in problems if not check_completion(p, p["canonical_solution"]).passed]
    assert failed == []


def test_wrong_body_fails(problems):
    r = check_completion(problems[0], "    return not True\n", timeout=10)
    assert not r.passed and r.status == "failed"
    assert "AssertionError" in r.stderr


def test_hanging_completion_times_out(problems):
    r = check_completion(problems[0], "    while True:\n        pass\n", timeout=1)
    assert r.status == "timeout"


def test_program_runs_check_on_entry_point(problems):
    text = program(problems[2], "    return number % 1.0\n")
    assert text.startswith(problems[2]["prompt"])
    assert text.rstrip().endswith("check(truncate_number)")


# ----------------------------------------------------------------------------- extraction


@pytest.fixture
def p2(problems):
    return problems[2]  # truncate_number(number: float) -> float


def _passes(problem, completion) -> bool:
    return check_completion(problem, completion, timeout=10).passed


def test_extract_fenced_full_function(p2):
    reply = (
        "Sure! Here is the function:\n\n```python\ndef truncate_number(number: float) -> float:\n"
        "    return number - int(number)\n```\n\nThis works because int() drops the fraction."
    )
    code = extract_code(reply, p2)
    assert code.startswith("def truncate_number") and "```" not in code and "This works" not in code
    assert _passes(p2, code)


def test_extract_prefers_block_with_entry_point(p2):
    reply = (
        "```\npip install nothing\n```\n```py\ndef truncate_number(number):\n    return number % 1.0\n```\n"
        "```python\nprint(truncate_number(3.5))\n```"
    )
    assert _passes(p2, extract_code(reply, p2))


def test_extract_unclosed_fence(p2):
    reply = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert _passes(p2, extract_code(reply, p2))


def test_extract_prefilled_prompt_continuation(p2):
    """A reply that repeats the prompt and continues the body, then closes the fence and chats."""
    text = "```python\n" + p2["prompt"] + "    return number % 1.0\n```\nDone."
    code = extract_code(text, p2)
    assert "Done." not in code
    assert _passes(p2, code)


def test_extract_bare_body_is_indented(p2):
    assert extract_code("return number % 1.0", p2) == "    return number % 1.0\n"
    assert _passes(p2, extract_code("return number % 1.0", p2))
    assert _passes(p2, extract_code("    return number % 1.0\n", p2))


def test_extract_unfenced_signature_with_prose(p2):
    reply = "Here you go:\nfrom math import floor\ndef truncate_number(number):\n    return number - floor(number)\n"
    code = extract_code(reply, p2)
    assert code.startswith("from math import floor")
    assert _passes(p2, code)


def test_truncate_base_completion(p2):
    body = "    return number % 1.0\n"
    assert truncate_completion(body + "\n\ndef another():\n    pass\n") == body + "\n"
    assert truncate_completion(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate_completion(body) == body


class _Chat:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "<user>" + messages[0]["content"] + "<assistant>"


def test_build_prompt(p2):
    assert build_prompt(p2, None, chat=False) == p2["prompt"]
    text = build_prompt(p2, _Chat(), chat=True)
    assert text.startswith("<user>Complete the following Python function")
    assert p2["prompt"] in text and text.endswith("<assistant>```python\n")


# ----------------------------------------------------------------------------- the evaluation loop


class ByteTokenizer:
    """Characters to ids modulo a tiny vocab: enough to drive a random tiny model through the loop."""

    chat_template = None
    eos_token_id = 2

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        ids = [1] * add_special_tokens + [3 + ord(c) % (TINY_VOCAB - 3) for c in text]
        return {"input_ids": torch.tensor([ids])}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids if not (skip_special_tokens and i < 3))


def _check_shape(res, n):
    assert res["n"] == n == len(res["results"])
    assert res["passed"] == sum(r["passed"] for r in res["results"])
    assert res["pass_at_1"] == pytest.approx(res["passed"] / n)
    assert res["tokens_per_s"] > 0 and res["method"] == "ar"
    for r in res["results"]:
        assert set(r) >= {"task_id", "passed", "status", "new_tokens", "wall_time"}
        assert r["status"] in {"passed", "failed", "timeout", "killed", "error"}
        assert r["status"] != "error"


def test_evaluate_tiny_model(problems):
    """Random weights: garbage code that must fail in the sandbox, with a complete, consistent report."""
    subset = [problems[0], problems[2]]
    res = evaluate_humaneval(tiny_model("llama"), ByteTokenizer(), method="ar", max_new_tokens=8,
                             timeout=5, progress=False, problems=subset)
    _check_shape(res, 2)
    assert [r["task_id"] for r in res["results"]] == ["HumanEval/0", "HumanEval/2"]
    assert res["passed"] == 0 and not res["chat"]
    assert all(0 < r["new_tokens"] <= 8 for r in res["results"])


def test_batched_evaluation_matches_one_at_a_time(problems):
    """Batched greedy (left-padded, one generate per batch) answers as one-at-a-time ar does in fp32, with the
    same counts; another decoder cannot be batched."""
    subset = [problems[0], problems[2], problems[5]]  # prompts of different lengths: padding is exercised
    model = tiny_model("llama")
    kw = dict(method="ar", max_new_tokens=8, timeout=5, progress=False, problems=subset)
    one, batched = (evaluate_humaneval(model, ByteTokenizer(), batch_size=b, **kw) for b in (1, 2))
    keep = ("task_id", "completion", "new_tokens", "passed")
    assert [{k: r[k] for k in keep} for r in batched["results"]] == [{k: r[k] for k in keep} for r in one["results"]]
    assert batched["batch_size"] == 2 and batched["new_tokens"] == one["new_tokens"]
    with pytest.raises(InputError, match="batched HumanEval"):
        evaluate_humaneval(model, ByteTokenizer(), method="tr-jacobi", batch_size=2, problems=subset)


@pytest.mark.slow
def test_evaluate_smollm2(smollm2):
    model, tokenizer = smollm2
    res = evaluate_humaneval(model, tokenizer, method="ar", limit=2, max_new_tokens=64, timeout=10, progress=False)
    _check_shape(res, 2)
    assert res["chat"] is True
    assert all(0 < r["new_tokens"] <= 64 for r in res["results"])
    assert all(r["completion"].strip() for r in res["results"])
