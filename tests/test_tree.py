"""Tree templates (validation, JSON, presets, per-method parts), the auto tree and the 4-D tree mask."""

from __future__ import annotations

import pytest
import torch
from helpers import by_score, chain_of, draft_from_paths, tree_templates
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import msn
from msn.decoding import trie as trie_mod
from msn.decoding.tree import (
    AUTO_MAX_NODES,
    MC_SIM_7B_63,
    METHOD_SOURCES,
    METHODS,
    TREE_PRESETS,
    AutoTree,
    TreeError,
    TreeTemplate,
    default_tree,
    resolve_tree,
)
from msn.decoding.trie import tree_mask as _tree_mask
from msn.errors import MsnError

# ---------------------------------------------------------------------------------------------------------
# Validation


def test_gap_in_depth_is_refused():
    with pytest.raises(TreeError, match="gap in depth"):
        TreeTemplate(((0,), (0, 1, 2)))
    with pytest.raises(TreeError, match=r"no parent \[1\]"):
        TreeTemplate(((0,), (1, 0)))


def test_duplicate_node_is_refused():
    with pytest.raises(TreeError, match=r"\[0, 0\] twice"):
        TreeTemplate(((0,), (0, 0), (0, 0)))


def test_depth_beyond_maximum_is_refused():
    deep = tuple((0,) * d for d in range(1, 18))
    with pytest.raises(TreeError, match="depth 17 > the maximum draft depth 16"):
        TreeTemplate(deep)
    with pytest.raises(TreeError, match="retrieval depth 17"):
        TreeTemplate(((0,),), 17)
    TreeTemplate(deep[:16], 16)  # the maximum itself is fine


def test_cycle_in_nodes_form_is_refused():
    with pytest.raises(TreeError, match="cycle"):
        TreeTemplate.from_dict({"nodes": [[0, 0], [3, 0], [2, 1]]})
    with pytest.raises(TreeError, match="cycle"):
        TreeTemplate.from_dict({"nodes": [[1, 0]]})  # its own parent


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nodes": [[0, "r"], [1, 0]]}, "mixes retrieval and Jacobi"),
        ({"nodes": [[0, "r"], [0, "r"]]}, "single chain"),
        ({"nodes": [[0, 0], [5, 0]]}, "outside 0..2"),
        ({"nodes": [[0, -1]]}, "rank must be"),
        ({"jacobi": [[0], []]}, "non-empty rank lists"),
        ({"jacobi": [[0, -2]]}, "ranks must be integers >= 0"),
        ({"jacobi": [[0]], "retrieval_depth": -1}, "'retrieval_depth' must be an integer"),
        ({"jacobi": [[0]], "retrieval": 2, "retrieval_depth": 2}, "'retrieval_depth' only"),
        ({"jacobi": [[0]], "recycling": -2}, "'recycling' must be an integer >= 0, got -2"),
        ({"jacobi": [[0]], "depth": 3}, r"unknown field\(s\) \['depth'\]"),
        ([[0]], "expected a JSON object"),
        # the nodes form is checked like the others: no typo, no second way to give the same nodes
        ({"nodes": [[0, 0]], "typo_field": 1}, r"unknown field\(s\) \['typo_field'\]$"),
        ({"nodes": [[0, 0]], "retrieval_depth": 5}, r"\['retrieval_depth'\] \('nodes' gives .* retrieval chain"),
        ({"nodes": [[0, 0]], "retrieval": 5}, r"\['retrieval'\]"),
        ({"nodes": [[0, 0]], "jacobi": [[1]]}, r"\['jacobi'\]"),
        ({"nodes": [[0, 0]], "recycling": -1}, "'recycling' must be an integer >= 0"),
        ({"nodes": [[True, 0]]}, r"must be \[parent_index, rank\]"),
        ({"nodes": [[0, True]]}, "rank must be an integer"),
        # a tree without draft nodes would decode one token per step without a word
        ({}, "no draft nodes; give 'jacobi' rank paths"),
        ({"name": "mine", "description": "x"}, "no draft nodes"),
        ({"jacobi": [], "retrieval_depth": 0, "recycling": 0}, "no draft nodes"),
        ({"nodes": []}, "no draft nodes"),
    ],
)
def test_malformed_template_dicts(data, message):
    with pytest.raises(TreeError, match=message):
        TreeTemplate.from_dict(data)


def test_nodes_form_equals_paths_form():
    # node 1 = (0,), node 2 = (1,), node 3 = (0, 0), node 4..5 = retrieval chain of 2
    t = TreeTemplate.from_dict({"nodes": [[0, 0], [0, 1], [1, 0], [0, "r"], [4, "r"]]})
    assert set(t.jacobi) == {(0,), (1,), (0, 0)}
    assert t.retrieval_depth == 2


def test_nodes_form_honours_recycling_and_name(tmp_path):
    """Recycling nodes have no place in the parent links, so the count is given beside them, as beside
    ``jacobi``; it used to be dropped without a word."""
    f = tmp_path / "tnodes.json"
    f.write_text('{"nodes": [[0, 0], [0, "r"]], "recycling": 8, "description": "mine"}')
    t = TreeTemplate.load(f)
    assert (t.jacobi, t.retrieval_depth, t.recycling, t.size, t.name) == (((0,),), 1, 8, 10, "tnodes")
    assert TreeTemplate.from_dict({"nodes": [[0, 0]], "name": "n"}) == TreeTemplate(((0,),), name="n")


def test_empty_tree_file_is_refused_naming_the_file(tmp_path):
    f = tmp_path / "t2.json"
    f.write_text("{}")
    with pytest.raises(TreeError, match=r"t2\.json: the tree has no draft nodes.*--method ar"):
        resolve_tree(str(f), "cpu", torch.float32)


def test_tree_files_with_the_old_retrieval_key_still_load(tmp_path):
    """Files written before the chain depth was named ``retrieval_depth`` say ``retrieval``."""
    f = tmp_path / "old.json"
    f.write_text('{"name": "tuned-old", "jacobi": [[0], [0, 0], [1]], "retrieval": 4}\n')
    old = TreeTemplate.load(f)
    assert old == TreeTemplate(((0,), (0, 0), (1,)), 4, name="tuned-old")
    assert old.retrieval_depth == 4 and old.size == 7
    assert "retrieval" not in old.to_dict() and old.to_dict()["retrieval_depth"] == 4
    with pytest.raises(TreeError, match="'retrieval_depth' must be an integer"):
        TreeTemplate.from_dict({"jacobi": [[0]], "retrieval": -1})


def test_bad_json_names_file_and_line(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text('{\n  "jacobi": [[0], [0, 0]],\n  "retrieval_depth": 5,,\n}\n')
    with pytest.raises(TreeError, match=r"tree\.json:3: malformed JSON"):
        TreeTemplate.load(f)
    with pytest.raises(TreeError, match="not found"):
        TreeTemplate.load(tmp_path / "missing.json")


@pytest.mark.parametrize("value", [True, -1, 65, "3", 2.0])
def test_bad_recycling_count_is_refused_naming_the_field(value):
    with pytest.raises(TreeError, match="field 'recycling'"):
        TreeTemplate.from_dict({"jacobi": [[0]], "recycling": value})
    with pytest.raises(TreeError, match="retrieval"):  # the chain depth is checked the same way
        TreeTemplate.from_dict({"jacobi": [[0]], "retrieval_depth": value})


def test_recycling_count_up_to_the_auto_maximum_is_fine():
    t = TreeTemplate.from_dict({"recycling": AUTO_MAX_NODES})
    assert (t.recycling, t.size, t.sources) == (AUTO_MAX_NODES, AUTO_MAX_NODES, ("recycling",))
    assert TreeTemplate.from_dict({"jacobi": [[0]]}).recycling == 0  # optional, 0 by default


# ---------------------------------------------------------------------------------------------------------
# JSON round trip, template properties


@settings(max_examples=60, deadline=None)
@given(tree_templates(max_recycling=AUTO_MAX_NODES), st.sampled_from(["x", "my-tree"]))
def test_json_roundtrip(tmp_path_factory, t, name):
    assume(t.size > 0)  # a tree file without draft nodes is refused (test_malformed_template_dicts)
    t = TreeTemplate(t.jacobi, t.retrieval_depth, name=name, recycling=t.recycling)
    f = tmp_path_factory.mktemp("trees") / "t.json"
    t.save(f)
    back = TreeTemplate.load(f)
    assert back == t  # jacobi, retrieval depth, recycling and name
    assert TreeTemplate.from_dict(t.to_dict()) == t
    assert ("recycling" in t.to_dict()) == bool(t.recycling)


@settings(max_examples=100, deadline=None)
@given(tree_templates())
def test_template_properties(t):
    assert t.size == len(t.jacobi) + t.retrieval_depth + t.recycling
    assert [len(p) for p in t.jacobi] == sorted(len(p) for p in t.jacobi), "parents before children"
    assert t.depth == max([len(p) for p in t.jacobi] + [t.retrieval_depth, 0])
    assert t.top_k == (max(r for p in t.jacobi for r in p) + 1 if t.jacobi else 0)
    assert t.sources == tuple(s for s in ("jacobi", "retrieval", "recycling") if t.shape(s))
    assert (t.shape("jacobi"), t.shape("retrieval"), t.shape("recycling")) == (t.jacobi, t.retrieval_depth, t.recycling)


def test_save_load_roundtrip_and_resolve(tmp_path):
    t = TREE_PRESETS["official-68"]
    f = tmp_path / "t.json"
    t.save(f)
    back = TreeTemplate.load(f)
    assert back.jacobi == t.jacobi and back.retrieval_depth == t.retrieval_depth == 5 and back.recycling == 0
    assert resolve_tree(str(f), "cpu", torch.float32).jacobi == t.jacobi
    assert resolve_tree("official-68", "cpu", torch.float32) is t
    assert resolve_tree({"jacobi": [[0]], "retrieval_depth": 1}, "cpu", torch.float32).size == 2
    assert resolve_tree({"jacobi": [[0]], "recycling": 3}, "cpu", torch.float32).size == 4
    assert resolve_tree(t) is t
    with pytest.raises(TreeError, match="not 'auto', a preset"):
        resolve_tree("no-such-tree", "cpu", torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Presets, auto, per-method parts


def test_presets():
    t = TREE_PRESETS["official-68"]
    assert t.jacobi == tuple(sorted(MC_SIM_7B_63, key=len))
    assert (t.size, t.top_k, t.jacobi_depth, t.retrieval_depth, t.recycling) == (68, 10, 4, 5, 0)
    assert TREE_PRESETS["cpu-fp32-8"].size == 8 and TREE_PRESETS["cpu-bf16-16"].size == 16
    for name, preset in TREE_PRESETS.items():
        assert preset.name == name


@pytest.mark.parametrize("spec", [None, "auto"])
def test_default_tree_is_auto(spec):
    for dtype in (torch.float32, torch.bfloat16):
        tree = resolve_tree(spec, "cpu", dtype)
        assert isinstance(tree, AutoTree)
        assert tree.sources == ("jacobi", "retrieval", "recycling") and tree.name == "auto"
        assert tree.size == tree.max_nodes == AUTO_MAX_NODES
    assert isinstance(default_tree("cpu", torch.float32), AutoTree)
    auto = AutoTree(max_nodes=12)
    assert resolve_tree(auto) is auto


@pytest.mark.parametrize("method", METHODS)
def test_auto_tree_for_every_method(method):
    tree = AutoTree(max_nodes=20).for_method(method)
    assert isinstance(tree, AutoTree)
    assert tree.sources == METHOD_SOURCES[method]
    assert tree.max_nodes == 20
    assert tree.size == (0 if method == "ar" else 20)
    assert tree.name == ("auto" if method == "tr-jacobi" else f"auto/{method}")
    assert tree.to_dict() == {"name": tree.name, "sources": list(METHOD_SOURCES[method]), "max_nodes": 20}


TEMPLATES = {
    "official-68": TREE_PRESETS["official-68"],
    "cpu-fp32-8": TREE_PRESETS["cpu-fp32-8"],
    "jacobi-only": TreeTemplate(((0,), (0, 0), (1,))),
    "all-three": TreeTemplate(((0,), (1,)), 3, recycling=4, name="all-three"),
    "recycling-only": TreeTemplate((), 0, recycling=5),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_static_template_for_every_method(name, method):
    t = TEMPLATES[name]
    part = t.for_method(method)
    assert isinstance(part, TreeTemplate)
    assert set(part.sources) <= set(METHOD_SOURCES[method])
    if method == "ar":
        assert part.size == 0 and part.sources == ()
    elif method == "tr-jacobi":
        assert part is t
    elif method == "jacobi":
        assert (part.jacobi, part.retrieval_depth, part.recycling) == (t.jacobi, 0, 0)
    elif method == "retrieval":
        # a template without a chain still drafts one, as deep as the template
        assert (part.jacobi, part.recycling) == ((), 0)
        assert part.retrieval_depth == (t.retrieval_depth or max(t.depth, 1)) >= 1
    elif method == "recycling":
        assert (part.jacobi, part.retrieval_depth) == ((), 0)
        assert part.recycling == (t.recycling or min(max(t.size, 1), AUTO_MAX_NODES)) >= 1
    if method != "tr-jacobi":
        assert part.name == ("ar" if method == "ar" else f"{t.name}/{method}")


@pytest.mark.parametrize("tree", [TREE_PRESETS["official-68"], AutoTree()])
def test_unknown_method_is_refused(tree):
    with pytest.raises(MsnError, match="unknown method 'beam'"):
        tree.for_method("beam")


@pytest.mark.parametrize("name, method", [(name, method) for name in TEMPLATES for method in METHODS])
def test_every_per_method_part_roundtrips_through_json(name, method):
    part = TEMPLATES[name].for_method(method)
    assert part.recycling <= AUTO_MAX_NODES
    if part.size == 0:  # e.g. ar's part, or jacobi's of a tree without Jacobi nodes: as a file, refused
        with pytest.raises(TreeError, match="no draft nodes"):
            TreeTemplate.from_dict(part.to_dict())
        return
    assert TreeTemplate.from_dict(part.to_dict()) == part


@pytest.mark.parametrize("fields, match", [({"recycling": -1}, "recycling"), ({"recycling": True}, "recycling"),
                                           ({"recycling": 65}, "<= 64"), ({"retrieval_depth": -2}, "retrieval_depth")])
def test_constructor_validates_counts(fields, match):
    with pytest.raises(TreeError, match=match):
        TreeTemplate(((0,),), **fields)


# ---------------------------------------------------------------------------------------------------------
# The 4-D mask


def small_step_tree():
    """root 5; a: 10 -> 12, 11; b: 10 -> 20 (merged under a's 10), 30."""
    a = draft_from_paths([(10, 12), (11,)])
    b = draft_from_paths([(10, 20), (30,)])
    trie = trie_mod.merge(5, {"a": a, "b": b}, by_score)
    return trie_mod.compact(trie, *trie_mod.select(trie, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tree_mask_is_additive_float_in_model_dtype(dtype):
    tree = small_step_tree()
    n = len(tree)
    assert n == 6
    anc = tree.ancestors("cpu")
    mask = _tree_mask(anc, past=7, dtype=dtype)
    assert mask.dtype == dtype and mask.shape == (1, 1, n, 7 + n)
    low = torch.finfo(dtype).min
    assert bool(((mask == 0) | (mask == low)).all())
    assert bool((mask[0, 0, :, :7] == 0).all()), "every node sees the whole cache"
    allowed = mask[0, 0, :, 7:] == 0
    assert torch.equal(allowed, anc)
    for i in range(n):
        assert set(allowed[i].nonzero().flatten().tolist()) == chain_of(tree.parents, i)


@pytest.mark.parametrize("tree", ["official-68", {"jacobi": [[0], [0, 0]], "retrieval_depth": 2, "recycling": 3}])
def test_engine_passes_the_float_mask_in_model_dtype(tree):
    from conftest import tiny_model

    seen = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", 0, dtype=dtype)

        def hook(module, args, kwargs, _dtype=dtype):
            m = kwargs.get("attention_mask")
            if m is not None and m.dim() == 4:
                seen.append((_dtype, m.dtype, m.shape, kwargs["input_ids"].shape[1]))

        h = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            msn.generate(model, torch.tensor([[5, 6, 7, 5, 6]]), max_new_tokens=3, tree=tree)
        finally:
            h.remove()
    assert seen and all(want == got for want, got, _, _ in seen)
    assert {want for want, _, _, _ in seen} == {torch.float32, torch.bfloat16}
    assert all(shape[-2] == n and shape[-1] > n for _, _, shape, n in seen), "[1, 1, n, past + n]"
