"""Packed Linear weights (msn.decoding.packed): bf16 results bit for bit the eager ones, fp32 one-token steps
untouched, the user's model left as it was, stale packs redone, failures fall back."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import DEVICE, tiny_model

import msn
from msn.decoding import packed as packed_mod
from msn.decoding.engine import DecoderState
from msn.decoding.packed import packing, resolve_pack

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu" or not packed_mod._ops_available(),
                                reason="packing is for CPU models with oneDNN")
BF16 = pytest.mark.skipif(not packed_mod.bf16_packable(), reason="this CPU has no oneDNN bf16 linear (AVX2 only)")
PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 9, 10, 11, 5, 6]])


def decode(model, pack: bool, method: str = "tr-jacobi", tree="cpu-bf16-16", n: int = 24):
    return msn.generate(model, PROMPT.to(model.device), max_new_tokens=n, method=method, tree=tree,
                        eos_token_id=[], pack=pack, state=DecoderState())


@BF16
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("method,tree", [("ar", None), ("tr-jacobi", "cpu-bf16-16"), ("tr-jacobi", "official-68")])
def test_bf16_packed_decoding_is_bit_identical(family, method, tree):
    model = tiny_model(family, seed=4, dtype=torch.bfloat16)
    a, b = decode(model, True, method, tree), decode(model, False, method, tree)
    assert a.packed and not b.packed
    assert torch.equal(a.sequences, b.sequences) and a.accept_lengths == b.accept_lengths


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=BF16), torch.float32])
def test_which_forwards_go_packed(dtype):
    """bf16: every forward, identical logits. fp32: one-token forwards stay the model's own (bit equal), tree
    forwards go packed (equal up to rounding)."""
    model = tiny_model("llama", seed=1, dtype=dtype)
    x1, x8 = torch.tensor([[3]]), torch.arange(10, 18)[None]
    with torch.inference_mode():
        ref1, ref8 = model(x1).logits, model(x8).logits
        with packing(model, True) as pk:
            pk.use(1)
            assert pk.on == (dtype == torch.bfloat16)
            one = model(x1).logits
            pk.use(0)
            assert pk.on == (dtype == torch.bfloat16), "the prefill: packed only where bit-identical"
            pk.use(8)
            assert pk.on
            eight = model(x8).logits
    assert torch.equal(one, ref1)
    if dtype == torch.bfloat16:
        assert torch.equal(eight, ref8)
    else:
        torch.testing.assert_close(eight, ref8, rtol=1e-5, atol=1e-5)


def test_the_model_is_left_unchanged_even_when_a_request_fails():
    model = tiny_model("llama", seed=2)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    class Boom:
        def put(self, value):
            if value.numel() < PROMPT.numel():  # the first new tokens, mid-answer
                raise KeyboardInterrupt

        def end(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        msn.generate(model, PROMPT, max_new_tokens=8, eos_token_id=[], streamer=Boom(), pack=True)
    assert all("forward" not in m.__dict__ for m in linears)
    assert set(model.state_dict()) == set(tiny_model("llama", seed=2).state_dict())


def test_changed_weights_are_packed_again():
    """Training between requests changes the weights in place: the next request must not verify with the old
    ones (its output would then differ from unpacked decoding)."""
    model = tiny_model("qwen2", seed=3, dtype=torch.bfloat16)
    decode(model, True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    assert torch.equal(decode(model, True).sequences, decode(model, False).sequences)


def test_failed_packing_decodes_unpacked_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(packed_mod, "_BROKEN", [])

    def fail(layer):
        raise RuntimeError("no oneDNN here\nsecond line")

    monkeypatch.setattr(packed_mod, "_packed_weight", fail)
    model = tiny_model("llama", seed=5)
    with caplog.at_level(logging.WARNING, logger="msn"):
        out = decode(model, True)
    assert not out.packed and "packing the linear weights failed (RuntimeError: no oneDNN here)" in caplog.text
    assert not resolve_pack(model, None, False), "stays off for the rest of the process"
    assert torch.equal(out.sequences, decode(model, False).sequences)


def test_default_is_packed_on_cpu_but_never_when_compiled():
    model = tiny_model("llama")
    assert resolve_pack(model, None, compile=False)
    assert not resolve_pack(model, None, compile=True) and not resolve_pack(model, False, compile=False)
    assert not resolve_pack(tiny_model("llama", dtype=torch.float16), None, compile=False)


def test_bf16_on_a_cpu_without_onednn_bf16_decodes_unpacked_quietly_and_fp32_still_packs(monkeypatch, caplog):
    monkeypatch.setattr(packed_mod, "_BROKEN", [])
    monkeypatch.setattr(packed_mod, "bf16_packable", lambda: False)
    with caplog.at_level(logging.WARNING, logger="msn"):
        out = decode(tiny_model("llama", seed=5, dtype=torch.bfloat16), None)
    assert not out.packed and "packing" not in caplog.text, "no failed attempt, no notice"
    assert resolve_pack(tiny_model("llama"), None, compile=False), "fp32 models still pack"


@BF16
def test_bench_unpacked_suffix_runs_without_packing(monkeypatch):
    from fakes import ByteChatTokenizer

    from msn.bench.runner import parse_methods, run_turn

    assert parse_methods("ar,ar+unpacked,tr-jacobi+unpacked") == ["ar", "ar+unpacked", "tr-jacobi+unpacked"]
    installs = []
    original = packed_mod.Packing.install
    monkeypatch.setattr(packed_mod.Packing, "install", lambda self: (installs.append(1), original(self)))
    model, tok = tiny_model("llama", seed=6, dtype=torch.bfloat16), ByteChatTokenizer(vocab_size=128)
    packed = run_turn(model, tok, "tr-jacobi", PROMPT, 16, "cpu-bf16-16", [2])
    assert len(installs) == 1
    unpacked = run_turn(model, tok, "tr-jacobi+unpacked", PROMPT, 16, "cpu-bf16-16", [2])
    assert len(installs) == 1 and unpacked.text == packed.text and unpacked.steps == packed.steps


def test_a_measurement_inside_a_request_uses_the_requests_packing(tmp_path, monkeypatch):
    """The t(n) curve a request sizes its trees with is measured inside that request: a second packing there
    found every layer taken and measured the unpacked path (1.4x slower than the steps, results §20)."""
    from msn.decoding import costs

    monkeypatch.setenv("MSN_CACHE", str(tmp_path))
    monkeypatch.setattr(costs, "_busy", lambda: False)
    model = tiny_model("llama")
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with packing(model, True) as outer:
        with packing(model, True) as inner:
            assert inner is outer, "re-entrant: the request's own packing"
        assert all("forward" in m.__dict__ for m in layers), "the inner exit leaves the request's packing"
        seen = []
        real = packed_mod.Packing._forward

        def spy(self, layer, weight):
            fn = real(self, layer, weight)
            return lambda x: seen.append(self.on) or fn(x)

        monkeypatch.setattr(packed_mod.Packing, "_forward", spy)
        outer.install()  # reinstall through the spy
        costs.measure_forward(model, [1, 3], past=8, repeats=1, packed=True, warmup=0.0)
        assert seen and any(seen), "tree forwards of the measurement ran packed"
    assert not any("forward" in m.__dict__ for m in layers)
