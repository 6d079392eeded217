"""The compiled verification path (``compile=True``): static KV buffer written in place, tree sizes padded to
buckets, ``torch.compile`` per bucket. It must decode exactly what plain greedy decoding does (fp32), compile
each bucket once (no recompiles as the sequence grows), and fall back to eager decoding, never crash, when
compilation fails or the model cannot use a static cache."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model
from helpers import tree_templates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decoding_equivalence import assert_equal_or_near_tie, check_stop_rules, hf_greedy, prompts

import msn
from msn.decoding import static_kv

COMPILED_FAMILIES = ("llama", "qwen2")
_MODELS: dict = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def test_buckets_and_cache_lengths():
    assert [static_kv.bucket(n) for n in (1, 2, 4, 5, 9, 33, 64, 70)] == [1, 8, 8, 8, 16, 64, 64, 70]
    from msn.decoding.costs import GRID, grid

    assert grid(None, compiled=False) == list(GRID) and max(grid(None, compiled=True)) + 1 <= 16
    assert static_kv.cache_length(10) == 512 and static_kv.cache_length(513) == 1024
    assert static_kv.unsupported(tiny_model("llama")) is None
    assert "sliding" in static_kv.unsupported(tiny_model("gemma3"))


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=prompts(),
    # trees of at most 16 tokens: buckets 1, 8 and 16 compile once per family, then every example reuses them
    tree=st.one_of(tree_templates(max_nodes=5, max_retrieval=4, max_recycling=5), st.just("cpu-fp32-8")),
    n=st.integers(1, 24),
)
def test_compiled_path_equals_greedy_generate(family, prompt, tree, n):
    model = _model(family)
    ids = torch.tensor([prompt])
    ref = hf_greedy(model, ids, n, None)
    for method in msn.METHODS:
        out = msn.generate(model, ids, max_new_tokens=n, method=method, tree=tree, compile=True)
        assert out.compiled
        assert_equal_or_near_tie(model, ref, out.sequences, f"compiled {family}/{method}/{tree}")
        check_stop_rules(out, len(prompt), n, {2})
    assert static_kv.compiled_forwards(model).failed is None


def test_no_recompile_as_the_sequence_grows_or_across_requests():
    from torch._dynamo.utils import counters

    model = _model("llama")
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(3, TINY_VOCAB, (1, 12), generator=gen)
    msn.generate(model, warm, max_new_tokens=20, method="ar", compile=True)
    msn.generate(model, warm, max_new_tokens=20, method="tr-jacobi", tree="cpu-fp32-8", compile=True)
    frames = counters["stats"]["unique_graphs"]
    for length in (5, 40):  # other prompt lengths, same cache length (512): the compiled graphs are reused
        ids = torch.randint(3, TINY_VOCAB, (1, length), generator=gen)
        for method in ("ar", "tr-jacobi"):
            out = msn.generate(model, ids, max_new_tokens=30, method=method, tree="cpu-fp32-8", compile=True)
            assert out.sequences.shape[1] > length
    assert counters["stats"]["unique_graphs"] == frames


def test_a_failed_compilation_decodes_eagerly_with_one_warning(monkeypatch, caplog):
    def broken(model):
        def forward(**kwargs):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return forward

    monkeypatch.setattr(static_kv, "compile_forward", broken)
    model = tiny_model("qwen2", seed=1)  # its own compiled-forward holder
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    ref = hf_greedy(model, ids, 16, None)
    with caplog.at_level(logging.WARNING, logger="msn"):
        for method in ("ar", "tr-jacobi"):
            out = msn.generate(model, ids, max_new_tokens=16, method=method, tree="cpu-fp32-8", compile=True)
            assert torch.equal(out.sequences, ref)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "compilation failed (RuntimeError: no C++ compiler found)" in warnings[0]


def test_a_sliding_window_model_decodes_eagerly_with_one_warning(caplog):
    model = tiny_model("gemma3")
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    ref = hf_greedy(model, ids, 12, None)
    with caplog.at_level(logging.WARNING, logger="msn"):
        for _ in range(2):
            out = msn.generate(model, ids, max_new_tokens=12, method="tr-jacobi", tree="cpu-fp32-8", compile=True)
            assert torch.equal(out.sequences, ref) and not out.compiled
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not supported for this model (sliding-window" in warnings[0]


def test_bench_methods_with_compile_suffix_run_the_compiled_path():
    from fakes import ByteChatTokenizer

    from msn.bench.runner import parse_methods, run_turn
    from msn.errors import InputError

    assert parse_methods("ar,ar+compile,tr-jacobi+compile") == ["ar", "ar+compile", "tr-jacobi+compile"]
    with pytest.raises(InputError, match="pld\\+compile"):
        parse_methods("pld+compile")
    model, tok = _model("llama"), ByteChatTokenizer(vocab_size=TINY_VOCAB)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    eager = run_turn(model, tok, "tr-jacobi", ids, 16, "cpu-fp32-8", [2])
    compiled = run_turn(model, tok, "tr-jacobi+compile", ids, 16, "cpu-fp32-8", [2])
    assert compiled.text == eager.text and compiled.new_tokens == eager.new_tokens
    with pytest.raises(Exception, match="could not use the compiled path"):
        run_turn(tiny_model("gemma3"), tok, "ar+compile", ids, 4, None, [2])


def test_compile_defaults_to_on_for_cuda_models_only(monkeypatch):
    """``compile=None`` (the default everywhere): compiled where it wins (a CUDA model the static path can
    serve), eager on a CPU; an explicit True/False always wins."""
    llama, gemma = tiny_model("llama"), tiny_model("gemma3")
    assert static_kv.resolve_compile(llama, None) is (llama.device.type == "cuda")
    assert static_kv.resolve_compile(llama, True) and not static_kv.resolve_compile(llama, False)
    cuda = torch.device("cuda")
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "device", property(lambda self: cuda))
    assert gemma.device == cuda
    assert static_kv.resolve_compile(llama, None)
    assert not static_kv.resolve_compile(gemma, None), "sliding window: the static path cannot serve it"
    assert not static_kv.resolve_compile(llama, False)
    monkeypatch.undo()
    out = msn.generate(llama, torch.tensor([[5, 6, 7]]), max_new_tokens=3)
    assert out.compiled is (llama.device.type == "cuda")


def test_precompile_compiles_ahead_what_a_long_request_uses():
    """A prompt past the 512-entry cache needs a 1024-entry one: precompiled, the request itself compiles nothing."""
    from torch._dynamo.utils import counters

    model = _model("llama")
    long = torch.randint(3, TINY_VOCAB, (1, 470), generator=torch.Generator().manual_seed(1))
    static_kv.precompile(model, 470 + 20, [1])
    assert (1024, 1) in static_kv.compiled_forwards(model).warmed
    frames = counters["stats"]["unique_graphs"]
    out = msn.generate(model, long, max_new_tokens=20, method="ar", compile=True)
    assert out.compiled and counters["stats"]["unique_graphs"] == frames
    assert torch.equal(out.sequences, hf_greedy(model, long, 20, None))


def test_the_bench_precompiles_every_cache_length_its_questions_need(monkeypatch):
    """Compiled bench methods: the warm-up compiles each (cache length, bucket) the questions will need, so no
    timed answer compiles (a long extraction prompt once compiled inside its own timed answer)."""
    from fakes import ByteChatTokenizer

    from msn.bench import runner
    from msn.bench.questions import Question

    calls = []
    monkeypatch.setattr(static_kv, "precompile", lambda model, total, sizes: calls.append((total, list(sizes))))
    monkeypatch.setattr(runner, "answer_question", lambda *a, **k: {})
    model, tok = _model("llama"), ByteChatTokenizer(vocab_size=TINY_VOCAB)
    qs = [Question("a", "writing", ["hi"]), Question("b", "extraction", ["x" * 600]),
          Question("c", "writing", ["y" * 300, "again"])]
    runner.run_questions(model, tok, qs, ["ar", "tr-jacobi+compile"], 64, lambda q, r: None, tree="auto")
    lengths = [static_kv.buffer_length(total) for total, _ in calls]
    assert lengths == [512, 1024] and all(sizes == [1, 8, 16] for _, sizes in calls)
    assert calls[1][0] >= 600 + 64  # sized for the prompt and the answer
    calls.clear()
    runner.run_questions(model, tok, qs, ["ar", "tr-jacobi"], 64, lambda q, r: None, tree="auto")
    assert calls == [], "no compiled method, nothing compiled"
    runner.run_questions(model, tok, qs[:1], ["ar+compile"], 64, lambda q, r: None, tree="cpu-fp32-8")
    assert calls[0][1] == [1, 8, 16]  # a static 8-node tree verifies 9 tokens: bucket 16
