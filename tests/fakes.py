"""A byte-level stand-in tokenizer with a chat template, so bench code can be tested on tiny random models
without any tokenizer files (ids are character codes folded into the model's vocabulary); a streamer that ends
a generation after some steps."""

from __future__ import annotations

import torch


class ByteChatTokenizer:
    chat_template = "byte-chat"  # non-empty: the bench uses apply_chat_template

    def __init__(self, vocab_size: int = 128, eos_token_id: int = 2):
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str) -> list[int]:
        return [32 + (ord(c) - 32) % (self.vocab_size - 32) if ord(c) >= 32 else 32 for c in text]

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None):
        ids = self.encode(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        special = {self.eos_token_id} if skip_special_tokens else set()
        return "".join(chr(i) if i >= 32 else "" for i in ids if i not in special)


class Enough(Exception):
    """What :class:`StopAfter` raises."""


class StopAfter:
    """The engine's streamer protocol; raises :class:`Enough` at the ``steps``-th step's tokens (the first ``put``
    is the prompt): a client gone, a stop string found."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > self.steps:
            raise Enough

    def end(self) -> None:
        pass
