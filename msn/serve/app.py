"""The FastAPI app for one already-loaded model (tests pass tiny random models; ``msn serve`` a real one).

Requests are checked and encoded here, before they take a queue slot and before any response header is
sent; only checked work reaches the worker thread. What a request costs before it is refused is bounded: the
body is read up to ``max_body`` bytes (413 past it), a prompt whose characters alone exceed the context is
refused before it is tokenized, and tokenizing runs on a thread with the app's own copy of the tokenizer, so
neither the event loop (``/health``, other clients) nor the running request's detokenizing waits for it.
Who may send requests at all is :mod:`msn.serve.guard`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import secrets
import threading

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from msn.decoding.request import context_limit, parse_request
from msn.decoding.tree import METHODS, TREE_PRESETS, Tree, resolve_tree
from msn.errors import MsnError
from msn.prompting import encode_chat, encode_text, eos_ids
from msn.serve import protocol as p
from msn.serve.guard import Guard
from msn.serve.worker import (
    DEFAULT_MAX_BATCH,
    Delta,
    Failed,
    Finished,
    Job,
    QueueFull,
    Worker,
    check_max_batch,
)

log = logging.getLogger("msn.serve")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_MAX_BODY = 2 << 20  # bytes: a full 32k-token context as JSON-escaped text fits several times over


def check_api_key(api_key: str | None, name: str = "the API key") -> None:
    """A key no client can send would lock every client out without a word: HTTP trims the spaces around a
    header value, and a header carries printable ASCII only."""
    if api_key is None:
        return
    if not api_key.strip():
        raise MsnError(f"{name} is empty")
    if api_key != api_key.strip():
        raise MsnError(f"{name} has spaces or a line break around it, which no client can send (HTTP trims "
                       "them from the header): remove them")
    if not all(33 <= ord(c) <= 126 for c in api_key):
        raise MsnError(f"{name} holds characters an HTTP header cannot carry (spaces inside, non-ASCII or control "
                       "characters): use printable ASCII only")


def batch_size(model, max_batch: int, compile: bool | None) -> tuple[int, bool]:
    """(requests decoded together, whether through :class:`msn.decoding.batch.Batch`): ``max_batch`` and yes, or
    1 through :func:`msn.generate` (said once) where requests cannot share a forward: a compiled forward (its
    static cache holds one request) or a model whose layers slide a window."""
    from msn.decoding.batch import batch_unsupported
    from msn.decoding.static_kv import resolve_compile

    why = "the compiled forward serves one request" if resolve_compile(model, compile) else batch_unsupported(model)
    if why is None:
        return max_batch, True
    if max_batch > 1:
        log.warning("msn serve: requests run one at a time (max batch %d asked): %s", max_batch, why)
    return 1, False


def create_app(model, tokenizer, *, model_id: str, method: str = "tr-jacobi", tree: Tree | str | None = None,
               queue_size: int = 16, max_batch: int = DEFAULT_MAX_BATCH, api_key: str | None = None,
               default_max_tokens: int = 512,
               compile: bool | None = None, max_body: int = DEFAULT_MAX_BODY, allowed_hosts: tuple[str, ...] = (),
               allowed_origins: tuple[str, ...] = ()) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` as ``model_id``. ``method``/``tree``: the default decoding
    (a request may override both through its ``msn`` field); ``default_max_tokens``: for requests that give
    no max_tokens (capped by the context); ``compile``: verify through the compiled path (every request; None:
    on a CUDA device only); ``max_batch``: requests decoded together (one at a time where the model cannot
    share a forward, or compiled); ``max_body``: the largest request body in bytes; ``allowed_hosts`` /
    ``allowed_origins``: names and web origins served besides localhost and IP addresses (see
    :mod:`msn.serve.guard`; ``"*"``: any)."""
    if method not in METHODS:
        raise MsnError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_api_key(api_key)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
        raise MsnError(f"max_body must be a positive number of bytes, got {max_body!r}")
    device = next(model.parameters()).device
    max_batch, batched = batch_size(model, check_max_batch(max_batch), compile)
    worker = Worker(model, tokenizer, eos_ids(model, tokenizer), queue_size, max_batch, batched)
    server = _Server(model, tokenizer, model_id, method, resolve_tree(tree, device, model.dtype), device,
                     default_max_tokens, worker, compile)
    server.max_body = max_body

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.worker.close)

    # No trailing-slash redirects: starlette builds their Location from the client's Host header.
    app = FastAPI(title="msn serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.server = server
    app.add_middleware(Guard, allowed_hosts=tuple(allowed_hosts), allowed_origins=tuple(allowed_origins))
    _add_error_handlers(app)

    def key_given(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), (api_key or "").encode())

    def authorize(request: Request) -> None:
        if api_key is not None and not key_given(request):
            raise p.ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [p.model_card(model_id, server.created)]}

    @v1.get("/models/{name:path}")
    async def one_model(name: str) -> dict:
        server.check_model(name)
        return p.model_card(model_id, server.created)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.complete(request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await server.complete(request, chat=False)

    app.include_router(v1)

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Liveness for anyone; the model and the counters only with the key, when there is one."""
        if api_key is not None and not key_given(request):
            return {"status": "ok"}
        return {"status": "ok", "model": model_id, **server.worker.stats()}

    return app


class _Server:
    """What the routes share: the model, its defaults, the worker."""

    def __init__(self, model, tokenizer, model_id: str, method: str, tree: Tree, device, default_max_tokens: int,
                 worker: Worker, compile: bool | None = None):
        from msn.decoding.static_kv import resolve_compile

        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.compile = resolve_compile(model, compile)
        self.method, self.tree, self.device = method, tree, device
        self.default_max_tokens, self.worker = default_max_tokens, worker
        self.limit = context_limit(model.config)
        self.created = p.now()
        self.max_body = DEFAULT_MAX_BODY
        # Prompts are encoded on a thread with a copy of the tokenizer: a fast tokenizer may not be used from two
        # threads at once, and the worker's copy decodes the running request meanwhile.
        self.encoder = _own_copy(tokenizer)
        self.encoder_lock = threading.Lock() if self.encoder is not tokenizer else worker.tokenizer_lock
        self.token_chars = longest_token(tokenizer)

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise p.ApiError(404, f"The model {name!r} does not exist: this server serves {self.model_id!r}",
                             "model", "model_not_found")

    async def complete(self, request: Request, chat: bool) -> Response:
        body = await _json_body(request, self.max_body)
        req = p.parse_body(body, chat, METHODS, tuple(TREE_PRESETS))
        self.check_model(req.model)
        self.check_length(req)
        job_ids, settings = await asyncio.to_thread(self.prepare, req)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:  # called on the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(job_ids, settings, req.stop, emit)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise p.ApiError(503, f"The server is busy ({self.worker.queue_size} requests waiting); retry later",
                             code="queue_full", kind="server_error",
                             headers={"Retry-After": str(e.retry_after)}) from None
        rid, created = p.new_id(chat), p.now()
        if req.stream:
            return _JobStream(_sse(req, rid, created, events), self.worker, job)
        try:
            return await _collect(request, req, rid, created, events)
        finally:
            self.worker.cancel(job)

    def check_length(self, req: p.CompletionRequest) -> None:
        """Refuse, before tokenizing, a prompt with more characters than the context's tokens can hold (no
        token of this vocabulary spans more than ``token_chars`` characters)."""
        if self.limit is None or self.token_chars is None:
            return
        chars = sum(len(m["content"]) for m in req.messages) if req.chat else len(req.prompt)
        if chars > self.limit * self.token_chars:
            raise p.bad(f"the prompt is {chars} characters, more than this model's context of {self.limit} tokens "
                        f"can hold (no token is longer than {self.token_chars} characters); shorten it",
                        "messages" if req.chat else "prompt", "context_length_exceeded")

    def prepare(self, req: p.CompletionRequest):
        """Prompt ids and :func:`msn.generate` keywords, checked the way the engine checks them (runs on a
        thread: tokenizing a long prompt takes a while)."""
        param = "messages" if req.chat else "prompt"
        with self.encoder_lock:
            if req.chat:
                try:
                    ids = encode_chat(self.encoder, req.messages)
                except MsnError as e:
                    raise p.bad(str(e), param) from None
                except Exception as e:  # a chat template may refuse a conversation (e.g. roles must alternate)
                    raise p.bad(f"the model's chat template refused these messages: {e}", param) from None
            else:
                ids = encode_text(self.encoder, req.prompt, special_tokens=True)
        n = int(ids.shape[1])
        if n == 0:
            raise p.bad("the prompt encodes to no tokens", param)
        if self.limit is not None and n >= self.limit:
            raise p.bad(f"the prompt is {n} tokens: this model's context is {self.limit} tokens", param,
                        "context_length_exceeded")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, self.limit - n) if self.limit else self.default_max_tokens
        elif self.limit is not None and n + max_tokens > self.limit:
            raise p.bad(f"max_tokens ({max_tokens}) + the prompt ({n} tokens) = {n + max_tokens} exceeds this "
                        f"model's context of {self.limit} tokens", "max_tokens", "context_length_exceeded")
        tree = self.tree if req.tree is None else resolve_tree(req.tree, self.device, self.model.dtype)
        method = req.method or self.method
        if method == "ar" and req.tree is not None:
            raise p.bad(f"msn.tree {req.tree!r} has no effect with method 'ar' (it drafts nothing); drop msn.tree "
                        "or choose a drafting method", "msn.tree")
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        sampling = req.sampling()
        try:
            parse_request(self.model, ids, max_tokens, method, tree, self.worker.eos, None, None, sampling, seed)
        except MsnError as e:
            raise p.bad(str(e)) from None
        return ids.to(self.device), {"max_new_tokens": max_tokens, "method": method, "tree": tree, "seed": seed,
                                     "compile": self.compile, **sampling}


class _JobStream(StreamingResponse):
    """A streamed response that cancels its job however it ends (done, client gone, server stopping),
    also when the client leaves before the first chunk."""

    def __init__(self, content, worker: Worker, job: Job):
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)
        self.worker, self.job = worker, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.worker.cancel(self.job)


def _sse_line(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(req: p.CompletionRequest, rid: str, created: int, events: asyncio.Queue):
    if req.chat:
        yield _sse_line(p.chunk(req, rid, created, first=True))
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            yield _sse_line(p.chunk(req, rid, created, text=event.text))
        elif isinstance(event, Finished):
            yield _sse_line(p.chunk(req, rid, created, finish_reason=event.result.finish_reason))
            if req.include_usage:
                yield _sse_line(p.chunk(req, rid, created, result=event.result))
            break
        else:  # Failed: the status line is long gone, so the error travels in the stream
            yield _sse_line(p.error_body(event.message, "server_error" if event.status >= 500 else
                                         "invalid_request_error"))
            break
    yield _sse_line("[DONE]")


async def _collect(request: Request, req: p.CompletionRequest, rid: str, created: int,
                   events: asyncio.Queue) -> Response:
    """Wait for the job's end, or for the client to leave (then the job is cancelled by the caller)."""

    async def finished():
        while True:
            event = await events.get()
            if not isinstance(event, Delta):
                return event

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done_task, gone_task = asyncio.ensure_future(finished()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_task.cancel()
        if not done_task.done():
            done_task.cancel()
    if not done_task.done() or done_task.cancelled():
        return Response(status_code=499)  # nobody is listening
    event = done_task.result()
    if isinstance(event, Failed):
        raise p.ApiError(event.status, event.message, kind="server_error" if event.status >= 500 else
                         "invalid_request_error")
    assert isinstance(event, Finished)
    return JSONResponse(p.response(req, rid, created, event.result))


def _own_copy(tokenizer):
    """A private copy of ``tokenizer`` for encoding (the tokenizer itself when it cannot be copied)."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - any tokenizer that cannot be copied is shared under the worker's lock
        return tokenizer


def longest_token(tokenizer) -> int | None:
    """The most characters any token of the vocabulary stands for (None: unknown). A byte-level token's string
    has one character per byte, so it also bounds the characters of text."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return None
    try:
        return max((len(t) for t in get_vocab()), default=None)
    except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary: no length check
        return None


class _ClientGone(Exception):
    """The client closed its connection before it had sent its whole body."""


def _is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


async def _json_body(request: Request, max_body: int = DEFAULT_MAX_BODY):
    """The decoded body. Refused: another content type than JSON (415: a web page can send text/plain without
    asking the browser first), more than ``max_body`` bytes (413, counted as it arrives, whatever the
    Content-Length says), not JSON or nested past Python's recursion limit (400: the client's fault, not a 500)."""
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise p.ApiError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                              f"{content_type or 'none'!r})", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise _too_large(max_body)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise _too_large(max_body)
            chunks.append(chunk)
    except ClientDisconnect:
        raise _ClientGone from None
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise p.bad(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise p.bad("the request body is nested too deeply to parse; send a flatter JSON object") from None


def _too_large(max_body: int) -> p.ApiError:
    return p.ApiError(413, f"the request body is larger than this server's limit of {max_body} bytes; send a "
                           "shorter prompt (or start msn serve with a larger --max-body)", code="request_too_large")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape: ours, FastAPI's validation, routing (404/405), and crashes."""

    async def api_error(request: Request, exc: p.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: like any other disconnect, no traceback

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(p.error_body(first.get("msg", "invalid request"), param=param), status_code=400)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        slash = " (drop the trailing slash)" if request.url.path.endswith("/") and request.url.path != "/" else ""
        message = {404: f"no route {request.method} {request.url.path}{slash}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                        str(exc.detail))
        return JSONResponse(p.error_body(message, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=exc)
        return JSONResponse(p.error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    app.add_exception_handler(p.ApiError, api_error)
    app.add_exception_handler(_ClientGone, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)
