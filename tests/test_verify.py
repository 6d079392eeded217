"""Greedy acceptance, on synthetic tensors and against a brute-force sequential decode of every path."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tree import make_drafts, template_node_tokens, tree_templates

from msn.decoding.cache import cache_keyword, new_cache
from msn.decoding.engine import _tree_mask
from msn.decoding.tree import TreeTemplate, build_buffers, fill_tree
from msn.decoding.verify import greedy_accept

# ---------------------------------------------------------------------------------------------------------
# Synthetic


def reference_accept(
    tokens: list[int], predicted: list[int], paths: list[list[int]]
) -> tuple[int, int, list[int]]:
    """(path row, accepted count, accepted nodes): first path with the longest run of matches."""
    best = (0, -1, [])
    for row, path in enumerate(paths):
        nodes = []
        for a, b in zip(path, path[1:], strict=False):
            if b < 0 or tokens[b] != predicted[a]:
                break
            nodes.append(b)
        if len(nodes) > best[1]:
            best = (row, len(nodes), nodes)
    return best


def test_minus_one_padding_never_matches():
    # root token 5; a one-node path whose node predicts 5 (the root token) next. With 0-padding (the
    # official bug) the pad would "match" and accept the root as a second draft token.
    tokens = torch.tensor([5, 7, 8])
    predicted = torch.tensor([7, 5, 1])
    paths = torch.tensor([[0, 1, -1], [0, 2, -1]])
    acc = greedy_accept(tokens, predicted, paths)
    assert acc.accepted.tolist() == [1] and acc.bonus == 5 and acc.path == 0
    zero_padded = paths.clamp(min=0)
    assert greedy_accept(tokens, predicted, zero_padded).accepted.numel() == 2  # what -1 protects against


def test_nothing_accepted_gives_root_argmax():
    tokens = torch.tensor([5, 7, 8])
    acc = greedy_accept(tokens, torch.tensor([3, 3, 3]), torch.tensor([[0, 1, 2]]))
    assert acc.accepted.numel() == 0 and acc.bonus == 3


def test_ties_go_to_the_first_path():
    tokens = torch.tensor([5, 7, 7])
    predicted = torch.tensor([7, 1, 2])
    acc = greedy_accept(tokens, predicted, torch.tensor([[0, 1], [0, 2]]))
    assert acc.path == 0 and acc.bonus == 1


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_greedy_accept_matches_reference(data):
    t = data.draw(tree_templates(max_nodes=10, max_rank=2))
    buf = build_buffers(t)
    n = buf.num_nodes
    tokens = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    predicted = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    paths = buf.paths.tolist()
    acc = greedy_accept(torch.tensor(tokens), torch.tensor(predicted), buf.paths)
    row, count, nodes = reference_accept(tokens, predicted, paths)
    assert (acc.path, acc.accepted.tolist()) == (row, nodes)
    assert acc.bonus == predicted[paths[row][count]]


# ---------------------------------------------------------------------------------------------------------
# Brute force against the model: a plain full forward over prompt + each path, no cache, no tree

_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=3)
    return _MODELS[family]


def greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def brute_force(model, prompt: list[int], seqs: list[list[int]]) -> tuple[int, list[int]]:
    """Longest accepted prefix over all node sequences and the committed tokens (accepted + bonus)."""
    best_len, best = -1, None
    # one forward per maximal sequence: its argmaxes cover all of its prefixes
    leaves = {tuple(s) for s in seqs if not any(len(o) > len(s) and o[: len(s)] == s for o in seqs)}
    for s in map(list, sorted(leaves)):
        pred = model(torch.tensor([prompt + s])).logits[0, len(prompt) - 1 :].argmax(-1).tolist()
        a = 0
        while a < len(s) and s[a] == pred[a]:
            a += 1
        if a > best_len:
            best_len, best = a, s[:a] + [pred[a]]
    return best_len, best


def tree_step(model, prompt: list[int], t: TreeTemplate, drafts: torch.Tensor, max_depth):
    cache = new_cache(model)
    kw = cache_keyword(model)
    if len(prompt) > 1:
        model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, **{kw: cache})
    past = len(prompt) - 1
    step = fill_tree(build_buffers(t), prompt[-1], drafts, max_depth=max_depth)
    logits = model(
        input_ids=step.tokens[None],
        position_ids=(step.depth + past)[None],
        attention_mask=_tree_mask(step.ancestors, past, torch.float32),
        use_cache=True,
        **{kw: cache},
    ).logits[0]
    return step, logits, greedy_accept(step.tokens, logits.argmax(-1), step.paths)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tree_acceptance_equals_brute_force(family, data):
    model = _model(family)
    t = data.draw(tree_templates(max_nodes=10, max_depth=4, max_rank=3, max_retrieval=4), label="tree")
    prompt = data.draw(st.lists(st.integers(3, TINY_VOCAB - 1), min_size=1, max_size=10), label="prompt")
    max_depth = data.draw(st.none() | st.integers(0, 4), label="max_depth")
    k, d = max(t.top_k, 1), t.jacobi_depth
    truth = greedy_continuation(model, prompt, max(d, t.retrieval))
    # Each table entry is the true greedy token at its depth or a random one, so deep paths get accepted.
    table = torch.tensor(
        [
            [
                truth[i] if data.draw(st.booleans()) else data.draw(st.integers(3, TINY_VOCAB - 1))
                for _ in range(k)
            ]
            for i in range(d)
        ],
        dtype=torch.long,
    ).view(d, k)
    n_chain = data.draw(st.integers(0, t.retrieval))
    chain = [truth[i] if data.draw(st.booleans()) else data.draw(st.integers(3, 50)) for i in range(n_chain)]
    seqs = [[]] + [
        s
        for s in template_node_tokens(t, table, chain)
        if -1 not in s and (max_depth is None or len(s) <= max_depth)
    ]

    step, logits, acc = tree_step(model, prompt, t, make_drafts(t, table, chain), max_depth)
    want_len, want = brute_force(model, prompt, seqs)
    got = step.tokens[acc.accepted].tolist() + [acc.bonus]
    assert acc.accepted.numel() == want_len
    assert got == want
    assert got[: len(truth)] == truth[: len(got)]  # the committed tokens are the greedy continuation


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_merged_tree_gives_the_same_logits_as_unmerged(family):
    """Merging identical siblings changes the forward's size, not any node's logits nor the acceptance."""
    model = _model(family)
    prompt = [9, 17, 33, 9, 17]
    truth = greedy_continuation(model, prompt, 3)
    t = TreeTemplate(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)), 3)
    table = torch.tensor([[truth[0], 40], [truth[1], 41], [truth[2], 42]])
    drafts = make_drafts(t, table, truth[:3])  # the chain repeats the top-1 Jacobi path: fully merged
    merged, logits_m, acc_m = tree_step(model, prompt, t, drafts, None)
    assert merged.tokens.numel() == 7 < build_buffers(t).num_nodes == 10

    # The same step without merging: every template node, template ancestors and paths.
    buf = build_buffers(t)
    tokens = torch.cat([torch.tensor([prompt[-1]]), drafts[buf.source[1:]]])
    cache = new_cache(model)
    kw = cache_keyword(model)
    model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, **{kw: cache})
    logits_u = model(
        input_ids=tokens[None],
        position_ids=(buf.depth + len(prompt) - 1)[None],
        attention_mask=_tree_mask(buf.ancestors, len(prompt) - 1, torch.float32),
        use_cache=True,
        **{kw: cache},
    ).logits[0]
    acc_u = greedy_accept(tokens, logits_u.argmax(-1), buf.paths)
    torch.testing.assert_close(logits_m[merged.compact_of], logits_u, rtol=1e-4, atol=1e-4)
    assert merged.tokens[acc_m.accepted].tolist() == tokens[acc_u.accepted].tolist() == truth[:3]
    assert acc_m.bonus == acc_u.bonus
