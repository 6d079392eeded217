"""Bad requests are refused with a clear MsnError before any forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import msn
from msn.decoding.tree import TreeError
from msn.errors import MsnError


@pytest.fixture
def guarded():
    """A tiny model whose forward fails the test if it is ever called."""
    models = []

    def make(family="llama", **config):
        model = tiny_model(family, seed=0)
        for k, v in config.items():
            setattr(model.config, k, v)

        def no_compute(*args, **kwargs):
            raise AssertionError("a forward pass ran before the request was refused")

        handle = model.register_forward_pre_hook(no_compute)
        models.append(handle)
        return model

    yield make
    for h in models:
        h.remove()


def refuse(model, ids, match, **kw):
    with pytest.raises(MsnError, match=match):
        msn.generate(model, ids, **kw)


def test_empty_prompt(guarded):
    refuse(guarded(), torch.zeros(1, 0, dtype=torch.long), "empty prompt", max_new_tokens=4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_plus_new_tokens_beyond_context(guarded, family):
    model = guarded(family)
    refuse(
        model,
        torch.full((1, 500), 5),
        r"500 tokens\) \+ max_new_tokens \(13\) = 513 exceeds .* 512",
        max_new_tokens=13,
    )
    refuse(model, torch.full((1, 512), 5), "exceeds", max_new_tokens=1, method="ar")


def test_exactly_the_context_is_fine():
    model = tiny_model("gpt2", seed=0)
    ids = torch.randint(3, 100, (1, 505), generator=torch.Generator().manual_seed(0))
    out = msn.generate(model, ids, max_new_tokens=7, method="tr-jacobi", tree="cpu-fp32-8", eos_token_id=[])
    assert out.sequences.shape == (1, 512)
    assert torch.equal(
        out.sequences,
        model.generate(ids, do_sample=False, max_new_tokens=7, eos_token_id=None, pad_token_id=0),
    )


def test_batch_size_above_one(guarded):
    refuse(guarded(), torch.full((2, 5), 5), "batch size 2 is not supported yet", max_new_tokens=4)


def test_wrong_rank_and_bad_lengths(guarded):
    model = guarded()
    refuse(model, torch.full((5,), 5), r"shape \[batch, length\]", max_new_tokens=4)
    refuse(model, torch.full((1, 5), 5), "max_new_tokens must be >= 1", max_new_tokens=0)
    refuse(model, torch.full((1, 5), 5), "unknown method 'beam'", max_new_tokens=4, method="beam")


@pytest.mark.parametrize("method", ["jacobi", "retrieval", "tr-jacobi"])
def test_flash_attention_is_refused(guarded, method):
    model = guarded(_attn_implementation="flash_attention_2")
    refuse(
        model,
        torch.full((1, 5), 5),
        "flash_attention_2.*ignores 4-D attention masks",
        max_new_tokens=4,
        method=method,
    )


def test_model_without_4d_mask_support_is_refused(guarded):
    model = guarded(_attn_implementation="flex_attention")
    model._supports_attention_backend = False
    refuse(model, torch.full((1, 5), 5), "does not support custom 4-D attention masks", max_new_tokens=4)


def test_sliding_window_overflow_is_refused(guarded):
    model = guarded("mistral", sliding_window=32)
    refuse(
        model, torch.full((1, 20), 5), "exceeds the sliding window of 32", max_new_tokens=8, tree="cpu-fp32-8"
    )


@pytest.mark.parametrize(
    "tree, match",
    [
        ({"jacobi": [[0], [0, 1, 0]]}, "gap in depth"),
        ({"jacobi": [[0], [0]]}, "twice"),
        ({"nodes": [[2, 0], [1, 0]]}, "cycle"),
        ({"jacobi": [[0] * d for d in range(1, 18)]}, "maximum draft depth"),
        ("no-such-preset", "not a preset"),
    ],
)
def test_invalid_tree_is_refused(guarded, tree, match):
    with pytest.raises(TreeError, match=match):
        msn.generate(guarded(), torch.full((1, 5), 5), max_new_tokens=4, tree=tree)


def test_malformed_tree_file_is_refused(guarded, tmp_path):
    f = tmp_path / "mytree.json"
    f.write_text('{"jacobi": [[0]],\n "retrieval": }\n')
    with pytest.raises(TreeError, match=r"mytree\.json:2: malformed JSON"):
        msn.generate(guarded(), torch.full((1, 5), 5), max_new_tokens=4, tree=str(f))


def test_errors_are_single_clear_lines(guarded):
    with pytest.raises(MsnError) as e:
        msn.generate(guarded(), torch.full((3, 5), 5), max_new_tokens=4)
    assert "\n" not in str(e.value) and "not supported yet" in str(e.value)
