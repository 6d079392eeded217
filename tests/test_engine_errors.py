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
        ("no-such-preset", "a preset"),
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


# ---------------------------------------------------------------------------------------------------------
# No keyword is silently ignored; no input silently reinterpreted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_token": 5}, "max_new_token"),  # a typo must not run with the default length
        ({"num_beams": 4}, "num_beams"),
        ({"temperature": 0.7}, "only apply to sampling"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"do_sample": True, "top_p": 1.5}, "top_p"),
        ({"do_sample": True, "top_k": -1}, "top_k"),
        ({"max_new_tokens": 5.0}, "integer"),
        ({"max_new_tokens": True}, "integer"),
        ({"attention_mask": torch.tensor([[0, 1, 1]])}, "padding"),
        ({"attention_mask": torch.tensor([[1, 1]])}, r"attention_mask has shape \(1, 2\) but input_ids has \(1, 3\)"),
    ],
)
def test_unknown_or_unsupported_keywords_raise(guarded, kwargs, match):
    model = guarded()
    with pytest.raises(MsnError, match=match):
        msn.generate(model, torch.tensor([[5, 6, 7]]), **kwargs)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[5.0, 6.0]]), "integer"),
        ([[5, 6.5]], "integer"),
        ("5 6", "tensor"),
        (torch.tensor([[5, 6, 100000]]), "vocabulary"),
        (torch.tensor([[-1, 6]]), "vocabulary"),
    ],
)
def test_bad_ids_are_refused(guarded, ids, match):
    with pytest.raises(MsnError, match=match):
        msn.generate(guarded(), ids, max_new_tokens=3)


def test_rank_beyond_the_vocabulary_is_refused_before_any_forward(guarded):
    with pytest.raises(MsnError, match="rank 200"):
        msn.generate(guarded(), torch.tensor([[5, 6]]), tree={"jacobi": [[200]], "retrieval": 0})


def test_all_ones_mask_and_list_ids_are_fine():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    ref = msn.generate(model, ids, max_new_tokens=6, method="ar").sequences
    got = msn.generate(model, [[5, 6, 7, 5, 6]], max_new_tokens=6, attention_mask=torch.ones_like(ids))
    assert torch.equal(got.sequences, ref)


def test_training_mode_model_decodes_as_in_eval_and_stays_in_training():
    model = tiny_model("llama")
    for m in model.modules():  # dropout that would change the output if left on
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    ref = msn.generate(model, ids, max_new_tokens=12, method="tr-jacobi", tree="official-68").sequences
    model.train()
    noisy = model(ids).logits, model(ids).logits
    assert not torch.equal(*noisy), "precondition: in training mode the forward is random"
    got = msn.generate(model, ids, max_new_tokens=12, method="tr-jacobi", tree="official-68").sequences
    assert torch.equal(got, ref)
    assert model.training, "the caller's mode is restored"
