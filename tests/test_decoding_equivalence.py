"""Losslessness: every method's output equals transformers' greedy ``generate``, token for token.

Tiny random-weight models of six families, fp32, random prompts (repetitive ones so retrieval fires),
random trees, random ``max_new_tokens`` and EOS ids taken from the greedy continuation so the stop is
exercised. A mismatch is only excused at an exact near-tie of the AR logits (top-2 gap < 1e-5), and then
it is reported as a warning.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import FAMILIES, TINY_VOCAB, tiny_model
from helpers import tree_templates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.streamers import BaseStreamer

import msn

NEAR_TIE = 1e-5
EXAMPLES = int(os.environ.get("MSN_EQUIV_EXAMPLES", "10"))  # per family; raise it for a longer bug hunt
_MODELS: dict = {}


def _model(family: str, seed: int = 0):
    if (family, seed) not in _MODELS:
        _MODELS[family, seed] = tiny_model(family, seed)
    return _MODELS[family, seed]


@st.composite
def prompts(draw):
    tok = st.integers(3, TINY_VOCAB - 1)
    if draw(st.booleans()):
        return draw(st.lists(tok, min_size=1, max_size=24))
    unit = draw(st.lists(tok, min_size=1, max_size=6))
    return (
        draw(st.lists(tok, max_size=4))
        + unit * draw(st.integers(2, 4))
        + unit[: draw(st.integers(0, len(unit)))]
    )


def hf_greedy(model, ids, n, eos):
    kw = {} if eos is None else {"eos_token_id": eos}
    return model.generate(ids.to(model.device), do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)


def ar_gap(model, prefix: torch.Tensor) -> float:
    top = model(prefix.to(model.device)).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


def assert_equal_or_near_tie(model, ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    if torch.equal(ref, got):
        return
    r, g = ref[0].tolist(), got[0].tolist()
    k = next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), None)
    # one a prefix of the other is a stopping bug, never a tie
    gap = float("inf") if k is None else ar_gap(model, ref[:, :k])
    assert gap < NEAR_TIE, f"{what}: differs from greedy at position {k} (AR top-2 gap {gap:.3g})\n{r}\n{g}"
    warnings.warn(f"{what}: near-tie at position {k} (AR top-2 gap {gap:.2e}): excused", stacklevel=2)


def check_stop_rules(out, prompt_len: int, n: int, eos: set[int]) -> None:
    new = out.sequences[0, prompt_len:].tolist()
    assert out.new_tokens == len(new) <= n
    assert sum(out.accept_lengths) == len(new) and all(a >= 1 for a in out.accept_lengths)
    assert out.steps == len(out.accept_lengths)
    assert not any(t in eos for t in new[:-1]), "nothing after EOS"
    if len(new) < n:
        assert new[-1] in eos, "stopped early without EOS"


def check_sources(out, method: str) -> None:
    """Every accepted draft token is credited to the source(s) that drafted it, and only to those."""
    if method == "ar" or not out.tree.sources:  # no draft source: plain decoding
        assert out.accepted_by_source == {} == out.sole_by_source and out.jacobi_accepted is None
        assert out.tree_sizes == []
        return
    names = sorted(out.accepted_by_source)
    assert names == sorted(msn.decoding.sources.SOURCES)
    own = set(msn.decoding.tree.METHOD_SOURCES[method])
    assert len(out.tree_sizes) == out.steps
    for i, a in enumerate(out.accept_lengths):
        last = i == out.steps - 1
        drafts = (a - 1, a) if last else (a - 1,)  # the last step may be cut before its bonus token
        credited = [out.accepted_by_source[n][i] for n in names]
        nodes = {n: out.nodes_by_source[n][i] for n in names}
        assert any(max(credited) <= k <= sum(credited) for k in drafts), (a, credited)
        # sole: drafted by that source alone; every other accepted draft was drafted by two or more sources
        sole = [out.sole_by_source[n][i] for n in names]
        assert all(0 <= x <= c for x, c in zip(sole, credited, strict=True))
        assert any(sum(sole) <= k and sum(credited) - sum(sole) >= 2 * (k - sum(sole)) for k in drafts)
        assert sum(nodes.values()) >= out.tree_sizes[i] >= max(nodes.values())
        for n in names:
            assert out.accepted_by_source[n][i] <= nodes[n]
            if n not in own:
                assert nodes[n] == 0
        if len(own) == 1:
            assert out.accepted_by_source[next(iter(own))][i] in drafts
            assert out.sole_by_source[next(iter(own))][i] == out.accepted_by_source[next(iter(own))][i]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=prompts(),
    tree=st.one_of(tree_templates(), st.sampled_from(["auto", "official-68", "cpu-fp32-8", "cpu-bf16-16"])),
    n=st.integers(1, 32),
    eos_choice=st.one_of(st.none(), st.integers(0, 31), st.tuples(st.integers(0, 31))),
    seed=st.integers(0, 3),
)
def test_every_method_equals_greedy_generate(family, prompt, tree, n, eos_choice, seed):
    model = _model(family)
    ids = torch.tensor([prompt])
    ref = hf_greedy(model, ids, n, None)  # the config's EOS (2)
    eos, eos_set = None, {2}
    if eos_choice is not None:
        # An EOS that occurs in the greedy continuation (if there is one), alone or with the config's.
        new = ref[0, len(prompt) :].tolist()
        tok = new[(eos_choice if isinstance(eos_choice, int) else eos_choice[0]) % len(new)]
        eos = tok if isinstance(eos_choice, int) else [tok, 2]
        eos_set = {tok} if isinstance(eos_choice, int) else {tok, 2}
        ref = hf_greedy(model, ids, n, eos)
    for method in msn.METHODS:
        out = msn.generate(
            model, ids, max_new_tokens=n, method=method, tree=tree, eos_token_id=eos, seed=seed
        )
        assert_equal_or_near_tie(model, ref, out.sequences, f"{family}/{method}/{tree}")
        check_stop_rules(out, len(prompt), n, eos_set)
        check_sources(out, method)
        if method == "ar":
            assert out.accept_lengths == [1] * out.new_tokens


def test_eos_inside_an_accepted_path_cuts_the_rest():
    """A repetitive continuation is drafted whole by retrieval; an EOS in the middle of an accepted path
    must end the output right there, and max_new_tokens must cut an accepted path exactly."""
    model = _model("gemma3")  # the tiny gemma3 falls into a short loop: retrieval accepts long chains
    ids = torch.tensor([[40, 41, 42, 43, 40, 41, 42]])
    free = msn.generate(
        model, ids, max_new_tokens=40, method="retrieval", tree="official-68", eos_token_id=[]
    )
    assert max(free.accept_lengths) >= 3, "precondition: retrieval accepts several tokens per step"
    # per-node statistics: a chain node is accepted at most as often as its parent; all accepted drafts counted
    hits = free.node_hits.tolist()
    assert hits[0] == 0 and all(a >= b for a, b in zip(hits[1:], hits[2:], strict=False))
    assert sum(hits) == free.new_tokens - free.steps
    assert sum(free.retrieval_accepted) == sum(hits) and not any(free.jacobi_accepted)
    new = free.sequences[0, ids.shape[1] :].tolist()
    # the EOS is the middle token of a multi-token step
    start = 0
    for a in free.accept_lengths:
        if a >= 3:
            break
        start += a
    eos = new[start + 1]
    stop = new.index(eos)
    for method in msn.METHODS:
        out = msn.generate(model, ids, max_new_tokens=40, method=method, tree="official-68", eos_token_id=eos)
        assert out.sequences[0, ids.shape[1] :].tolist() == new[: stop + 1]
        assert torch.equal(out.sequences, hf_greedy(model, ids, 40, eos))
    for n in range(1, 12):
        out = msn.generate(
            model, ids, max_new_tokens=n, method="tr-jacobi", tree="official-68", eos_token_id=[]
        )
        assert out.sequences[0, ids.shape[1] :].tolist() == new[:n]


# ---------------------------------------------------------------------------------------------------------
# transformers integration: custom_generate and streamers


# max_new_tokens goes to msn.generate (a custom_generate keyword), so transformers warns that it falls back to
# its default max_length for its own bookkeeping; the output length is still max_new_tokens (asserted below).
pytestmark = pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`:UserWarning")


class Collect(BaseStreamer):
    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value):
        assert not self.ended
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("method", msn.METHODS)
def test_custom_generate_equals_plain_greedy(method):
    model = _model("llama", 1)
    ids = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 11, 12, 7, 8] * 3], device=model.device)  # longer than the default max_length (20)
    for n in (1, 17):
        ref = model.generate(ids, do_sample=False, max_new_tokens=n)
        got = model.generate(
            ids, custom_generate=msn.generate, method=method, max_new_tokens=n, do_sample=False
        )
        assert isinstance(got, torch.Tensor) and torch.equal(got, ref)
    # EOS from the continuation, passed the transformers way
    eos = int(ref[0, ids.shape[1] + 5])
    ref = model.generate(ids, do_sample=False, max_new_tokens=17, eos_token_id=eos)
    got = model.generate(
        ids,
        custom_generate=msn.generate,
        method=method,
        tree="official-68",
        max_new_tokens=17,
        eos_token_id=eos,
        do_sample=False,
    )
    assert torch.equal(got, ref) and int(got[0, -1]) == eos


def test_custom_generate_refuses_logit_processors():
    model = _model("llama", 1)
    with pytest.raises(msn.errors.MsnError, match="RepetitionPenaltyLogitsProcessor"):
        model.generate(torch.tensor([[5, 6]]), custom_generate=msn.generate, repetition_penalty=1.3,
                       max_new_tokens=3)


@pytest.mark.parametrize("method", ["ar", "tr-jacobi"])
def test_streamer_gets_prompt_then_new_tokens_in_order(method):
    model = _model("gemma3")
    ids = torch.tensor([[40, 41, 42, 43, 40, 41, 42]])
    s = Collect()
    out = msn.generate(
        model, ids, max_new_tokens=30, method=method, tree="official-68", streamer=s, eos_token_id=[]
    )
    assert s.ended == 1
    assert s.puts[0] == ids[0].tolist()
    assert [len(p) for p in s.puts[1:]] == out.accept_lengths
    assert sum(s.puts, []) == out.sequences[0].tolist()


@pytest.mark.xfail(
    strict=True,
    reason="transformers 5.x drops `streamer` for callable custom_generate (only keys absent from _sample's "
    "signature are forwarded): the streamer sees the prompt, never the new tokens, and never end()",
)
def test_streamer_through_custom_generate():
    model = _model("llama", 1)
    ids = torch.tensor([[7, 8, 9, 10]])
    s = Collect()
    got = model.generate(ids, custom_generate=msn.generate, max_new_tokens=10, do_sample=False, streamer=s)
    assert sum(s.puts, []) == got[0].tolist() and s.ended == 1
