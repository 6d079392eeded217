"""tune-tree: the selection rule on synthetic costs and probabilities, and the measurements on a tiny model."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import tiny_model
from fakes import ByteChatTokenizer

from msn.bench import tune
from msn.bench.tune import (
    Node,
    expected_cost,
    interpolate,
    parent_of,
    select_tree,
    template_nodes,
    to_template,
)
from msn.cli import main
from msn.decoding.engine import _template_tags
from msn.decoding.tree import TREE_PRESETS, TreeTemplate


def nodes_from(probs: dict) -> list[Node]:
    return [Node(k, parent_of(k), p) for k, p in probs.items()]


J = {
    ("j", (0,)): 0.5,
    ("j", (1,)): 0.2,
    ("j", (0, 0)): 0.3,
    ("j", (0, 0, 0)): 0.05,
    ("j", (2,)): 0.01,
    ("r", (1,)): 0.1,
    ("r", (2,)): 0.6,  # likelier than its parent: must still come after it
}


def test_children_never_before_parents():
    sel = select_tree(nodes_from(J), cost=lambda n: 1.0)
    order = [n.key for n in sel.order]
    for i, k in enumerate(order):
        if parent_of(k) is not None:
            assert order.index(parent_of(k)) < i
    assert order[:3] == [("j", (0,)), ("j", (0, 0)), ("j", (1,))]
    assert order.index(("r", (2,))) == order.index(("r", (1,))) + 1


def test_flat_cost_takes_every_useful_node():
    sel = select_tree(nodes_from(J), cost=lambda n: 1.0)
    assert sel.best_size == len(J)
    assert sel.scores[-1] == pytest.approx(1 + sum(J.values()))
    assert sel.speedup == pytest.approx(1 + sum(J.values()))


def test_steep_cost_takes_nothing():
    sel = select_tree(nodes_from(J), cost=lambda n: float(n))  # each token costs a full step
    assert sel.best_size == 0 and sel.speedup == 1.0
    assert to_template(sel.nodes, "t").size == 0


def test_best_prefix_is_the_argmax():
    cost = interpolate({1: 1.0, 2: 1.05, 4: 1.2, 8: 2.0})
    sel = select_tree(nodes_from(J), cost)
    scores = []
    total = 1.0
    for k in range(len(sel.order) + 1):
        total += sel.order[k - 1].prob if k else 0.0
        scores.append(total / cost(k + 1))
    assert sel.scores == pytest.approx(scores)
    assert sel.best_size == max(range(len(scores)), key=scores.__getitem__)
    assert 0 < sel.best_size < len(J)


def test_greedy_prefix_is_optimal_among_closed_subsets_of_that_size():
    """Measured acceptance never grows from parent to child (a node is on the accepted path only with its
    parent); then each greedy prefix is the best parent-closed set of its size (checked by brute force)."""
    monotone = dict(J)
    monotone[("r", (2,))] = 0.08
    nodes = nodes_from(monotone)
    sel = select_tree(nodes, cost=lambda n: 1.0)
    keys = [n.key for n in nodes]
    for size in range(1, len(nodes) + 1):
        greedy = sum(n.prob for n in sel.order[:size])
        best = 0.0
        for combo in itertools.combinations(keys, size):
            s = set(combo)
            if all(parent_of(k) is None or parent_of(k) in s for k in combo):
                best = max(best, sum(monotone[k] for k in combo))
        assert greedy == pytest.approx(best)


def test_max_nodes_and_template():
    sel = select_tree(nodes_from(J), cost=lambda n: 1.0, max_nodes=4)
    assert len(sel.order) == 4
    t = to_template(sel.nodes, "mine")
    assert t.jacobi == ((0,), (1,), (0, 0)) and t.retrieval_depth == 1 and t.name == "mine"


def test_interpolate():
    f = interpolate({1: 10.0, 3: 14.0, 5: 14.0})
    assert f(1) == 10.0 and f(2) == pytest.approx(12.0) and f(4) == 14.0
    assert f(7) == pytest.approx(14.0)  # flat extension of the last segment
    assert interpolate({1: 2.0})(50) == 2.0


def test_template_nodes_follow_engine_order():
    """tune-tree's node keys index ``GenerateOutput.node_hits`` exactly as the engine fills it."""
    t = TREE_PRESETS["official-68"]
    keys = template_nodes(t)
    tags = _template_tags(t)
    assert len(keys) == t.size == len(tags)
    for i, (kind, path) in enumerate(keys, start=1):
        tag = ("jacobi", path) if kind == "j" else ("retrieval", path[0])
        assert tags[tag] == i
        parent = parent_of((kind, path))
        assert parent is None or keys.index(parent) + 1 < i  # parents come first


def test_measure_costs_times_each_size():
    model = tiny_model("llama")
    costs = tune.measure_costs(model, sizes=(1, 4, 16), past=20, repeats=2)
    assert set(costs) == {1, 4, 16} and all(v > 0 for v in costs.values())


def pays_for_the_first_node(monkeypatch, prob: float = 0.9):
    """The tiny random model accepts next to nothing, so no node would pay and no tree be written: measure it
    for real (shapes), then report node (0,) accepted on ``prob`` of the steps, on a flat cost curve."""
    real = tune.measure_acceptance

    def measure(model, tokenizer, template, *a, **kw):
        probs, steps, share = real(model, tokenizer, template, *a, **kw)
        assert len(probs) == template.size and steps > 0
        return [prob if p == (0,) else 0.0 for p in template.jacobi] + [0.0] * template.retrieval_depth, steps, share

    monkeypatch.setattr(tune, "measure_acceptance", measure)
    monkeypatch.setattr(tune, "measure_costs", lambda model, sizes, *a: {k: 0.01 for k in sizes})


def test_tune_writes_loadable_tree(tmp_path, monkeypatch, capsys):
    model, tok = tiny_model("llama"), ByteChatTokenizer()
    import msn.models

    monkeypatch.setattr(msn.models, "load_model", lambda *a, **k: (model, tok))
    pays_for_the_first_node(monkeypatch)
    out = tmp_path / "tree.json"
    code = main(["tune-tree", "--model", "tiny", "--dtype", "fp32", "--device", "cpu", "--sizes", "1,8,32",
                 "--repeats", "1", "--prompts", "2", "--max-new-tokens", "12", "--start-tree", "cpu-bf16-16",
                 "--past", "16", "--out", str(out)])
    assert code == 0
    tree = TreeTemplate.load(out)
    assert tree.name == "tuned-tiny-fp32-cpu" and tree.jacobi == ((0,),) and tree.size == 1
    report = json.loads((tmp_path / "tree.measure.json").read_text())
    assert len(report["node_acceptance"]) == TREE_PRESETS["cpu-bf16-16"].size
    assert all(0.0 <= n["prob"] <= 1.0 for n in report["node_acceptance"])
    assert report["tree"] == tree.to_dict()
    share = report["retrieval_chain_share_by_depth"]
    assert len(share) == TREE_PRESETS["cpu-bf16-16"].retrieval_depth
    assert all(1.0 >= a >= b >= 0.0 for a, b in zip(share, share[1:], strict=False))  # deeper needs shallower
    assert str(out) in capsys.readouterr().out


def test_expected_cost_charges_retrieval_only_when_a_chain_exists():
    def cost(n):
        return float(n)

    assert expected_cost(cost, 2, 3, None) == cost(6)
    assert expected_cost(cost, 2, 3, [1.0, 1.0, 1.0]) == cost(6)
    assert expected_cost(cost, 2, 3, [0.0, 0.0, 0.0]) == cost(3)
    # chain reaches depth 1 on half the steps, depth 2 on a quarter, never depth 3
    assert expected_cost(cost, 0, 3, [0.5, 0.25, 0.0]) == 0.5 * 1 + 0.25 * 2 + 0.25 * 3


def test_rare_retrieval_chain_is_chosen_when_charged_by_its_share():
    nodes = [Node(("r", (1,)), None, 0.10), Node(("r", (2,)), ("r", (1,)), 0.07)]

    def cost(n):
        return 1.0 + 0.5 * (n - 1)  # each extra token costs half a step

    assert select_tree(nodes, cost).best_size == 0  # paid every step, the chain loses
    chosen = select_tree(nodes, cost, chain_share=[0.12, 0.09])
    assert chosen.best_size == 2 and chosen.speedup > 1.0  # paid only when drafted, it wins


def test_engine_reports_retrieval_chain_lengths():

    import msn

    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7]])  # "5 6 7" repeats: the chain drafts what followed it
    out = msn.generate(model, ids, max_new_tokens=6, method="retrieval", tree="cpu-bf16-16")
    assert len(out.retrieval_lengths) == out.steps
    assert out.retrieval_lengths[0] == 4  # after "5 6 7" came "8 5 6 7": 4 tokens (depth 5, text ends)


def test_bad_sizes(capsys):
    assert main(["tune-tree", "--sizes", "1,x"]) == 2
    assert "--sizes must be comma-separated integers" in capsys.readouterr().err


def tune_argv(out, *extra):
    return ["tune-tree", "--model", "tiny", "--dtype", "fp32", "--device", "cpu", "--sizes", "1,2", "--repeats", "1",
            "--prompts", "1", "--max-new-tokens", "4", "--start-tree", "cpu-fp32-8", "--past", "8", "--out", str(out),
            *extra]


@pytest.fixture
def no_load(monkeypatch):
    import msn.models

    monkeypatch.setattr(msn.models, "load_model", lambda *a, **k: pytest.fail("model loaded despite bad input"))


@pytest.mark.parametrize("start, message", [
    ("auto", "--start-tree 'auto' chooses its nodes per step.*give a preset .*official-68.* or a tree JSON file"),
    ("recycling.json", "has 4 recycling nodes, which tune-tree does not measure"),
])
def test_start_tree_without_fixed_measurable_nodes_is_refused_before_loading(tmp_path, capsys, no_load, start,
                                                                           message):
    (tmp_path / "recycling.json").write_text('{"jacobi": [[0]], "recycling": 4}')
    code = main(tune_argv(tmp_path / "tree.json", "--start-tree", str(tmp_path / start) if ".json" in start else start))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and __import__("re").search(message, err), err


@pytest.mark.parametrize("name", ["data.jsonl", "tree.json"])
def test_an_existing_file_tune_tree_did_not_write_is_never_replaced(tmp_path, capsys, no_load, name):
    """``--out`` mistyped for a dataset (or a hand-written tree) must not cost the user that file."""
    mine = tmp_path / name
    mine.write_text('{"prompt": "Count from 0.", "response": "0 1 2"}\n')
    assert main(tune_argv(mine)) == 2
    err = capsys.readouterr().err.strip()
    assert f"{mine} exists and is not a tree file msn tune-tree wrote; choose another --out" in err and "\n" not in err
    assert mine.read_text() == '{"prompt": "Count from 0.", "response": "0 1 2"}\n'
    report = tmp_path / "new.measure.json"  # the report beside a tree is guarded the same way
    report.write_text("my notes\n")
    assert main(tune_argv(tmp_path / "new.json")) == 2
    assert "new.measure.json exists and is not a measurement report" in capsys.readouterr().err
    assert report.read_text() == "my notes\n"


def test_rerun_replaces_its_own_files_atomically(tmp_path, monkeypatch, capsys):
    import msn.models
    import msn.outputs

    model, tok = tiny_model("llama"), ByteChatTokenizer()
    monkeypatch.setattr(msn.models, "load_model", lambda *a, **k: (model, tok))
    pays_for_the_first_node(monkeypatch)
    out = tmp_path / "tree.json"
    assert main(tune_argv(out)) == 0
    written = []
    real = msn.outputs.atomic_write_text
    monkeypatch.setattr(msn.outputs, "atomic_write_text", lambda p, text: written.append(str(p)) or real(p, text))
    assert main(tune_argv(out)) == 0  # its own tree and report: replaced
    assert written == [str(tmp_path / "tree.measure.json"), str(out)]
    assert TreeTemplate.load(out).name.startswith("tuned-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.json", "tree.measure.json"]  # no temp file left


def test_when_no_node_pays_no_empty_tree_is_written(tmp_path, monkeypatch, capsys):
    """A tree without draft nodes is refused wherever trees are read, so tune-tree says what to do instead."""
    import msn.models

    model, tok = tiny_model("llama"), ByteChatTokenizer()
    monkeypatch.setattr(msn.models, "load_model", lambda *a, **k: (model, tok))
    pays_for_the_first_node(monkeypatch, prob=0.0)
    out = tmp_path / "tree.json"
    assert main(tune_argv(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no draft node pays" in err and "--method ar" in err and f"{out} not written" in err
    assert not out.exists() and json.loads((tmp_path / "tree.measure.json").read_text())["best_size"] == 0
