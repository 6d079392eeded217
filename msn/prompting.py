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
    """Prompt ids [1, L] for a chat, as every msn command sends it. Message content is text: a control token's
    string in it (``<|im_end|>`` typed into a message) is encoded as the characters it is, never as the token,
    so a message cannot close its turn and forge another (OpenAI's API encodes it so too)."""
    text = chat_text(tokenizer, messages)
    controls = control_strings(tokenizer)
    if not any(c in m["content"] for m in messages for c in controls):
        return encode_text(tokenizer, text)  # the common case: exactly the plain encoding
    return _encode_plain_contents(tokenizer, messages, text, controls)


def control_strings(tokenizer) -> list[str]:
    """The strings a tokenizer turns into special tokens (longest first, as it matches them)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return sorted((s for s in found if s), key=len, reverse=True)


def _encode_plain_contents(tokenizer, messages: Sequence[dict[str, str]], text: str,
                           controls: Sequence[str]) -> torch.Tensor:
    """Encode ``text`` (the rendered chat) with special tokens only where the template put them: the text
    is cut at the template's control strings (as a tokenizer cuts at every one) and each piece between them,
    message content included, is encoded with special-token matching off."""
    spans = _template_controls(tokenizer, messages, text, controls)
    ids: list[int] = []
    at = 0
    for start, end in [*spans, (len(text), len(text))]:
        if start > at:
            ids += tokenizer(text[at:start], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if end > start:
            ids.append(int(tokenizer.convert_tokens_to_ids(text[start:end])))
        at = end
    return torch.tensor([ids], dtype=torch.long)


def _template_controls(tokenizer, messages: Sequence[dict[str, str]], text: str,
                       controls: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) in ``text`` of every control string the template wrote (none from a message's content).

    The chat is rendered once more with a unique marker for each content; the template's own text is what
    lies between the markers. A template that changes content (other than trimming it) cannot be mapped so,
    and a control string in such content is refused rather than risked."""
    import secrets

    from msn.errors import MsnError

    tag = secrets.token_hex(8)
    markers = [f"MSNCONTENT{tag}N{i}E" for i in range(len(messages))]
    marked = chat_text(tokenizer, [{**m, "content": k} for m, k in zip(messages, markers, strict=True)])
    pieces, rest = [], marked
    for k in markers:
        before, found, rest = rest.partition(k)
        if not found or k in rest:
            pieces = None
            break
        pieces.append(before)
    if pieces is not None:
        pieces.append(rest)
        for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
            if "".join(p + c for p, c in zip(pieces, [*contents, ""], strict=True)) == text:
                spans, offset = [], 0
                for piece, content in zip(pieces, [*contents, ""], strict=True):
                    spans += [(offset + s, offset + e) for s, e in _find_controls(piece, controls)]
                    offset += len(piece) + len(content)
                return spans
    raise MsnError("a message contains a control token's text (e.g. "
                   f"{next(c for c in controls if any(c in m['content'] for m in messages))!r}) and this model's chat "
                   "template changes message text, so it cannot be encoded as plain text; remove it from the message")


def _find_controls(text: str, controls: Sequence[str]) -> list[tuple[int, int]]:
    """Non-overlapping occurrences of ``controls`` in ``text``, left to right, longest first at each place."""
    spans, i = [], 0
    while i < len(text):
        hit = next((c for c in controls if text.startswith(c, i)), None)
        if hit is None:
            i += 1
            continue
        spans.append((i, i + len(hit)))
        i += len(hit)
    return spans


def encode_prompt(tokenizer, text: str, raw: bool = False) -> torch.Tensor:
    """One user message as a chat (when the tokenizer has a template), or the text as is when ``raw``."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return encode_text(tokenizer, text, special_tokens=True)
    return encode_chat(tokenizer, [{"role": "user", "content": text}])
