"""The OpenAI wire format: request bodies checked field by field, errors and responses in OpenAI's shapes.

Checked by hand rather than by a schema library so that every refusal names its field (``param``) in
OpenAI's error JSON, and so that an accepted field is never silently ignored: fields that would change the
output but that msn does not implement (``n`` > 1, penalties, logit_bias, tools, logprobs, ...) are refused
unless they hold their no-op value.

msn's own fields: ``top_k`` and ``min_p`` at the top level (as vLLM takes them), and ``"msn": {"method":
..., "tree": ...}`` to override the server's decoding method and tree for one request (tree: ``auto`` or a
preset name; files are for the server's ``--tree`` only).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msn.decoding.sampling import MIN_TEMPERATURE
from msn.serve.worker import Result

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # OpenAI's limit


class ApiError(Exception):
    """A refusal, rendered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class CompletionRequest:
    """A parsed ``/v1/chat/completions`` (``messages``) or ``/v1/completions`` (``prompt``) body."""

    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None  # None: the server's default, capped by the context
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    method: str | None = None  # None: the server's
    tree: str | None = None

    @property
    def chat(self) -> bool:
        return self.messages is not None

    def sampling(self) -> dict[str, Any]:
        """Keywords for :func:`msn.generate`: none (greedy) at temperature 0, else the given settings."""
        if self.temperature == 0:
            return {}
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None,
                 "min_p": self.min_p}
        return {"do_sample": True, **{k: v for k, v in given.items() if v is not None}}


def _is(value: Any, *neutral: Any) -> bool:
    """``value`` is one of ``neutral`` with the same type: in Python ``True == 1`` and ``0 == False``, so ``n:
    true`` or ``logprobs: 0`` would pass a plain ``in`` test."""
    return any(type(value) is type(x) and value == x for x in neutral)


# Fields we accept only at their no-op value (anything else would change the output in a way we don't do).
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: _is(v, None, 1),
    "presence_penalty": lambda v: _is(v, None, 0, 0.0),
    "frequency_penalty": lambda v: _is(v, None, 0, 0.0),
    "logit_bias": lambda v: _is(v, None, {}),
    "logprobs": lambda v: _is(v, None, False),
    "top_logprobs": lambda v: _is(v, None, 0),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: _is(v, None, []),
    "tool_choice": lambda v: _is(v, None, "none"),
    "functions": lambda v: _is(v, None, []),
    "best_of": lambda v: _is(v, None, 1),
    "echo": lambda v: _is(v, None, False),
    "suffix": lambda v: _is(v, None, ""),
    "user": lambda v: v is None or isinstance(v, str),  # an end-user id for abuse tracking: no effect here
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
           "stream_options", "msn", "n", "presence_penalty", "frequency_penalty", "logit_bias", "user"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
                   "tool_choice", "functions"}
_TEXT = _COMMON | {"prompt", "logprobs", "best_of", "echo", "suffix"}


def parse_body(body: Any, chat: bool, methods: tuple[str, ...], trees: tuple[str, ...]) -> CompletionRequest:
    """Check a decoded JSON body; raise :class:`ApiError` (400) naming the first field at fault."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    allowed = _CHAT if chat else _TEXT
    for key in body:
        if key not in allowed:
            raise bad(f"Unrecognized request argument supplied: {key}", key, "unrecognized_argument")
    for key, ok in _NEUTRAL.items():
        if key in body and not ok(body[key]):
            raise bad(f"{key}={body[key]!r} is not supported by this server (msn generates one plain-text "
                      "completion; drop the field or send its default)", key, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: a string naming the served model (see GET /v1/models)", "model")
    req = CompletionRequest(model=model)
    if chat:
        req.messages = _messages(body.get("messages"))
        if body.get("max_completion_tokens") is not None:
            req.max_tokens = _integer(body, "max_completion_tokens", 1)
    else:
        req.prompt = _prompt(body.get("prompt"))
    if body.get("max_tokens") is not None:
        max_tokens = _integer(body, "max_tokens", 1)  # checked also beside max_completion_tokens
        if req.max_tokens is not None and max_tokens != req.max_tokens:
            raise bad(f"max_tokens ({max_tokens}) and max_completion_tokens ({req.max_tokens}) differ; send one of "
                      "them", "max_tokens")
        req.max_tokens = max_tokens
    if body.get("temperature") is not None:
        req.temperature = _number(body, "temperature", 0.0, 2.0)
        if 0 < req.temperature < MIN_TEMPERATURE:
            raise bad(f"temperature {req.temperature!r} is below {MIN_TEMPERATURE:g}: that is greedy decoding (and "
                      f"far below, the logits / temperature overflow); send 0 for greedy decoding, or a temperature "
                      f">= {MIN_TEMPERATURE:g} to sample", "temperature")
    if body.get("top_p") is not None:
        req.top_p = _number(body, "top_p", 0.0, 1.0)
    if body.get("top_k") is not None:
        req.top_k = _integer(body, "top_k", 0)
    if body.get("min_p") is not None:
        req.min_p = _number(body, "min_p", 0.0, 1.0)
    if body.get("seed") is not None:
        req.seed = _integer(body, "seed", 0, 2**64 - 1)  # what msn.generate takes (torch.Generator)
    req.stop = _stops(body.get("stop"))
    req.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad('stream_options must be {"include_usage": true|false}', "stream_options")
        req.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
        if not req.stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")
    extra = body.get("msn")
    if extra is not None:
        if not isinstance(extra, dict):
            raise bad('msn must be an object, e.g. {"method": "ar", "tree": "auto"}', "msn")
        for key, value in extra.items():
            choices = {"method": methods, "tree": ("auto", *trees)}.get(key)
            if choices is None:
                raise bad(f"unknown msn field {key!r}: use method and/or tree", f"msn.{key}")
            if value not in choices:
                raise bad(f"msn.{key} must be one of {', '.join(choices)}, got {value!r}", f"msn.{key}")
        req.method, req.tree = extra.get("method"), extra.get("tree")
    return req


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _integer(body: dict, key: str, lo: int, hi: int | None = None) -> int:
    v = body[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key} must be an integer, got {_type_name(v)}", key)
    if v < lo or (hi is not None and v > hi):
        raise bad(f"{key} must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}", key)
    return v


def _number(body: dict, key: str, lo: float, hi: float) -> float:
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"{key} must be a number, got {_type_name(v)}", key)
    if isinstance(v, float) and not math.isfinite(v):  # JSON from Python's json.dumps may carry NaN / Infinity
        raise bad(f"{key} must be a finite number, got {v}", key)
    if not lo <= v <= hi:
        raise bad(f"{key} must be between {lo:g} and {hi:g}, got {v}", key)
    return float(v)


def _flag(body: dict, key: str, param: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{param or key} must be a boolean, got {_type_name(v)}", param or key)
    return v


def _stops(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad(f"stop takes at most {MAX_STOPS} non-empty strings", "stop")
    return stops


def _text(v: str, param: str) -> str:
    """Text the tokenizer can take: JSON may carry a lone surrogate (``"\\ud800"``), which no UTF-8 encodes."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{param} holds a lone UTF-16 surrogate ({v[e.start]!r} at character {e.start}), which is not "
                  "text; send valid Unicode (pairs of surrogates, or the characters themselves)", param) from None
    return v


def _content(v: Any, param: str) -> str:
    if isinstance(v, str):
        return _text(v, param)
    if isinstance(v, list):  # content parts: text only
        texts = []
        for i, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("only text content parts are supported ({\"type\": \"text\", \"text\": ...})",
                          f"{param}[{i}]")
            texts.append(_text(part["text"], f"{param}[{i}].text"))
        return "".join(texts)
    raise bad(f"content must be a string or an array of text parts, got {_type_name(v)}", param)


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list):
        raise bad(f"messages must be an array of messages, got {_type_name(v)}", "messages")
    if not v:
        raise bad("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where)
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise bad(f"{where}: unsupported field(s) {', '.join(sorted(unknown))}", f"{where}.{min(unknown)}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if "content" not in m:
            raise bad(f"{where}.content is required", f"{where}.content")
        if m.get("name") is not None:  # the chat template has no place for it: it would be dropped silently
            raise bad(f"{where}.name is not supported (this model's chat template has no participant names); drop "
                      "it, or write the name into the content", f"{where}.name")
        out.append({"role": ROLES[role], "content": _content(m["content"], f"{where}.content")})
    return out


def _prompt(v: Any) -> str:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if not isinstance(v, str):
        raise bad("prompt must be a string (one prompt per request)", "prompt")
    if not v:
        raise bad("prompt must not be empty", "prompt")
    return _text(v, "prompt")


# -- responses ---------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(result: Result) -> dict:
    """OpenAI's three counts, plus how msn decoded: steps, mean accepted tokens per step, tokens/s, and whether
    the text depends on the request alone (``reproducible``: fp32, or method ``ar``; see the worker's Result)."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "steps": result.steps,
        "mean_accepted_tokens": round(result.mean_accepted, 4),
        "tokens_per_second": round(result.tokens_per_second, 2),
        "method": result.method,
        "reproducible": result.reproducible,
    }


def response(req: CompletionRequest, rid: str, created: int, result: Result) -> dict:
    """The non-streaming response body."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [choice], "usage": usage(result)}


def chunk(req: CompletionRequest, rid: str, created: int, text: str | None = None,
          finish_reason: str | None = None, first: bool = False, result: Result | None = None) -> dict:
    """One streamed chunk: a text delta, the final chunk (``finish_reason``), or the usage-only chunk."""
    if result is not None:
        choices = []
    elif req.chat:
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
           "model": req.model, "choices": choices}
    if req.include_usage:
        out["usage"] = usage(result) if result is not None else None
    return out


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "msn"}


def now() -> int:
    return int(time.time())
