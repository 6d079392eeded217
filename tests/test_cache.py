"""KV cache keep: after a tree forward, keeping root + one path must equal having decoded that path."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, TINY_VOCAB, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tree import make_drafts, tree_templates

from msn.decoding.cache import cache_keyword, keep_step_entries, new_cache
from msn.decoding.engine import _tree_mask
from msn.decoding.tree import TreeTemplate, build_buffers, fill_tree

_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=5)
    return _MODELS[family]


def tree_forward(model, cache, step, past):
    return model(
        input_ids=step.tokens[None],
        position_ids=(step.depth + past)[None],
        attention_mask=_tree_mask(step.ancestors, past, model.dtype),
        use_cache=True,
        **{cache_keyword(model): cache},
    ).logits[0]


def keep_then_next(model, prompt: list[int], t: TreeTemplate, drafts, leaf_path: list[int], nxt: int):
    """Prefill, one tree step, keep root + ``leaf_path`` (compact indices), then one ordinary decode step."""
    cache = new_cache(model)
    kw = cache_keyword(model)
    model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, **{kw: cache})
    step = fill_tree(build_buffers(t), prompt[-1], drafts)
    tree_forward(model, cache, step, len(prompt) - 1)
    keep = torch.tensor([0] + leaf_path)
    keep_step_entries(cache, step.tokens.numel(), keep)
    assert cache.get_seq_length() == len(prompt) + len(leaf_path)
    kept = step.tokens[leaf_path].tolist()
    logits = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{kw: cache}).logits[0, -1]
    fresh = model(input_ids=torch.tensor([prompt + kept + [nxt]])).logits[0, -1]
    return logits, fresh


# root, 1=(0,) 2=(1,) 3=(2,) 4=(0,0) 5=(1,0) 6=(0,0,0): path root->1->4->6 is [0,1,4,6], path to 5 is [0,2,5]
TEMPLATE = TreeTemplate(((0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0)))
TABLE = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("leaf_path", [[1, 4, 6], [2, 5], [3], [], [1]], ids=str)
def test_keep_equals_fresh_forward(family, leaf_path):
    model = _model(family)
    logits, fresh = keep_then_next(
        model, [9, 10, 11, 12, 13], TEMPLATE, make_drafts(TEMPLATE, TABLE, []), leaf_path, 50
    )
    assert int(logits.argmax()) == int(fresh.argmax())
    torch.testing.assert_close(logits, fresh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_keep_random_paths(family, data):
    model = _model(family)
    t = data.draw(tree_templates(max_nodes=10, max_depth=4, max_rank=3, max_retrieval=3))
    k, d = max(t.top_k, 1), t.jacobi_depth
    table = torch.tensor(data.draw(st.lists(st.integers(3, 40), min_size=k * d, max_size=k * d))).view(d, k)
    chain = data.draw(st.lists(st.integers(3, 40), max_size=t.retrieval))
    prompt = data.draw(st.lists(st.integers(3, TINY_VOCAB - 1), min_size=2, max_size=12))
    step = fill_tree(build_buffers(t), prompt[-1], make_drafts(t, table, chain))
    row = data.draw(st.integers(0, step.paths.shape[0] - 1))
    path = [x for x in step.paths[row].tolist() if x >= 0][1:]
    path = path[: data.draw(st.integers(0, len(path)))]
    logits, fresh = keep_then_next(model, prompt, t, make_drafts(t, table, chain), path, 60)
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
