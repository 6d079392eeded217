"""Several requests in one verification forward (msn.decoding.batch, issue 37).

The invariant: a request decoded in a batch gets exactly what :func:`msn.generate` gives it alone (greedy and
seeded sampling, fp32), whatever joins or leaves beside it; a batch of one is the same forward as a lone request
(bf16 too, bit for bit); a request that fails, fails alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model
from fakes import Enough, StopAfter

import msn
from msn.decoding.batch import Batch, generate_batch, shared_tree_size
from msn.decoding.engine import DecoderState
from msn.errors import MsnError

BATCHABLE = ("llama", "qwen2", "mistral", "gpt2", "phi3")  # gemma3's sliding layers cannot share a forward
_MODELS: dict = {}


def _model(family: str, dtype=torch.float32):
    if (family, dtype) not in _MODELS:
        _MODELS[family, dtype] = tiny_model(family, dtype=dtype)
    return _MODELS[family, dtype]


def _prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompts of different lengths (one of a single token), repetitive so retrieval fires."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.tensor([[7]])]
    for _ in range(n - 1):
        unit = torch.randint(3, TINY_VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        head = torch.randint(3, TINY_VOCAB, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g)
        out.append(torch.cat([head, unit.repeat(int(torch.randint(2, 5, (1,), generator=g)))])[None])
    return out


@pytest.mark.parametrize("family", BATCHABLE)
@pytest.mark.parametrize("method", ["ar", "tr-jacobi", "retrieval", "jacobi"])
def test_each_request_of_a_batch_gets_what_it_gets_alone(family, method):
    model, prompts = _model(family), _prompts(7, seed=len(family))
    alone = [msn.generate(model, p, max_new_tokens=17, method=method) for p in prompts]
    batched = generate_batch(model, prompts, max_batch=3, max_new_tokens=17, method=method)  # joins as others end
    for a, b in zip(alone, batched, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        assert sum(b.accept_lengths) == b.new_tokens and b.steps == len(b.accept_lengths)


def test_mixed_methods_and_trees_share_a_forward():
    model, prompts = _model("llama"), _prompts(4, seed=3)
    settings = [dict(method="ar"), dict(method="tr-jacobi"), dict(method="tr-jacobi", tree="cpu-fp32-8"),
                dict(method="retrieval", max_new_tokens=5)]
    with Batch(model) as batch:
        members = [batch.add(p, **{"max_new_tokens": 20, **kw}) for p, kw in zip(prompts, settings, strict=True)]
        while len(batch):
            batch.step()
    for p, kw, m in zip(prompts, settings, members, strict=True):
        alone = msn.generate(model, p, **{"max_new_tokens": 20, **kw})
        assert m.error is None and torch.equal(m.output.sequences, alone.sequences)


def test_seeded_sampling_in_a_batch_is_what_each_seed_gives_alone():
    model, prompts = _model("qwen2"), _prompts(3, seed=5)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95)
    with Batch(model) as batch:
        members = [batch.add(p, seed=10 + i, **kw) for i, p in enumerate(prompts)]
        while len(batch):
            batch.step()
    for i, (p, m) in enumerate(zip(prompts, members, strict=True)):
        assert torch.equal(m.output.sequences, msn.generate(model, p, seed=10 + i, **kw).sequences)


def test_a_batch_of_one_is_the_lone_request_bit_for_bit_in_bf16():
    model = _model("llama", torch.bfloat16)
    (p,) = _prompts(2, seed=1)[1:]
    for tree in ("cpu-fp32-8", None):  # the auto tree's sizes follow measured step times, so only its text
        alone = msn.generate(model, p, max_new_tokens=24, tree=tree, state=DecoderState())
        (out,) = generate_batch(model, [p], max_new_tokens=24, tree=tree, state=DecoderState())
        assert torch.equal(alone.sequences, out.sequences)
        if tree is not None:
            assert alone.accept_lengths == out.accept_lengths and alone.tree_sizes == out.tree_sizes


def test_a_request_that_fails_mid_batch_fails_alone_and_frees_its_row():
    model, prompts = _model("mistral"), _prompts(3, seed=7)
    with Batch(model) as batch:
        ok = [batch.add(prompts[0], max_new_tokens=20), batch.add(prompts[2], max_new_tokens=20)]
        bad = batch.add(prompts[1], max_new_tokens=20, streamer=StopAfter(2))
        left = []
        while len(batch):
            left += batch.step()
            assert len(batch.kv.lengths) == len(batch)  # a row per member still in the batch
            assert batch.kv.lengths == [m.decoder.length - 1 for m in batch.members]
    assert isinstance(bad.error, Enough) and bad.output is None and left[0] is bad
    for p, m in zip((prompts[0], prompts[2]), ok, strict=True):
        assert torch.equal(m.output.sequences, msn.generate(model, p, max_new_tokens=20).sequences)


def test_a_cancelled_request_leaves_at_once_and_the_others_continue():
    model, prompts = _model("gpt2"), _prompts(3, seed=9)
    with Batch(model) as batch:
        members = [batch.add(p, max_new_tokens=15) for p in prompts]
        batch.step()
        batch.remove(members[1])
        assert len(batch) == 2 and len(batch.kv.lengths) == 2
        while len(batch):
            batch.step()
    assert members[1].output is None and members[1].error is None
    for i in (0, 2):
        assert torch.equal(members[i].output.sequences, msn.generate(model, prompts[i], max_new_tokens=15).sequences)


def test_bad_requests_and_models_are_refused_with_one_line():
    with pytest.raises(MsnError, match="sliding-window"):
        Batch(tiny_model("gemma3"))
    model = _model("llama")
    with pytest.raises(MsnError, match="inside a with block"):
        Batch(model).add(torch.tensor([[5, 6]]))
    with Batch(model) as batch:
        with pytest.raises(MsnError, match="max_new_tokens"):
            batch.add(torch.tensor([[5, 6]]), max_new_tokens=0)
        with pytest.raises(MsnError, match="compile=True cannot be batched"):
            batch.add(torch.tensor([[5, 6]]), compile=True)
        with pytest.raises(MsnError, match="unknown"):
            batch.add(torch.tensor([[5, 6]]), max_new_token=4)
        assert len(batch) == 0 and batch.kv.lengths == []
    for bad in (0, -1, True, 2.5):
        with pytest.raises(MsnError, match="max_batch"):
            generate_batch(model, [torch.tensor([[5]])], max_batch=bad)


def test_the_shared_tree_size_is_a_lone_requests_choice_for_one_and_shrinks_with_more():
    from msn.decoding.trie import choose_size

    q = [0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02]
    expected = [1.0]
    for v in q:
        expected.append(expected[-1] + v)

    def seconds(tokens: int) -> float:  # flat to 8 tokens, then linear: a CPU's t(n) shape
        return 0.02 + 0.002 * max(tokens - 8, 0)

    assert shared_tree_size([expected], seconds) == choose_size(q, [seconds(1 + n) for n in range(len(q) + 1)])
    sizes = [shared_tree_size([expected] * b, seconds) for b in (1, 2, 4, 8, 16)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert shared_tree_size([expected] * 16, lambda t: 0.001 * t) == 0  # every token costs: plain batched decoding
    # a static tree 9 wide rides along: its width is paid anyway, so the auto trees fill it
    assert shared_tree_size([expected] * 4, seconds, fixed=1, fixed_tokens=3.0, fixed_width=9) >= 8


def test_batched_steps_learn_their_cost_and_a_lone_one_refines_the_curve():
    model, prompts = _model("llama"), _prompts(3, seed=11)
    state = DecoderState()
    with Batch(model, state=state) as batch:
        batch.add(prompts[1], max_new_tokens=6)
        batch.step()  # one row: the curve's own shape
        assert state.batch_scale == 1.0 and state.latency.steps == 1
        batch.add(prompts[2], max_new_tokens=6)
        batch.step()  # two rows: the batch's own correction, the one-row curve untouched
        assert state.batch_scale != 1.0 and state.latency.steps == 1


def test_a_stale_curve_is_not_measured_again_while_others_decode(monkeypatch):
    from msn.decoding import costs

    model, prompts = _model("qwen2"), _prompts(3, seed=12)
    state = DecoderState()
    calls = []
    real = costs.remeasure
    with Batch(model, state=state) as batch:
        batch.add(prompts[1], max_new_tokens=4)  # loads (or first measures) the curve
        monkeypatch.setattr(costs, "remeasure", lambda *a, **k: calls.append(1) or real(*a, **k))
        state.latency.drift, state.latency.steps = 5.0, 100  # stale: forwards ran 5x the curve
        batch.add(prompts[2], max_new_tokens=4)  # a measurement now would stall the first request for seconds
        assert calls == [] and state.latency.stale
        while len(batch):
            batch.step()
        batch.add(prompts[1], max_new_tokens=2)  # alone again: measured as msn.generate would
        assert calls == [1]


def test_a_server_batch_never_measures_a_stale_curve_again(monkeypatch):
    from msn.decoding import costs

    model, prompts = _model("phi3"), _prompts(2, seed=13)
    state = DecoderState()
    calls = []
    real = costs.remeasure
    with Batch(model, state=state, measure_in_requests=False) as batch:
        batch.add(prompts[1], max_new_tokens=2)  # loads (or first measures) the curve
        monkeypatch.setattr(costs, "remeasure", lambda *a, **k: calls.append(1) or real(*a, **k))
        while len(batch):
            batch.step()
        state.latency.drift, state.latency.steps = 5.0, 100
        batch.add(prompts[1], max_new_tokens=4)  # alone, but a server's request never measures
        while len(batch):
            batch.step()
    assert calls == [] and state.latency.steps > 100  # the steps refine the curve instead
