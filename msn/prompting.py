"""Prompts and stop tokens, one way for every caller (engine, bench, HumanEval, ``msn generate``, tune-tree,
the training data renderer).

Two callers that encode the same chat differently, or stop on different EOS ids, measure different things;
so there is exactly one encoder and one EOS rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

PLAIN_USER, PLAIN_ASSISTANT = "User:", "Assistant:"  # the chat format of models without a template


def eos_ids(model=None, tokenizer=None, override: int | Iterable[int] | torch.Tensor | None = None) -> list[int]:
    """Stop ids: ``override`` when given; else every EOS the model's generation config or the tokenizer
    names (a chat model may end a turn with either, e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    sources = [override] if override is not None else [
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ]
    ids: set[int] = set()
    for value in sources:
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        ids.update(int(v) for v in (value if isinstance(value, list | tuple | set) else [value]))
    return sorted(ids)


def plain_chat(messages: Sequence[dict[str, str]], eos: str = "", generation_prompt: bool = True) -> str:
    """The chat format of models without a template: "User: text", "Assistant: text<eos>", ... one turn per
    paragraph, then "Assistant:" when a reply is wanted. The reply starts with its own space, as the model
    writes it after "Assistant:", so training (which learns the assistant turns) and prompting agree."""
    roles = {"user": PLAIN_USER, "assistant": PLAIN_ASSISTANT}
    out = []
    for m in messages:
        role = roles.get(m["role"], m["role"].capitalize() + ":")
        end = eos if m["role"] == "assistant" else ""  # a finished reply ends as the model must learn to end it
        out.append(f"{role} {m['content']}{end}\n\n")
    return "".join(out) + (PLAIN_ASSISTANT if generation_prompt else "")


def chat_text(tokenizer, messages: Sequence[dict[str, str]], generation_prompt: bool = True) -> str:
    """The text of ``messages``: the model's own chat template, or :func:`plain_chat` without one.
    ``generation_prompt``: end with what opens the assistant's reply (a prompt); without it, a finished
    conversation (training data)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    return plain_chat(messages, getattr(tokenizer, "eos_token", None) or "", generation_prompt)


def encode_text(tokenizer, text: str, special_tokens: bool = False) -> torch.Tensor:
    """Ids [1, L]. A rendered chat template already holds its special tokens: add none (the default)."""
    return tokenizer(text, add_special_tokens=special_tokens, return_tensors="pt")["input_ids"]


def encode_chat(tokenizer, messages: Sequence[dict[str, str]]) -> torch.Tensor:
    """Prompt ids [1, L] for a chat, as every msn command sends it."""
    return encode_text(tokenizer, chat_text(tokenizer, messages))


def encode_prompt(tokenizer, text: str, raw: bool = False) -> torch.Tensor:
    """One user message as a chat (when the tokenizer has a template), or the text as is when ``raw``."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return encode_text(tokenizer, text, special_tokens=True)
    return encode_chat(tokenizer, [{"role": "user", "content": text}])
