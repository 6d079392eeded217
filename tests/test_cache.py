"""KV cache keep: after a tree forward, keeping root + one path must equal having decoded that path."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, TINY_VOCAB, tiny_model
from helpers import by_score, draft_from_paths, random_drafts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msn.decoding import trie as trie_mod
from msn.decoding.cache import cache_keyword, keep_step_entries, new_cache
from msn.decoding.trie import tree_mask as _tree_mask

_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=5)
    return _MODELS[family]


def step_tree(root: int, drafts) -> trie_mod.StepTree:
    trie = trie_mod.merge(root, drafts, by_score)
    return trie_mod.compact(trie, *trie_mod.select(trie, None))


def tree_forward(model, cache, tree: trie_mod.StepTree, past: int):
    return model(
        input_ids=torch.tensor([tree.tokens]),
        position_ids=(torch.tensor(tree.depths) + past)[None],
        attention_mask=_tree_mask(tree.ancestors("cpu"), past, model.dtype),
        use_cache=True,
        **{cache_keyword(model): cache},
    ).logits[0]


def keep_then_next(model, prompt: list[int], tree: trie_mod.StepTree, leaf_path: list[int], nxt: int):
    """Prefill, one tree step, keep root + ``leaf_path`` (compact indices), then one ordinary decode step."""
    cache = new_cache(model)
    kw = cache_keyword(model)
    model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, **{kw: cache})
    tree_forward(model, cache, tree, len(prompt) - 1)
    assert cache.get_seq_length() == len(prompt) - 1 + len(tree)
    keep_step_entries(cache, len(tree), torch.tensor([0] + leaf_path, dtype=torch.long))
    assert cache.get_seq_length() == len(prompt) + len(leaf_path)
    kept = [tree.tokens[i] for i in leaf_path]
    logits = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{kw: cache}).logits[0, -1]
    fresh = model(input_ids=torch.tensor([prompt + kept + [nxt]])).logits[0, -1]
    return logits, fresh


# Two sources whose drafts share a prefix (20 -> 30): merged, the step tree is
# 0 root(13), 1=20, 2=30 (under 20), 3=40 (under 30), 4=21, 5=31 (under 21), 6=22, 7=33 (under 20)
DRAFTS = {
    "jacobi": draft_from_paths([(20, 30, 40), (21, 31), (22,)]),
    "retrieval": draft_from_paths([(20, 30), (20, 33)]),
}
TREE = step_tree(13, DRAFTS)


def test_the_hand_made_tree():
    assert TREE.tokens == [13, 20, 30, 40, 21, 31, 22, 33]
    assert TREE.parents == [-1, 0, 1, 2, 0, 4, 0, 1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("leaf_path", [[1, 2, 3], [4, 5], [6], [], [1], [1, 7]], ids=str)
def test_keep_equals_fresh_forward(family, leaf_path):
    model = _model(family)
    logits, fresh = keep_then_next(model, [9, 10, 11, 12, 13], TREE, leaf_path, 50)
    assert int(logits.argmax()) == int(fresh.argmax())
    torch.testing.assert_close(logits, fresh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_keep_random_paths(family, data):
    model = _model(family)
    drafts = data.draw(random_drafts(max_nodes=5, vocab=40))
    prompt = data.draw(st.lists(st.integers(3, TINY_VOCAB - 1), min_size=2, max_size=12))
    tree = step_tree(prompt[-1], drafts)
    node = data.draw(st.integers(0, len(tree) - 1))
    path = []
    while node:
        path.insert(0, node)
        node = tree.parents[node]
    logits, fresh = keep_then_next(model, prompt, tree, path, 60)
    torch.testing.assert_close(logits, fresh, rtol=1e-4, atol=1e-4)


def test_sliding_window_layers_record_their_past():
    cache = new_cache(_model("gemma3"))
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    assert sliding, "tiny gemma3 has sliding layers"
    # transformers >= 5 can record the past of sliding layers (we must, to drop rejected tree tokens); 4.57
    # has no such switch, and msn refuses tree decoding beyond the window there and everywhere.
    assert all(layer.record_past for layer in sliding if hasattr(layer, "record_past"))
    assert any(hasattr(layer, "record_past") for layer in sliding) == hasattr(
        __import__("transformers.cache_utils").cache_utils.DynamicSlidingWindowLayer, "activate_past_recording"
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_cache_appends_in_place_and_holds_what_a_plain_cache_holds(family):
    """DynamicKV's layers grow into spare room (no copy of the whole cache per step, cache.growing): after a
    prefill, tree steps cut back by keep and one-token steps, every layer holds exactly what transformers' own
    concatenating cache holds, and the buffer was allocated once."""
    from msn.decoding.cache import DynamicKV, _kv_pairs

    model = _model(family)
    prompt = [5, 9, 13, 2, 7, 11]
    kv, plain = DynamicKV(model), new_cache(model)
    kv.prefill(torch.tensor([prompt[:-1]]))
    model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, **{cache_keyword(model): plain})
    past, buffers = len(prompt) - 1, None
    for i, (tokens, keep) in enumerate([([13, 20, 30, 40, 21], [0, 1, 2]), ([4], None), ([8, 3, 6], [0, 2])]):
        tree = step_tree(tokens[0], {"jacobi": draft_from_paths([tuple(tokens[1:])])}) if len(tokens) > 1 else None
        if tree is None:
            ids, positions, ancestors = torch.tensor(tokens), torch.tensor([past]), None
        else:
            ids, positions, ancestors = (torch.tensor(tree.tokens), torch.tensor(tree.depths) + past,
                                         tree.ancestors("cpu"))
        ours = kv.forward(ids, positions, ancestors, past)
        if tree is None:
            theirs = model(input_ids=ids[None], use_cache=True, **{cache_keyword(model): plain}).logits[0]
        else:
            theirs = tree_forward(model, plain, tree, past)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        n = len(ids)
        if keep is not None:
            kv.keep(past, n, torch.tensor(keep))
            keep_step_entries(plain, n, torch.tensor(keep))
            n = len(keep)
        past += n
        layers = list(_kv_pairs(kv.cache))
        for mine, ref in zip(layers, _kv_pairs(plain), strict=True):
            assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)
        pointers = [layer.keys.untyped_storage().data_ptr() for layer in layers]
        if i == 0:
            buffers = pointers
        assert pointers == buffers, f"step {i}: the cache was copied into a new buffer"
