"""Python API arguments: every value msn cannot honour is one clear MsnError naming the argument, before any
forward pass, also through ``model.generate(ids, custom_generate=msn.generate, ...)``; the values
transformers passes by default keep working."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList

import msn
from msn.decoding.engine import DecoderState
from msn.decoding.sampling import Sampling, sampling_from
from msn.errors import MsnError

IDS = torch.tensor([[5, 6, 7, 8]])

# max_new_tokens goes to msn.generate (a custom_generate keyword), so transformers warns about its own default
# max_length; the output length is still max_new_tokens.
pytestmark = pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`:UserWarning")


class StopNow(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.ones(input_ids.shape[0], dtype=torch.bool)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def guarded(model):
    """The tiny model, failing the test if a forward pass runs (a refusal must come before any compute)."""

    def no_compute(*args, **kwargs):
        raise AssertionError("a forward pass ran before the request was refused")

    handle = model.register_forward_pre_hook(no_compute)
    yield model
    handle.remove()


def refused(model, match, ids=IDS, **kw):
    with pytest.raises(MsnError, match=match) as e:
        msn.generate(model, ids, **kw)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# 1. transformers arguments msn would drop through custom_generate


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stopping_criteria": StoppingCriteriaList([StopNow()])}, r"stopping_criteria \(StopNow\).*eos_token_id"),
        ({"stopping_criteria": StoppingCriteriaList([MaxLengthCriteria(6)])}, r"stopping_criteria \(MaxLength"),
        ({"max_time": 0.0}, r"max_time=0\.0 is not supported.*max_new_tokens"),
        ({"return_dict_in_generate": True}, r"return_dict_in_generate=True.*msn\.generate\(model, ids"),
        ({"output_scores": True}, "output_scores=True is not supported"),
        ({"output_logits": True}, "output_logits=True is not supported"),
        ({"output_attentions": True}, "output_attentions=True is not supported"),
        ({"output_hidden_states": True}, "output_hidden_states=True is not supported"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha=0.6 is not supported"),
        ({"num_beams": 4}, "num_beams=4 is not supported"),
        ({"num_return_sequences": 3, "do_sample": True}, "num_return_sequences=3 is not supported"),
    ],
)
def test_custom_generate_refuses_what_it_would_drop(guarded, kwargs, match):
    with pytest.raises(MsnError, match=match) as e:
        guarded.generate(IDS, custom_generate=msn.generate, max_new_tokens=5, **kwargs)
    assert "\n" not in str(e.value)


def test_custom_generate_keeps_transformers_defaults(model):
    ref = model.generate(IDS, do_sample=False, max_new_tokens=5)
    got = model.generate(
        IDS, custom_generate=msn.generate, max_new_tokens=5, do_sample=False, method="tr-jacobi",
        stopping_criteria=StoppingCriteriaList(), max_time=None, return_dict_in_generate=False,
        output_scores=False, output_logits=None, output_attentions=False, output_hidden_states=False,
        penalty_alpha=None, num_beams=1, num_return_sequences=1,
    )
    assert torch.equal(got, ref)
    # the length from max_length alone (transformers' MaxLengthCriteria, applied by msn itself)
    assert torch.equal(model.generate(IDS, custom_generate=msn.generate, max_length=8), ref[:, :8])


def test_custom_generate_takes_an_attention_mask(model):
    """A tokenizer's output (``**enc``) carries an attention mask: all 1s is fine, padding is refused."""
    ref = model.generate(IDS, do_sample=False, max_new_tokens=5)
    got = model.generate(IDS, custom_generate=msn.generate, attention_mask=torch.ones_like(IDS), max_new_tokens=5)
    assert torch.equal(got, ref)
    with pytest.raises(MsnError, match="attention_mask with padding"):
        model.generate(IDS, custom_generate=msn.generate, attention_mask=torch.tensor([[0, 1, 1, 1]]),
                       max_new_tokens=5)


# ---------------------------------------------------------------------------------------------------------
# 2. a list of rows is a batch


@pytest.mark.parametrize(
    "ids, match",
    [
        ([[1, 2, 3], [4, 5, 6]], "batch size 2 is not supported yet"),
        (([1, 2, 3], [4, 5, 6], [7, 8, 9]), "batch size 3 is not supported yet"),
        ([[1, 2, 3], [4]], r"ragged list of 2 rows \(lengths 3, 1\).*one list of token ids"),
        ([[1, 2], 3], "non-integers"),
        ([[1, 2**70]], "outside the vocabulary"),
    ],
)
def test_list_batches_are_refused_like_batch_tensors(guarded, ids, match):
    refused(guarded, match, ids=ids, max_new_tokens=3)


def test_one_row_lists_still_work(model):
    ref = msn.generate(model, IDS, max_new_tokens=4).sequences
    assert torch.equal(msn.generate(model, [[5, 6, 7, 8]], max_new_tokens=4).sequences, ref)
    assert torch.equal(msn.generate(model, [5, 6, 7, 8], max_new_tokens=4).sequences, ref)


# ---------------------------------------------------------------------------------------------------------
# 3. seed


@pytest.mark.parametrize("seed", [99999999999999999999999, 2**64, -1, "a", 1.5, None, True])
@pytest.mark.parametrize("do_sample", [False, True])
def test_bad_seed_is_refused(guarded, seed, do_sample):
    refused(guarded, r"seed must be an integer in \[0, 2\*\*64 - 1\]", max_new_tokens=3, seed=seed,
            do_sample=do_sample)


def test_largest_seed_is_fine(model):
    a = msn.generate(model, IDS, max_new_tokens=4, do_sample=True, seed=2**64 - 1, method="ar").sequences
    b = msn.generate(model, IDS, max_new_tokens=4, do_sample=True, seed=2**64 - 1).sequences
    assert torch.equal(a, b)


def test_cli_seed_beyond_64_bits_is_one_line(monkeypatch, capsys, model):
    from fakes import ByteChatTokenizer

    import msn.models
    from msn.cli import main

    monkeypatch.setattr(msn.models, "load_model", lambda *a, **k: (model, ByteChatTokenizer()))
    for sampled in ((), ("--temperature", "0.7")):
        rc = main(["generate", "--prompt", "hi", "--max-new-tokens", "3", "--no-stream",
                   "--seed", "99999999999999999999999", *sampled])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "seed must be an integer" in err and "\n" not in err


# ---------------------------------------------------------------------------------------------------------
# 4. values of the wrong type


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"do_sample": "no"}, "do_sample must be True or False, got 'no'"),
        ({"do_sample": "False"}, "do_sample must be True or False"),
        ({"do_sample": 1}, "do_sample must be True or False"),
        ({"compile": "no"}, "compile must be True, False or None, got 'no'"),
        ({"pack": 0}, "pack must be True, False or None, got 0"),
        ({"pack": "no"}, "pack must be True, False or None"),
        ({"do_sample": True, "temperature": True}, "temperature must be > 0 and finite"),
        ({"do_sample": True, "top_p": True}, r"top_p must be in \[0, 1\], got True"),
        ({"do_sample": True, "min_p": False}, r"min_p must be in \[0, 1\], got False"),
        ({"do_sample": True, "top_k": True}, "top_k must be an integer >= 0, got True"),
    ],
)
def test_wrong_types_are_refused(guarded, kwargs, match):
    refused(guarded, match, max_new_tokens=3, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# 5. errors that name the argument


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eos_token_id": "x"}, r"eos_token_id must be a token id .* got 'x'"),
        ({"eos_token_id": [2, "x"]}, "eos_token_id must be a token id"),
        ({"eos_token_id": -1}, "eos_token_id must be a token id"),
        ({"eos_token_id": torch.tensor([2.0])}, "eos_token_id must be a token id"),
        ({"streamer": 1}, r"streamer must be an object with put\(\) and end\(\).*got int"),
        ({"state": 1}, r"state must be a msn\.decoding\.engine\.DecoderState.*got int"),
        ({"attention_mask": torch.ones(1, 2)}, r"attention_mask has shape \(1, 2\) but input_ids has \(1, 4\)"),
        ({"attention_mask": "abc"}, "attention_mask must be a"),
        ({"eos_token_id": 10**9}, r"eos_token_id 1000000000 is outside the vocabulary 0\.\.127"),
        ({"eos_token_id": [2, 128]}, "eos_token_id 128 is outside the vocabulary"),
    ],
)
def test_bad_values_name_the_argument(guarded, kwargs, match):
    refused(guarded, match, max_new_tokens=3, **kwargs)


def test_accepted_forms_still_work(model):
    ref = msn.generate(model, IDS, max_new_tokens=4, eos_token_id=[]).sequences
    for eos in (2, [2, 3], (2,), {2}, torch.tensor([2, 3]), torch.tensor(2)):
        assert msn.generate(model, IDS, max_new_tokens=4, eos_token_id=eos).sequences.shape[0] == 1
    got = msn.generate(model, IDS, max_new_tokens=4, eos_token_id=[], state=DecoderState(), compile=False,
                       pack=False, attention_mask=[[1, 1, 1, 1]]).sequences
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------------------
# 6. non-finite sampling settings


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"temperature": float("inf")}, "temperature must be > 0 and finite"),
        ({"temperature": float("nan")}, "temperature must be > 0 and finite"),
        ({"temperature": 1e-300}, "temperature 1e-300 is below 1e-06: that is greedy decoding"),  # was token 0
        ({"temperature": 1e-38}, "use do_sample=False"),
        ({"temperature": 5e-324}, "is below 1e-06"),
        ({"top_p": float("nan")}, "top_p must be in"),
        ({"min_p": float("inf")}, "min_p must be in"),
    ],
)
def test_non_finite_sampling_settings_are_refused(guarded, settings, match):
    refused(guarded, match, max_new_tokens=3, do_sample=True, **settings)
    with pytest.raises(MsnError, match=match):
        sampling_from(settings)  # what the CLI flags go through, before any model loads


def test_the_smallest_temperature_still_samples(model):
    """The floor refuses only what overflows or is greedy in all but ties; 1e-6 samples, and equals greedy here."""
    greedy = msn.generate(model, IDS, max_new_tokens=4, eos_token_id=[]).sequences
    cold = msn.generate(model, IDS, max_new_tokens=4, eos_token_id=[], do_sample=True, temperature=1e-6, seed=3)
    assert torch.equal(cold.sequences, greedy)


def test_a_tokenizer_or_an_unloaded_model_is_named_not_a_traceback(smollm2_tokenizer):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    with pytest.raises(MsnError, match="model must be a loaded causal LM.*got .*Token.*takes the model first"):
        msn.generate(smollm2_tokenizer, IDS, max_new_tokens=3)
    with pytest.raises(MsnError, match="model must be a loaded causal LM.*got str"):
        msn.generate("smollm2-135m", IDS, max_new_tokens=3)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(MsnError, match="weights on the meta device.*load the weights first"):
        msn.generate(meta, IDS, max_new_tokens=3)


def test_sampling_refuses_a_bad_seed():
    with pytest.raises(MsnError, match="seed must be an integer"):
        Sampling(seed=2**64)
