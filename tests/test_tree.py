"""Tree templates: validation, buffers, filling (dropping, merging) and the 4-D mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msn
from msn.decoding.engine import _tree_mask
from msn.decoding.tree import (
    MC_SIM_7B_63,
    TREE_PRESETS,
    TreeError,
    TreeTemplate,
    build_buffers,
    default_tree,
    fill_tree,
    resolve_tree,
)
from msn.errors import MsnError

# ---------------------------------------------------------------------------------------------------------
# Random valid templates (shared with the other decoding tests)


@st.composite
def tree_templates(draw, max_nodes: int = 12, max_depth: int = 4, max_rank: int = 4, max_retrieval: int = 5):
    """A random valid template: rank paths closed under prefixes, plus a retrieval chain of random depth."""
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(0, max_nodes))):
        parents = [()] + [p for p in paths if len(p) < max_depth]
        parent = draw(st.sampled_from(parents))
        child = parent + (draw(st.integers(0, max_rank)),)
        if child not in paths:
            paths.append(child)
    retrieval = draw(st.integers(0, max_retrieval))
    return TreeTemplate(tuple(draw(st.permutations(paths))), retrieval)


def make_drafts(template: TreeTemplate, table: torch.Tensor, chain: list[int]) -> torch.Tensor:
    """The flat draft vector the engine passes to fill_tree: Jacobi table then a -1 padded chain."""
    c = torch.full((template.retrieval,), -1, dtype=torch.long)
    c[: len(chain)] = torch.tensor(chain[: template.retrieval], dtype=torch.long)
    return torch.cat([table.flatten(), c])


def template_node_tokens(template: TreeTemplate, table: torch.Tensor, chain: list[int]) -> list[list[int]]:
    """Token sequence of every template node (root excluded), computed from the definition, not the buffers."""
    seqs = [[int(table[d, r]) for d, r in enumerate(p)] for p in template.jacobi]
    padded = chain + [-1] * template.retrieval
    seqs += [padded[:d] for d in range(1, template.retrieval + 1)]
    return seqs


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
        ({"jacobi": [[0]], "retrieval": -1}, "'retrieval' must be an integer"),
        ({"jacobi": [[0]], "depth": 3}, r"unknown field\(s\) \['depth'\]"),
        ([[0]], "expected a JSON object"),
    ],
)
def test_malformed_template_dicts(data, message):
    with pytest.raises(TreeError, match=message):
        TreeTemplate.from_dict(data)


def test_nodes_form_equals_paths_form():
    # node 1 = (0,), node 2 = (1,), node 3 = (0, 0), node 4..5 = retrieval chain of 2
    t = TreeTemplate.from_dict({"nodes": [[0, 0], [0, 1], [1, 0], [0, "r"], [4, "r"]]})
    assert set(t.jacobi) == {(0,), (1,), (0, 0)}
    assert t.retrieval == 2


def test_bad_json_names_file_and_line(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text('{\n  "jacobi": [[0], [0, 0]],\n  "retrieval": 5,,\n}\n')
    with pytest.raises(TreeError, match=r"tree\.json:3: malformed JSON"):
        TreeTemplate.load(f)
    with pytest.raises(TreeError, match="not found"):
        TreeTemplate.load(tmp_path / "missing.json")


def test_save_load_roundtrip_and_resolve(tmp_path):
    t = TREE_PRESETS["official-68"]
    f = tmp_path / "t.json"
    t.save(f)
    back = TreeTemplate.load(f)
    assert back.jacobi == t.jacobi and back.retrieval == t.retrieval == 5
    assert resolve_tree(str(f), "cpu", torch.float32).jacobi == t.jacobi
    assert resolve_tree("official-68", "cpu", torch.float32) is t
    assert resolve_tree({"jacobi": [[0]], "retrieval": 1}, "cpu", torch.float32).size == 2
    with pytest.raises(TreeError, match="not a preset"):
        resolve_tree("no-such-tree", "cpu", torch.float32)


def test_presets_and_defaults():
    t = TREE_PRESETS["official-68"]
    assert t.jacobi == tuple(sorted(MC_SIM_7B_63, key=len))
    assert (t.size, t.top_k, t.jacobi_depth, t.retrieval) == (68, 10, 4, 5)
    assert default_tree("cpu", torch.float32).name == "cpu-fp32-8"
    assert default_tree("cpu", torch.bfloat16).name == "cpu-bf16-16"
    for method, size in [("ar", 0), ("jacobi", 63), ("retrieval", 5), ("tr-jacobi", 68)]:
        assert t.for_method(method).size == size
    # retrieval on a Jacobi-only template still gets a chain
    assert TreeTemplate(((0,), (0, 0))).for_method("retrieval").retrieval == 2
    with pytest.raises(MsnError, match="unknown method"):
        t.for_method("beam")


# ---------------------------------------------------------------------------------------------------------
# Buffers


@settings(max_examples=60, deadline=None)
@given(tree_templates())
def test_buffers_describe_the_template(t):
    buf = build_buffers(t)
    n = t.size + 1
    assert buf.num_nodes == n
    assert buf.depth[0] == 0 and buf.parent[0] == -1
    par = buf.parent.tolist()
    assert all(0 <= par[i] < i for i in range(1, n)), "parents precede children"
    assert all(buf.depth[i] == buf.depth[par[i]] + 1 for i in range(1, n))
    # ancestors: reflexive, closed, and exactly the parent chain
    for i in range(n):
        chain, j = set(), i
        while j >= 0:
            chain.add(j)
            j = par[j]
        assert set(buf.ancestors[i].nonzero().flatten().tolist()) == chain
    # paths: one per leaf, root first, each node's parent right before it, padded with -1 only at the end
    leaves = set(range(n)) - set(par)
    assert buf.paths.shape == (len(leaves), t.depth + 1)
    for row in buf.paths.tolist():
        real = [x for x in row if x >= 0]
        assert row == real + [-1] * (len(row) - len(real))
        assert real[0] == 0 and real[-1] in leaves
        assert all(par[b] == a for a, b in zip(real, real[1:], strict=False))
    assert {max(r) for r in buf.paths.tolist()} == leaves


@settings(max_examples=40, deadline=None)
@given(tree_templates(), st.data())
def test_fill_tree_tokens_drop_and_merge(t, data):
    """Every valid template node's token sequence appears exactly once as a compact path; invalid nodes
    (a -1 on the way, deeper than max_depth) are gone; siblings are unique."""
    k, d = max(t.top_k, 1), t.jacobi_depth
    table = torch.tensor(data.draw(st.lists(st.integers(3, 6), min_size=k * d, max_size=k * d))).view(d, k)
    chain = data.draw(st.lists(st.integers(3, 6), max_size=t.retrieval))
    max_depth = data.draw(st.none() | st.integers(0, 6))
    buf = build_buffers(t)
    step = fill_tree(buf, 9, make_drafts(t, table, chain), max_depth=max_depth)

    toks, anc = step.tokens.tolist(), step.ancestors
    m = len(toks)
    assert toks[0] == 9 and step.depth[0] == 0
    # compact node -> its token sequence (root excluded) through the ancestor matrix
    seq_of = [[toks[j] for j in anc[i].nonzero().flatten().tolist()][1:] for i in range(m)]
    assert all(len(seq_of[i]) == int(step.depth[i]) for i in range(m))
    expected = {
        tuple(s)
        for s in template_node_tokens(t, table, chain)
        if -1 not in s and (max_depth is None or len(s) <= max_depth)
    }
    assert sorted(map(tuple, seq_of[1:])) == sorted(expected), "each valid sequence exactly once (merged)"
    # compact_of maps every valid template node to the node with its token sequence
    node_seqs = [[]] + template_node_tokens(t, table, chain)
    for i, c in enumerate(step.compact_of.tolist()):
        s = node_seqs[i]
        valid = -1 not in s and (max_depth is None or len(s) <= max_depth)
        assert (c >= 0) == valid
        if valid:
            assert seq_of[c] == s
    # paths index into the compact tokens, root first, -1 after the end only
    for row in step.paths.tolist():
        real = [x for x in row if x >= 0]
        assert real[0] == 0
        assert row[: len(real)] == real, "a dropped node ends a path"
        assert all(seq_of[b][:-1] == seq_of[a] for a, b in zip(real, real[1:], strict=False))


def test_merging_identical_retrieval_and_jacobi_siblings():
    t = TreeTemplate(((0,), (1,), (0, 0), (0, 1)), 3)
    table = torch.tensor([[10, 11], [12, 13]])
    buf = build_buffers(t)
    distinct = fill_tree(buf, 5, make_drafts(t, table, [20, 21, 22]))
    same = fill_tree(buf, 5, make_drafts(t, table, [10, 12, 22]))  # chain repeats (0,) then (0, 0)
    assert distinct.tokens.numel() == 1 + 4 + 3
    assert same.tokens.numel() == 1 + 4 + 1
    assert same.tokens.tolist() == [5, 10, 11, 12, 13, 22]
    # the chain's third node now hangs under the Jacobi (0, 0) node
    assert same.ancestors[-1].nonzero().flatten().tolist() == [0, 1, 3, 5]
    # merged template nodes point at their twins
    r1, r2 = buf.num_nodes - 3, buf.num_nodes - 2
    assert same.compact_of[r1] == 1 and same.compact_of[r2] == 3


def test_duplicate_jacobi_candidates_merge_too():
    t = TreeTemplate(((0,), (1,), (0, 0), (1, 0)))
    step = fill_tree(build_buffers(t), 5, make_drafts(t, torch.tensor([[7, 7], [8, 9]]), []))
    assert step.tokens.tolist() == [5, 7, 8]


def test_no_drafts_means_root_only():
    t = TreeTemplate((), 4)
    step = fill_tree(build_buffers(t), 5, make_drafts(t, torch.zeros(0, 1, dtype=torch.long), []))
    assert step.tokens.tolist() == [5]
    assert step.paths.tolist() == [[0, -1, -1, -1, -1]]


# ---------------------------------------------------------------------------------------------------------
# The 4-D mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tree_mask_is_additive_float_in_model_dtype(dtype):
    t = TreeTemplate(((0,), (1,), (0, 0)), 2)
    step = fill_tree(build_buffers(t), 5, make_drafts(t, torch.tensor([[10, 11], [12, 13]]), [20, 21]))
    mask = _tree_mask(step.ancestors, past=7, dtype=dtype)
    n = step.tokens.numel()
    assert mask.dtype == dtype and mask.shape == (1, 1, n, 7 + n)
    low = torch.finfo(dtype).min
    assert bool(((mask == 0) | (mask == low)).all())
    assert bool((mask[0, 0, :, :7] == 0).all()), "every node sees the whole cache"
    assert torch.equal(mask[0, 0, :, 7:] == 0, step.ancestors)


def test_engine_passes_the_float_mask_in_model_dtype():
    from conftest import tiny_model

    seen = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", 0, dtype=dtype)

        def hook(module, args, kwargs, _dtype=dtype):
            m = kwargs.get("attention_mask")
            if m is not None and m.dim() == 4:
                seen.append((_dtype, m.dtype, m.shape))

        h = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            msn.generate(model, torch.tensor([[5, 6, 7, 5, 6]]), max_new_tokens=3, tree="official-68")
        finally:
            h.remove()
    assert seen and all(want == got for want, got, _ in seen)
    assert {want for want, _, _ in seen} == {torch.float32, torch.bfloat16}
