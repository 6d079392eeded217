"""``msn serve``: load one model the way ``msn generate`` does and serve it over OpenAI's HTTP API.

Binds 127.0.0.1 unless ``--host`` says otherwise: a model server on every interface is a choice to make
explicitly (with ``--api-key``). Ctrl-C or SIGTERM stops accepting connections, lets the running and
queued requests finish (at most ``--drain-timeout`` seconds, then they are cancelled) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys

from msn.decoding.tree import METHODS, TREE_HELP
from msn.errors import InputError, MsnError
from msn.flags import add_quantize_argument
from msn.serve.worker import DEFAULT_MAX_BATCH, MAX_BATCH_LIMIT

log = logging.getLogger("msn.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from msn.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="preset, local folder or hub id (default: %(default)s)")
    p.add_argument("--served-name", default=None,
                   help="the model id clients send and GET /v1/models lists (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: %(default)s, this machine only; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="verify through a static KV cache and a torch.compile-d forward (compiles at start-up, "
                        "~30 s per tree size; default: on for a CUDA device, where it is several times faster, off "
                        "on a CPU, where it is not)")
    p.add_argument("--method", choices=METHODS, default="tr-jacobi",
                   help="decoding method (default: %(default)s; a request may override it: \"msn\": {\"method\": ...})")
    p.add_argument("--tree", default=None, help=TREE_HELP)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="default: bf16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add_quantize_argument(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); use 1 when the CPU is shared and busy")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="requests decoded together, one forward verifying all their trees per step (default: "
                        "%(default)s: the best aggregate tokens/s measured on a 2-core CPU, ~2x one-at-a-time at 8 clients, "
                        "docs/results.md §22; 1: one at a time)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait behind the running ones; more get 503 + Retry-After (default: 16)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="for requests without max_tokens, capped by the context (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (and for /health's details) (default: "
                        "$MSN_API_KEY, else no key; the variable keeps the key out of the process list)")
    p.add_argument("--max-body", default="2M",
                   help="largest request body, in bytes or with K/M/G (default: %(default)s); larger ones get 413")
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated host names served besides localhost and IP addresses, e.g. a proxy's "
                        "name ('*': any; others get 403, which stops DNS rebinding)")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated web origins (e.g. http://localhost:3000) whose pages may call the server, "
                        "with CORS ('*': any page; default: none, requests carrying an Origin get 403)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on Ctrl-C/SIGTERM, seconds to let requests finish before cancelling them (default: 30)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the 2-token warm-up generation (it measures t(n) for the auto tree before serving)")


def _check(args) -> None:
    """Every flag checked before the model loads (loading takes seconds; a typo should not)."""
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    from msn.flags import at_least

    at_least(args, {"threads": 1, "queue_size": 1, "default_max_tokens": 1})
    if not 1 <= args.max_batch <= MAX_BATCH_LIMIT:
        raise InputError(f"--max-batch must be in 1..{MAX_BATCH_LIMIT} (requests decoded together), got {args.max_batch}")
    if args.drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty")
    args.max_body = parse_size(args.max_body, "--max-body")
    args.allowed_hosts = _names(args.allowed_hosts)
    args.allowed_origins = _names(args.allowed_origins)
    bad = [o for o in args.allowed_origins if o != "*" and "://" not in o]
    if bad:
        raise InputError(f"--allowed-origins takes origins such as http://localhost:3000 (scheme://host[:port]), "
                         f"got {bad[0]!r}")


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_size(text: str, flag: str) -> int:
    """``2M`` -> 2097152: a byte count, optionally with K, M or G (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    if not number.isdigit() or int(number) < 1:
        raise InputError(f"{flag} must be a positive number of bytes, optionally with K, M or G (e.g. 2M), got "
                         f"{text!r}")
    return int(number) * units[unit]


def _check_bind(host: str, port: int) -> None:
    """Fail in a second, not after the model load, when the address is taken or not ours."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(infos[0][4])
    except OSError as e:
        raise MsnError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def run(args) -> int:
    import torch

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MsnError(f"msn serve needs {e.name}: pip install fastapi uvicorn") from None
    from msn.decoding.tree import resolve_tree
    from msn.flags import check_quantize_flag, pick_device
    from msn.models import load_model, parse_dtype
    from msn.serve.app import check_api_key, create_app

    _check(args)
    api_key = args.api_key if args.api_key is not None else (os.environ.get("MSN_API_KEY") or None)
    check_api_key(api_key, "--api-key" if args.api_key is not None else "MSN_API_KEY")
    _check_bind(args.host, args.port)
    device = pick_device(args.device)
    quantize = check_quantize_flag(args, device)
    tree = resolve_tree(args.tree, torch.device(device), parse_dtype(args.dtype))  # fails before loading
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=device, quantize=quantize)
    name = args.served_name or args.model
    app = create_app(model, tok, model_id=name, method=args.method, tree=tree, queue_size=args.queue_size,
                     max_batch=args.max_batch, api_key=api_key, default_max_tokens=args.default_max_tokens, compile=args.compile,
                     max_body=args.max_body, allowed_hosts=args.allowed_hosts,
                     allowed_origins=args.allowed_origins)
    if not args.no_warmup:  # on the worker's thread, where every request will run (Worker.start says why)
        worker = app.state.server.worker
        worker.start(lambda: _warm_up(model, tok, args.method, tree, args.compile))
        worker.wait_started()
    if not _loopback(args.host) and api_key is None:
        log.warning("msn serve: listening on %s without --api-key: anyone who can reach this port can use it",
                    args.host)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.drain_timeout)
    print(f"msn serve: {name} ({args.method}, tree {tree.name}, {args.dtype}, {device}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    if args.dtype != "fp32" and args.method != "ar":
        print(f"msn serve: {args.dtype}: temperature 0 gives greedy text that can differ between identical "
              "requests in a near-tie of the logits (the draft tree grows with what earlier requests taught it); "
              "--dtype fp32, or \"msn\": {\"method\": \"ar\"} in a request, makes it the same every time",
              file=sys.stderr, flush=True)
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler it found: make that a no-op,
    # so a graceful stop exits 0 instead of dying of the signal (or of KeyboardInterrupt) afterwards.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("msn serve: stopped", file=sys.stderr)
    return 0


def _warm_up(model, tokenizer, method: str, tree, compile: bool | None = None) -> None:
    """One short generation before the port opens, so the first request does not pay the one-time costs
    (the auto tree's t(n) measurement, lazy kernels) and /health answers only when requests are fast."""
    from msn.decoding.engine import generate
    from msn.prompting import encode_prompt, eos_ids

    ids = encode_prompt(tokenizer, "Hello").to(next(model.parameters()).device)
    generate(model, ids, max_new_tokens=2, method=method, tree=tree, eos_token_id=eos_ids(model, tokenizer),
             compile=compile)
