"""4-bit weights (msn.int4, msn.gguf_int4): the kernel's weights, GGUF decoding, losslessness, bad input.

The lossless property is the equivalence tests' on quantized models: every method's greedy output equals
transformers' greedy ``generate`` of the same int4 model, fp32 activations, tiny random models of several
families (a mismatch is excused only at an exact near-tie, as there). It rests on the kernel computing each row
the same whatever the number of rows beside it, which is tested directly.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decoding_equivalence import assert_equal_or_near_tie, hf_greedy, prompts
from torch import nn

import msn
from msn.errors import InputError, MsnError
from msn.int4 import Int4Linear, quantize_groups, quantize_model

EXAMPLES = int(os.environ.get("MSN_EQUIV_EXAMPLES", "10")) // 2 or 1
INT4_FAMILIES = ("llama", "qwen2", "gemma3", "gpt2", "phi3")  # gpt2: Conv1D layers; phi3: fused qkv


def _layer(n: int = 64, k: int = 128, group: int = 32, seed: int = 0, bias: bool = False) -> tuple:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.05 + 1e-3
    offset = torch.randn(n, k // group, generator=g) * 0.1
    b = torch.randn(n, generator=g) if bias else None
    return Int4Linear.from_codes(codes, scale, offset, group, b), codes, scale, offset, b


@pytest.mark.parametrize("group", [32, 64])
def test_kernel_computes_with_scale_times_code_plus_offset(group):
    layer, codes, scale, offset, bias = _layer(group=group, bias=True)
    w = (codes.float().reshape(64, -1, group) * scale[..., None] + offset[..., None]).reshape(64, 128)
    assert (layer.dequantize() - w).abs().max() < 1e-6
    x = torch.randn(5, 3, 128)
    assert torch.allclose(layer(x), x @ w.t() + bias, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_is_computed_alike_whatever_rows_are_beside_it(dtype):
    """What a tree's verification forward relies on: row i of an n-row product is the 1-row product."""
    layer = _layer(n=128, k=128)[0]
    x = torch.randn(24, 128).to(dtype)
    full = layer(x)
    assert full.dtype == dtype
    for i in range(24):
        assert torch.equal(layer(x[i : i + 1])[0], full[i])
    assert torch.equal(layer(x[:7]), full[:7])
    assert layer(x[:0]).shape == (0, 128)


def test_wide_forwards_run_on_the_same_weight_in_packed_bf16():
    """bf16: more than ``wide_rows`` rows go to the dequantized weight packed for oneDNN; fewer to the kernel."""
    from msn.decoding.packed import bf16_packable
    from msn.int4 import Codes, dequantized

    if not bf16_packable():
        pytest.skip("oneDNN cannot pack bf16 on this CPU")
    layer, codes, scale, offset, bias = _layer(n=64, k=128, bias=True)
    w = dequantized(Codes(codes, scale, offset, 32, "test"))
    layer.attach_wide(w, rows=4)
    x = torch.randn(9, 128).to(torch.bfloat16)
    wide = layer(x)
    assert torch.equal(wide, torch.ops.mkldnn._linear_pointwise(x, layer.wide, layer.bias, "none", [], ""))
    narrow = torch.cat([layer(x[i : i + 1]) for i in range(9)])  # the int4 kernel, row by row
    assert torch.equal(layer(x[:4]), narrow[:4])
    ref = x.float() @ w.t() + bias
    assert (wide.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert (narrow.float() - ref).abs().max() < 0.05 * ref.abs().max()
    layer32 = _layer(n=64, k=128)[0]
    layer32.attach_wide(w, rows=4)
    assert torch.equal(layer32(x.float()), torch.cat([layer32(x[i : i + 1].float()) for i in range(9)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_bf16_models_get_the_wide_path(dtype):
    from msn.decoding.packed import bf16_packable

    model = tiny_model("llama", dtype=dtype)
    quantize_model(model)
    wide = dtype == torch.bfloat16 and bf16_packable()
    assert model._msn_quantize == ("int4-wide4" if wide else "int4")
    assert all((m.wide is not None) == wide for m in model.modules() if isinstance(m, Int4Linear))
    model = tiny_model("llama", dtype=dtype)
    quantize_model(model, wide_rows=None)
    assert model._msn_quantize == "int4"


def test_rounding_from_float_is_within_half_a_step():
    w = torch.randn(32, 64)
    w[0, :32] = 0.25  # a constant group
    codes, scale, offset = quantize_groups(w, 32)
    back = (codes.float().reshape(32, 2, 32) * scale[..., None] + offset[..., None]).reshape(32, 64)
    assert ((back - w).abs().reshape(32, 2, 32) <= scale[..., None] / 2 + 1e-6).all()
    assert torch.equal(back[0, :32], w[0, :32])


def test_layers_the_kernel_cannot_take_are_named_once(caplog):
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8), nn.Linear(48, 16))
    with caplog.at_level(logging.WARNING, logger="msn"):
        report = quantize_model(model)
    assert isinstance(model[0], Int4Linear) and isinstance(model[1], nn.Linear) and isinstance(model[2], nn.Linear)
    assert set(report.left_float) == {"1", "2"}
    assert "not a multiple of 16" in report.left_float["1"] and "group size 32" in report.left_float["2"]
    assert len([r for r in caplog.records if "left in float" in r.getMessage()]) == 1
    with pytest.raises(MsnError, match="none of the model's 2 Linear layers"):
        quantize_model(nn.Sequential(nn.Linear(32, 8), nn.Linear(48, 16)))
    with pytest.raises(MsnError, match="no Linear layers"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_float_layers_are_listed_with_layer_ranges():
    from msn.int4 import QuantReport

    names = {f"model.layers.{i}.mlp.down_proj": "GGUF Q6_K" for i in (0, 1, 3, 4, 5, 7)}
    names["lm_head"] = "GGUF Q8_0"
    text = QuantReport({"x": "Q4_K"}, names).summary()
    assert "model.layers.{0,1,3-5,7}.mlp.down_proj (GGUF Q6_K); lm_head (GGUF Q8_0)" in text


def test_bad_quantize_values_fail_before_loading():
    for kwargs, match in [({"quantize": "int5"}, "unknown quantize 'int5'"),
                          ({"quantize": "int4", "device": "meta"}, "CPU only"),
                          ({"quantize": "INT4"}, "unknown quantize")]:
        # a model name that does not exist: the quantize error must come first
        with pytest.raises(InputError, match=match):
            msn.load_model("no-such/model-x", **kwargs)


def test_quantize_flag_choices_match_the_module():
    from msn.flags import QUANTIZE_CHOICES
    from msn.int4 import QUANTIZE

    assert QUANTIZE_CHOICES == QUANTIZE


@pytest.mark.parametrize("command", ["generate", "bench", "demo", "tune-tree", "distill", "eval", "serve"])
def test_every_model_command_refuses_a_bad_quantize(command, capsys):
    from msn.cli import main

    assert main([command, "--quantize", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_a_bench_resumes_only_with_the_same_weight_format():
    from msn.bench.session import _differences

    old = {"model": "m", "dtype": "bf16", "device": "cpu", "max_new_tokens": 8, "tree": None, "sampling": None}
    assert _differences(old, {**old, "quantize": "none"}) == []  # a bench.json from before --quantize: float
    assert _differences({**old, "quantize": "none"}, {**old, "quantize": "int4"}) == ["quantize 'none' -> 'int4'"]


def test_t_n_cache_key_names_the_quantization():
    from msn.decoding.costs import cache_key

    model = tiny_model("llama")
    before = cache_key(model, packed=True)
    quantize_model(model)
    after = cache_key(model, packed=True)
    assert after != before and "-int4" in after and "-int4" not in before


# ---------------------------------------------------------------------------------------------------------
# GGUF blocks


def _random_blocks(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``n`` GGUF blocks, with finite fp16 scales."""
    import gguf

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    halves = 2 if kind in ("Q4_1", "Q4_K") else 1
    scales = (rng.random((n, halves)) * 0.02 - (0.01 if kind == "Q4_1" else 0)).astype(np.float16)
    scales[:, 0] = np.abs(scales[:, 0]) + np.float16(1e-3)
    blocks[:, : 2 * halves] = scales.view(np.uint8)
    return blocks


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_decode_to_the_files_own_dequantization(kind):
    import gguf

    from msn.gguf_int4 import DECODERS

    blocks = _random_blocks(kind, 16)
    codes, scale, offset = DECODERS[kind](blocks)
    assert codes.shape[1] // scale.shape[1] == 32 and codes.max() <= 15
    ours = (codes.reshape(16, -1, 32) * scale[..., None] + offset[..., None]).reshape(16, -1)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]).reshape(16, -1)
    assert np.array_equal(ours.astype(np.float32), ref)
    rows = 64 if kind == "Q4_K" else 16  # any [out, in] view of the blocks with in a multiple of 32
    layer = Int4Linear.from_codes(*(torch.from_numpy(a.reshape(rows, -1)) for a in (codes, scale, offset)))
    assert (layer.dequantize().reshape(16, -1) - torch.from_numpy(ref)).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------------------
# Lossless on quantized models

_QUANTIZED: dict = {}


def _quantized(family: str):
    if family not in _QUANTIZED:
        model = tiny_model(family)
        report = quantize_model(model)
        assert not report.left_float, report.left_float
        _QUANTIZED[family] = model
    return _QUANTIZED[family]


@pytest.mark.parametrize("family", INT4_FAMILIES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts(), tree=st.sampled_from(["auto", "official-68", "cpu-fp32-8", "cpu-bf16-16"]),
       n=st.integers(1, 32), seed=st.integers(0, 3))
def test_every_method_on_int4_weights_equals_greedy_generate(family, prompt, tree, n, seed):
    model = _quantized(family)
    ids = torch.tensor([prompt])
    ref = hf_greedy(model, ids, n, None)
    for method in msn.METHODS:
        out = msn.generate(model, ids, max_new_tokens=n, method=method, tree=tree, seed=seed)
        assert_equal_or_near_tie(model, ref, out.sequences, f"int4 {family}/{method}/{tree}")


def test_tr_jacobi_on_int4_weights_is_identical_on_a_repetitive_prompt():
    """Exact, not near-tie: retrieval accepts long chains here, so wide tree steps are verified."""
    model = _quantized("llama")
    ids = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 11, 12, 7, 8] * 3])
    ref = hf_greedy(model, ids, 40, None)
    out = msn.generate(model, ids, max_new_tokens=40, method="tr-jacobi", tree="official-68")
    assert torch.equal(out.sequences, ref)
    assert max(out.accept_lengths) >= 2, "precondition: some tree step accepted drafts"


# ---------------------------------------------------------------------------------------------------------
# The real preset (slow)

BF16_LOGIT_ERROR = 0.6  # as tests/test_generate_real.py: bf16 tree logits differ from sequential ones by up to ~0.6


@pytest.fixture(scope="module")
def smollm2_int4():
    try:
        return msn.load_model("smollm2-135m", dtype="bf16", quantize="int4")
    except Exception as e:  # pragma: no cover - environment without the asset package
        pytest.skip(f"smollm2-135m preset unavailable: {e}")


@pytest.mark.slow
def test_preset_runs_its_gguf_codes_and_tr_jacobi_matches_its_greedy(smollm2_int4, spec_bench_path):
    import json

    model, tok = smollm2_int4
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert kinds == {"Int4Linear"} and isinstance(model.lm_head, nn.Linear)  # GGUF Q8_0 head stays float
    eos = model.generation_config.eos_token_id
    rows = [json.loads(line) for line in open(spec_bench_path)][:2]
    identical = 0
    for r in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
        ref = model.generate(ids, do_sample=False, max_new_tokens=48, eos_token_id=eos, output_logits=True,
                             return_dict_in_generate=True)
        out = msn.generate(model, ids, max_new_tokens=48, method="tr-jacobi", eos_token_id=eos)
        a, b = ref.sequences[0, ids.shape[1]:].tolist(), out.sequences[0, ids.shape[1]:].tolist()
        if a == b:
            identical += 1
            continue
        k = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        top2 = ref.logits[k][0].float().topk(2).values
        assert float(top2[0] - top2[1]) <= BF16_LOGIT_ERROR, f"q{r['question_id']}: not a near-tie at {k}"
    print(f"int4 bf16: {identical}/{len(rows)} identical")
