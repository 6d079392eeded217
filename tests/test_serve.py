"""``msn serve``: text streaming, the app on a tiny random model (FastAPI's TestClient), and a real
``msn serve`` subprocess with SmolLM2-135M talked to by the official ``openai`` client (marked slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from fakes import ByteChatTokenizer, Enough, StopAfter

import msn
from msn.prompting import encode_chat, encode_text, eos_ids
from msn.serve.text import TextStream
from msn.serve.worker import Finished, Job, QueueFull, Worker

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from msn.serve.app import create_app  # noqa: E402

CHAT = [{"role": "user", "content": "hi there"}]


def assert_openai_error(response, status: int | None = None, param: str | None = None) -> dict:
    """A 4xx with OpenAI's error JSON (message, type, param, code)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- TextStream: incremental, UTF-8 safe, exact stop strings ------------------------------------------------
def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split():
    text = "héllo 世界 🙂!"
    stream = TextStream(byte_decode)
    deltas = [stream.push(b) for b in text.encode()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish() == text


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello world, bye", ["world"], "hello "),
        ("hello world, bye", [", b", "lo w"], "hel"),  # the earliest stop wins
        ("abcabd", ["abd"], "abc"),  # a held-back prefix that fails is released, the next one matches
        ("no stop here", ["stop!"], "no stop here"),  # a held-back "stop" is released at the end
        ("日本語テキスト", ["テキ"], "日本語"),  # stop strings on characters spanning several tokens
    ],
)
def test_stop_strings_are_cut_exactly_and_never_streamed(text, stops, expected):
    stream = TextStream(byte_decode, stops)
    sent = ""
    for b in text.encode():
        sent += stream.push(b)
        assert not any(s in sent for s in stops)  # never streamed past (or into) a stop string
        assert expected.startswith(sent)
    sent += stream.finish()
    assert sent == expected and stream.sent_text == expected
    assert stream.stopped == (expected != text)


# -- the engine's streamer may end a generation ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["ar", "tr-jacobi"])
def test_a_raising_streamer_stops_generate_and_leaves_the_model_usable(method):
    model = tiny_model("llama")
    ids = torch.tensor([[5, 9, 13, 5, 9, 13, 5, 9]])
    kw = dict(max_new_tokens=24, method=method, tree="cpu-fp32-8", eos_token_id=[])
    streamer = StopAfter(3)
    with pytest.raises(Enough):
        msn.generate(model, ids, streamer=streamer, **kw)
    assert streamer.calls == 4
    again = msn.generate(model, ids, **kw)
    assert torch.equal(again.sequences, msn.generate(model, ids, **{**kw, "method": "ar"}).sequences)


# -- the worker's queue ---------------------------------------------------------------------------------------
def test_queue_is_bounded_and_a_cancelled_job_frees_its_slot():
    worker = Worker(model=None, tokenizer=None, eos=[2], queue_size=2)  # not started: jobs stay queued
    jobs = [Job(torch.tensor([[1]]), {}, [], lambda e: None) for _ in range(3)]
    worker.submit(jobs[0])
    worker.submit(jobs[1])
    with pytest.raises(QueueFull) as e:
        worker.submit(jobs[2])
    assert e.value.retry_after >= 1
    worker.cancel(jobs[0])
    worker.submit(jobs[2])
    assert worker.stats()["waiting"] == 2


# -- the app on a tiny random model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), ByteChatTokenizer()


@pytest.fixture(scope="module")
def client(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_id="tiny", method="ar", api_key="sekret", default_max_tokens=12)
    with TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": "Bearer sekret"}) as c:
        yield c


def reference(tiny, chat: bool, max_new_tokens: int, **kw) -> tuple[str, int]:
    """msn.generate's text and token count for the standard test prompt."""
    model, tok = tiny
    ids = encode_chat(tok, CHAT) if chat else encode_text(tok, "hi there", special_tokens=True)
    out = msn.generate(model, ids, max_new_tokens=max_new_tokens, method="ar", eos_token_id=eos_ids(model, tok),
                       **kw)
    return tok.decode(out.sequences[0, ids.shape[1] :].tolist()), out.new_tokens


def body(chat: bool, **kw) -> dict:
    return {"model": "tiny", **({"messages": CHAT} if chat else {"prompt": "hi there"}), **kw}


def sse_events(response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def streamed_text(events: list, chat: bool) -> str:
    key = (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])
    return "".join(key(c) for e in events for c in e["choices"])


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_greedy_responses_equal_generate_streamed_or_not(client, tiny, chat):
    text, n = reference(tiny, chat, 10)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = client.post(path, json=body(chat, max_tokens=10, temperature=0))
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert (choice["message"]["content"] if chat else choice["text"]) == text
    assert out["object"] == ("chat.completion" if chat else "text_completion") and out["model"] == "tiny"
    usage = out["usage"]
    assert usage["completion_tokens"] == n and usage["total_tokens"] == usage["prompt_tokens"] + n
    assert usage["steps"] >= 1 and usage["mean_accepted_tokens"] >= 1 and usage["tokens_per_second"] > 0
    assert usage["method"] == "ar"
    with client.stream("POST", path, json=body(chat, max_tokens=10, temperature=0, stream=True,
                                               stream_options={"include_usage": True})) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s)
    assert streamed_text(events, chat) == text
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == n
    assert events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_default_max_tokens_and_per_request_method(client, tiny):
    text, _ = reference(tiny, True, 12)
    r = client.post("/v1/chat/completions", json=body(True, temperature=0, msn={"method": "retrieval",
                                                                                 "tree": "cpu-fp32-8"}))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == text  # lossless: any method, the same text
    assert r.json()["usage"]["method"] == "retrieval"


def test_sampling_is_exact_and_seeded(client, tiny):
    text, _ = reference(tiny, True, 10, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    req = body(True, max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    got = [client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
           for _ in range(2)]
    assert got == [text, text]


def test_stop_strings_cut_the_text_streamed_or_not(client, tiny):
    text, _ = reference(tiny, False, 12)
    stop = text[4:6]
    expected = text[: text.index(stop)]
    r = client.post("/v1/completions", json=body(False, max_tokens=12, temperature=0, stop=[stop, "éé"]))
    assert r.json()["choices"][0]["text"] == expected and r.json()["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions",
                       json=body(False, max_tokens=12, temperature=0, stop=stop, stream=True)) as s:
        assert streamed_text(sse_events(s), False) == expected


def test_models_health_and_api_key(client, tiny):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert_openai_error(client.get("/v1/models/other"), 404)
    health = client.get("/health", headers={"Authorization": ""}).json()  # open for liveness probes, no details
    assert health == {"status": "ok"}
    health = client.get("/health").json()  # with the key: the model and the counters
    assert health["status"] == "ok" and health["model"] == "tiny" and health["queue_size"] == 16
    for auth in ("", "Bearer wrong", "Bearer sekre", "sekret", "Basic sekret"):
        for r in (client.get("/v1/models", headers={"Authorization": auth}),
                  client.post("/v1/completions", json=body(False), headers={"Authorization": auth})):
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"


BAD_REQUESTS = [
    # (what, path suffix, raw body, param)
    ("malformed JSON", "chat/completions", b'{"model": "tiny", "messages": [', None),
    ("not an object", "chat/completions", b"[1, 2]", None),
    ("not UTF-8", "chat/completions", b'{"model": "\xff"}', None),
    ("unknown model", "chat/completions", {"model": "gpt-9", "messages": CHAT}, "model"),
    ("no model", "chat/completions", {"messages": CHAT}, "model"),
    ("no messages", "chat/completions", {"model": "tiny"}, "messages"),
    ("empty messages", "chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("messages not a list", "chat/completions", {"model": "tiny", "messages": "hi"}, "messages"),
    ("unknown role", "chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role"),
    ("tool role", "chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},
     "messages[0].role"),
    ("message without content", "chat/completions", {"model": "tiny", "messages": [{"role": "user"}]},
     "messages[0].content"),
    ("content a number", "chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
     "messages[0].content"),
    ("image part", "chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ("max_tokens 0", "chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", "completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, "max_tokens"),
    ("max_tokens a string", "chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": "5"},
     "max_tokens"),
    ("max_tokens a bool", "chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": True},
     "max_tokens"),
    ("max_tokens over the context", "chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 600},
     "max_tokens"),
    ("prompt over the context", "completions", {"model": "tiny", "prompt": "x" * 600}, "prompt"),
    ("temperature a string", "chat/completions", {"model": "tiny", "messages": CHAT, "temperature": "hot"},
     "temperature"),
    ("temperature too high", "chat/completions", {"model": "tiny", "messages": CHAT, "temperature": 7},
     "temperature"),
    ("top_p above 1", "completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
    ("seed a float", "completions", {"model": "tiny", "prompt": "x", "seed": 1.5}, "seed"),
    ("seed negative", "completions", {"model": "tiny", "prompt": "x", "seed": -1}, "seed"),
    ("stop a number", "completions", {"model": "tiny", "prompt": "x", "stop": 5}, "stop"),
    ("five stops", "completions", {"model": "tiny", "prompt": "x", "stop": list("abcde")}, "stop"),
    ("empty stop", "completions", {"model": "tiny", "prompt": "x", "stop": [""]}, "stop"),
    ("stream a string", "completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
    ("n = 2", "chat/completions", {"model": "tiny", "messages": CHAT, "n": 2}, "n"),
    ("penalty", "chat/completions", {"model": "tiny", "messages": CHAT, "presence_penalty": 0.5},
     "presence_penalty"),
    ("unknown field", "chat/completions", {"model": "tiny", "messages": CHAT, "temprature": 0}, "temprature"),
    ("empty prompt", "completions", {"model": "tiny", "prompt": ""}, "prompt"),
    ("batched prompt", "completions", {"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ("messages on completions", "completions", {"model": "tiny", "messages": CHAT}, "messages"),
    ("unknown method", "chat/completions", {"model": "tiny", "messages": CHAT, "msn": {"method": "fast"}},
     "msn.method"),
    ("tree file", "chat/completions", {"model": "tiny", "messages": CHAT, "msn": {"tree": "/etc/passwd"}},
     "msn.tree"),
    ("stream_options without stream", "completions",
     {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("what, path, payload, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(client, what, path, payload, param):
    kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    r = client.post(f"/v1/{path}", headers={"Content-Type": "application/json"}, **kw)
    assert_openai_error(r, param=param)


@pytest.mark.parametrize("raw, param, words", [
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature", "must be a finite number, got nan"),
    (b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', "top_p", "must be a finite number, got inf"),
    (b'{"model": "tiny", "prompt": "x", "min_p": -Infinity}', "min_p", "must be a finite number, got -inf"),
    (b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
], ids=["NaN temperature", "Infinity top_p", "-Infinity min_p", "nested 100000 deep"])
def test_non_finite_numbers_and_deep_nesting_get_a_400_that_says_why(client, raw, param, words):
    """What Python's json.dumps sends for a NaN, and a body past the recursion limit: the client's fault."""
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    error = assert_openai_error(r, 400, param=param)
    assert words in error["message"], error
    assert client.post("/v1/completions", json=body(False, max_tokens=2)).status_code == 200


def test_routing_errors_are_openai_shaped_and_the_server_keeps_serving(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)
    assert client.post("/v1/completions", json=body(False, max_tokens=2)).status_code == 200


@pytest.mark.parametrize("flags, message", [
    (["--queue-size", "0"], "--queue-size must be >= 1"),
    (["--max-batch", "0"], "--max-batch must be in 1..64"),
    (["--max-batch", "-3"], "--max-batch must be in 1..64"),
    (["--max-batch", "100000"], "--max-batch must be in 1..64"),
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--api-key", " "], "--api-key is empty"),
    (["--tree", "nope"], "unknown tree 'nope'"),
    (["--port", "TAKEN"], "Address already in use"),
    (["--api-key", " sekret"], "--api-key has spaces or a line break around it"),
    (["--api-key", "sek ret"], "printable ASCII only"),
    (["--max-body", "lots"], "--max-body must be a positive number of bytes"),
    (["--max-body", "0"], "--max-body must be a positive number of bytes"),
    (["--allowed-origins", "evil.example.com"], "--allowed-origins takes origins such as http://localhost:3000"),
])
def test_serve_flags_fail_in_one_line_before_the_model_loads(capsys, flags, message):
    from msn.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        flags = [str(taken.getsockname()[1]) if f == "TAKEN" else f for f in flags]
        assert main(["serve", "--model", "no-such-model", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msn serve: error:") and message in err and err.count("\n") == 1


def test_a_length_cut_mid_character_is_length_even_when_its_u_fffd_matches_a_stop(monkeypatch):
    """Issue 36 item 12: the unfinished bytes released at the end decode to U+FFFD; a stop string matching
    that is cut from the text, but the generation ended by its length."""
    import msn.decoding.engine as engine

    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    def fake_generate(model, ids, streamer=None, **kw):
        streamer.put(ids)
        streamer.put(torch.tensor([[ord("a")]]))
        streamer.put(torch.tensor([[0xE4]]))  # the first byte of a three-byte character, then max_tokens
        streamer.end()

    monkeypatch.setattr(engine, "generate", fake_generate)
    events = []
    for stops, reason, text in (([], "length", "a\ufffd"), (["\ufffd"], "length", "a"), (["a"], "stop", "")):
        events.clear()
        Worker(model=None, tokenizer=Bytes(), eos=[2]).run(Job(torch.tensor([[1]]), {"method": "ar"}, stops,
                                                               events.append))
        result = events[-1].result
        assert (result.finish_reason, result.text) == (reason, text), stops


@pytest.mark.parametrize("dtype, method, reproducible", [
    (torch.bfloat16, "tr-jacobi", False), (torch.bfloat16, "ar", True), (torch.float32, "tr-jacobi", True)])
def test_usage_says_whether_greedy_text_is_reproducible(dtype, method, reproducible):
    """Issue 36 item 9: in bf16 a tree forward can flip a near-tie, and the tree depends on earlier requests."""
    model = tiny_model("llama", dtype=dtype)
    app = create_app(model, ByteChatTokenizer(), model_id="tiny", method=method, tree="cpu-fp32-8")
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/v1/completions", json=body(False, max_tokens=3, temperature=0))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["reproducible"] is reproducible


# -- a real server: msn serve with SmolLM2-135M, the openai client --------------------------------------------
API_KEY = "test-key"
MAX_BATCH = 2  # requests decoded together (the 8 concurrent clients below run 2 at a time, batched)
QUEUE = 7  # 9 concurrent clients fit (2 running + 7 waiting); the 10th gets 503
MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, key: str | None = API_KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def post_raw(url: str, data: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("openai")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "msn.cli", "serve", "--model", MODEL, "--port", str(port), "--dtype", "fp32",
           "--threads", "1", "--queue-size", str(QUEUE), "--max-batch", str(MAX_BATCH), "--api-key", API_KEY]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            text = log.read_text()
            if "unavailable" in text or "pip install" in text:
                pytest.skip(f"{MODEL} preset unavailable: {text[-300:]}")
            pytest.fail(f"msn serve exited with {proc.returncode}:\n{text[-3000:]}")
        try:
            if get_json(f"{base}/health", key=None)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"msn serve did not come up in 120 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield proc, base, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def api(server):
    import openai

    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def expected(smollm2, prompt: str | list[dict], max_new_tokens: int) -> tuple[str, int]:
    """msn.generate's greedy text and token count, in this process (fp32, one thread, as the server)."""
    model, tok = smollm2
    ids = encode_text(tok, prompt, special_tokens=True) if isinstance(prompt, str) else encode_chat(tok, prompt)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = msn.generate(model, ids, max_new_tokens=max_new_tokens, method="ar", eos_token_id=eos_ids(model, tok))
    finally:
        torch.set_num_threads(before)
    return tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True), out.new_tokens


@pytest.mark.slow
def test_real_server_greedy_equals_generate(api, smollm2):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    text, n = expected(smollm2, messages, 20)
    r = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == text and r.usage.completion_tokens == n
    assert r.usage.model_extra["steps"] >= 1 and r.usage.model_extra["tokens_per_second"] > 0
    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                         stream=True, extra_body={"msn": {"method": "ar"}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    prompt = "The three primary colours are"
    text, n = expected(smollm2, prompt, 16)
    r = api.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == text and r.usage.completion_tokens == n


WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "comet")


@pytest.mark.slow
def test_real_server_eight_concurrent_clients_each_get_their_own_answer(api, smollm2):
    prompts = [f"{w} {i}, {w} {i}, {w} {i}, {w} {i}," for i, w in enumerate(WORDS)]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            r = api.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0,
                                       stream=i % 2 == 1)
            got[i] = r.choices[0].text if i % 2 == 0 else "".join(c.choices[0].text for c in r if c.choices)
        except BaseException as e:  # noqa: B036 - reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == len(prompts)
    for i, prompt in enumerate(prompts):
        assert got[i] == expected(smollm2, prompt, 8)[0], (i, got[i])


@pytest.mark.slow
def test_real_server_batched_seeded_sampling_is_each_seeds_own_text(api, smollm2):
    """Requests sampled side by side in one batch: each gets what its seed gives alone (fp32)."""
    model, tok = smollm2
    prompts = [f"Tell me about {w}." for w in WORDS[:MAX_BATCH + 1]]  # one more than a batch: one joins later
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = api.completions.create(model=MODEL, prompt=prompts[i], max_tokens=10, temperature=0.8,
                                        seed=100 + i).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, prompt in enumerate(prompts):
            ids = encode_text(tok, prompt, special_tokens=True)
            out = msn.generate(model, ids, max_new_tokens=10, method="ar", do_sample=True, temperature=0.8,
                               seed=100 + i, eos_token_id=eos_ids(model, tok))
            assert got[i] == tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True), i
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_real_server_queue_full_503_and_disconnect_mid_stream(api, server):
    import openai

    base = server[1]
    counting = "1, 2, 3, 4, 5, 6, 7, 8,"
    longs = [api.completions.create(model=MODEL, prompt=counting, max_tokens=4000, temperature=0, stream=True)
             for _ in range(MAX_BATCH)]
    for long in longs:
        assert next(iter(long)).choices[0].text  # generating now, together
    assert get_json(f"{base}/health")[1]["running"] == MAX_BATCH
    done: list[int] = []
    waiting = [threading.Thread(target=lambda: done.append(len(api.completions.create(
        model=MODEL, prompt="Hello", max_tokens=2, temperature=0).choices))) for _ in range(QUEUE)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 30
    while get_json(f"{base}/health")[1]["waiting"] < QUEUE:
        assert time.monotonic() < deadline, get_json(f"{base}/health")
        time.sleep(0.05)
    with pytest.raises(openai.APIStatusError) as e:
        api.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "queue_full"
    for long in longs:
        long.close()  # the client leaves mid-stream: its 4000-token generation stops at the next step
    for t in waiting:
        t.join(60)
    assert done == [1] * QUEUE
    deadline = time.monotonic() + 10
    while (health := get_json(f"{base}/health")[1])["running"] or health["waiting"]:
        assert time.monotonic() < deadline, f"the abandoned generation kept running: {health}"
        time.sleep(0.05)
    r = api.completions.create(model=MODEL, prompt=counting, max_tokens=4, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 4


@pytest.mark.slow
def test_real_server_refuses_bad_requests_and_keeps_serving(server, api):
    base = server[1]
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        (b'{"model": "smollm2-135m", "messages": [', None),
        (json.dumps({"model": "gpt-4o", "messages": messages}).encode(), "model"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": messages, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": MODEL, "messages": messages, "max_tokens": 10**6}).encode(), "max_tokens"),
        (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
         "messages[0].role"),
        (json.dumps({"model": MODEL, "messages": messages, "temperature": "warm"}).encode(), "temperature"),
    ]
    for data, param in cases:
        status, err = post_raw(f"{base}/v1/chat/completions", data)
        assert 400 <= status < 500 and set(err["error"]) == {"message", "type", "param", "code"}, (status, err)
        assert err["error"]["param"] == param
    for key in (None, "wrong-key"):
        status, err = post_raw(f"{base}/v1/chat/completions", json.dumps({"model": MODEL, "messages": messages})
                               .encode(), key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert api.models.list().data[0].id == MODEL
    r = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert r.choices[0].message.content is not None


@pytest.mark.slow
def test_real_server_sigterm_drains_then_exits_0(server, api):
    """Last: stops the module's server. A request in flight when SIGTERM arrives still completes."""
    proc = server[0]
    stream = api.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    proc.send_signal(signal.SIGTERM)
    rest = [c for c in chunks]
    assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert proc.wait(30) == 0, server[2].read_text()[-2000:]
    assert "msn serve: stopped" in server[2].read_text()


def test_the_worker_runs_its_first_task_on_its_own_thread_and_hands_back_its_error():
    seen = []
    worker = Worker(model=None, tokenizer=None, eos=[2])
    worker.start(lambda: seen.append(threading.current_thread().name))
    worker.wait_started()
    worker.start(lambda: seen.append("again"))  # started once
    worker.close()
    assert seen == ["msn-serve-worker"]
    failing = Worker(model=None, tokenizer=None, eos=[2])
    failing.start(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.wait_started()


def test_max_batch_falls_back_to_one_where_requests_cannot_share_a_forward(caplog):
    from msn.errors import MsnError
    from msn.serve.app import create_app

    tok = ByteChatTokenizer()
    for size in (1, 4):  # a batch of one is msn.generate's forward: the batched loop serves max batch 1 too
        worker = create_app(tiny_model("llama"), tok, model_id="t", max_batch=size).state.server.worker
        assert worker.max_batch == size and worker.batched
    with caplog.at_level("WARNING", logger="msn.serve"):
        app = create_app(tiny_model("gemma3"), tok, model_id="t", max_batch=4)
    worker = app.state.server.worker
    assert worker.max_batch == 1 and not worker.batched and "sliding-window" in caplog.text
    for bad in (0, 65, True, "8"):
        with pytest.raises(MsnError, match="max batch must be an integer from 1 to 64"):
            create_app(tiny_model("llama"), tok, model_id="t", max_batch=bad)


def test_a_worker_asked_to_batch_a_model_that_cannot_serves_one_at_a_time():
    events = []
    worker = Worker(tiny_model("gemma3"), ByteChatTokenizer(), eos=[2], max_batch=4)  # sliding layers
    worker.start()
    done = threading.Event()
    worker.submit(Job(torch.tensor([[5, 6, 7]]), {"max_new_tokens": 3, "method": "ar"}, [],
                      lambda e: (events.append(e), isinstance(e, Finished) and done.set())))
    assert done.wait(60), events
    worker.close()
    assert worker.max_batch == 1 and not worker.batched and events[-1].result.completion_tokens == 3


def test_a_failing_shared_forward_fails_its_jobs_with_a_500_and_the_worker_serves_on(monkeypatch):
    from msn.decoding.batch import Batch
    from msn.serve.worker import Failed

    model = tiny_model("llama")
    worker = Worker(model, ByteChatTokenizer(), eos=[2], max_batch=4)
    real_step = Batch.step
    monkeypatch.setattr(Batch, "step", lambda self: (_ for _ in ()).throw(RuntimeError("out of memory")))
    ended, events = threading.Semaphore(0), []

    def emit(e):
        events.append(e)
        if isinstance(e, Finished | Failed):
            ended.release()

    jobs = [Job(torch.tensor([[5, 6, 7 + i]]), {"max_new_tokens": 3, "method": "ar"}, [], emit) for i in range(2)]
    for job in jobs:
        worker.submit(job)
    worker.start()
    assert ended.acquire(timeout=60) and ended.acquire(timeout=60)
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 2 and all(e.status == 500 and "RuntimeError: out of memory" in e.message for e in failed)
    monkeypatch.setattr(Batch, "step", real_step)
    worker.submit(Job(torch.tensor([[5, 6]]), {"max_new_tokens": 3, "method": "ar"}, [], emit))
    assert ended.acquire(timeout=60)
    worker.close()
    assert isinstance(events[-1], Finished) and worker.stats()["running"] == 0
