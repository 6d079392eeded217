"""benchmarks/reproduce/run.py: the issue-5 driver, end to end on the toy budget, resume, plans and the claims logic.

The end-to-end test uses 2-layer random models saved with SmolLM2's real tokenizer (a normal HF folder, which
every msn command accepts), a 40-row JSONL and a 2-question Spec-Bench file, so it needs no network and no
real model weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "benchmarks" / "reproduce" / "run.py"


def load_driver():
    """run.py as a module; its neighbours budgets.py and report.py are then importable as ``budgets``/``report``."""
    from helpers import load_script

    return load_script(DRIVER, "reproduce_run")


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama (general) and Qwen2 (code) with SmolLM2's tokenizer, a JSONL data file, 2 questions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    from msn.errors import MsnError
    from msn.models import preset_path

    try:
        tok = AutoTokenizer.from_pretrained(preset_path("smollm2-135m"))
    except MsnError as e:  # pragma: no cover - environment without the preset package
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("reproduce-inputs")
    paths: dict[str, Path] = {}
    for name, config_cls in (("general", LlamaConfig), ("code", Qwen2Config)):
        cfg = config_cls(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        paths[name] = root / name
        AutoModelForCausalLM.from_config(cfg).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    rows = [{"prompt": f"Count from {i}.", "response": " ".join(str(i + j) for j in range(12))} for i in range(40)]
    paths["data"] = root / "data.jsonl"
    paths["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = [
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now one about snow."]},
        {"question_id": 2, "category": "qa", "turns": ["What is the capital of France?"]},
    ]
    paths["questions"] = root / "question.jsonl"
    paths["questions"].write_text("".join(json.dumps(q) + "\n" for q in questions))
    return paths


def run_driver(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(DRIVER), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


# Every kind of stage once: an untrained base, plain SFT, MSN at two lengths (the ablation table), and the code
# group's LoRA MSN model (HumanEval). The full toy plan (all 42 stages) takes ~70 s here; the test keeps < 60 s.
TOY_VARIANTS = "general:base,general:sft,general:msn-L4,general:msn-L1,code:msn-L4"


def test_toy_budget_end_to_end_then_resume(toy_inputs, tmp_path):
    out = tmp_path / "out"
    common = [
        "--budget", "toy", "--out", str(out), "--questions", str(toy_inputs["questions"]),
        "--model-general", str(toy_inputs["general"]), "--model-code", str(toy_inputs["code"]),
        "--data-general", str(toy_inputs["data"]), "--data-code", str(toy_inputs["data"]),
        "--variants", TOY_VARIANTS,
    ]
    # First run: every stage, through msn.cli.main in one process (the same argv as the subprocess launcher).
    first = run_driver([*common, "--launcher", "inprocess"])
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "failed 0, blocked 0" in first.stdout

    report = json.loads((out / "report.json").read_text())
    ids = ["general-base", "general-sft", "general-msn-L4", "general-msn-L1", "code-msn-L4"]
    assert list(report["variants"]) == ids
    for vid in ids:
        v = report["variants"][vid]
        assert v["quality"]["heldout-loss"]["loss"] > 0
        assert "acc_3" in v["quality"]["denoise"]
        assert set(v["speed"]["overall"]) == {"ar", "pld", "jacobi", "tr-jacobi"}
        assert v["speed"]["questions"] == 2 and v["speed"]["status"] == "complete"
        assert v["trained"] == (vid != "general-base")
        if v["trained"]:
            assert v["train"]["steps"] == 2
            assert v["train"]["log"] and "eval_loss" in v["train"]["log"][-1]
    assert report["variants"]["code-msn-L4"]["quality"]["humaneval"]["n"] == 1
    assert report["variants"]["code-msn-L4"]["train"]["lora"] is True

    t = report["tables"]
    assert [r["variant"] for r in t["side_by_side"]["general"]] == ids[:4]
    assert t["side_by_side"]["code"][0]["humaneval_pass_at_1"] is not None
    assert set(t["decoders"]["general"]) == {"pld", "jacobi", "tr-jacobi"}
    tr = t["decoders"]["general"]["tr-jacobi"]["general-msn-L4"]
    assert tr["jacobi_per_step"] + tr["retrieval_per_step"] >= tr["mat"] - 1 >= 0  # every accepted draft credited
    assert [r["length"] for r in t["noise_length_ablation"]] == [1, 4]
    paired = t["paired_vs_sft"]["general"]
    assert set(paired) == {"general-base", "general-msn-L4", "general-msn-L1"}
    assert all(p["jacobi"]["n"] == 2 for p in paired.values())
    assert all(p["tr-jacobi, Jacobi-drafted"]["n"] == 2 for p in paired.values())
    assert all(r["jacobi_mat_vs_sft"]["n"] == 2 for r in t["noise_length_ablation"])
    retr = t["retrieval_ablation"]["general"]["general-msn-L4"]
    assert set(retr["categories"]) == {"writing", "qa"} and retr["n"] == 2
    claims = {(c["claim"], c["variant"]): c for c in t["claims"]}
    assert claims[("noise length 4 is best of {1, 4, 8}", "general ablation")]["holds"] == "n/a"  # no L=8 here
    assert any(c.startswith("tr-jacobi speed-up") and v == "code-msn-L4" for c, v in claims)
    assert any(c.startswith("retrieval helps") for c, _ in claims)
    assert all(c["holds"] in ("yes", "no", "n/a") for c in t["claims"])
    assert len(report["stages"]) == 20 and all(s["status"] == "ran" for s in report["stages"])

    md = (out / "report.md").read_text()
    for heading in ("### Quality and speed side by side", "### Retrieval ablation", "## Noise-length ablation",
                    "MAT per question against plain SFT (paired)",
                    "## The paper's claims", "## How to reproduce", "## Denoising accuracy during training"):
        assert heading in md
    assert "| tr-jacobi: accepted drafts per step by Jacobi / retrieval |" in md
    assert "msn train --model" in md and "--resume" in md and "msn bench --model" in md
    assert (out / "report.png").stat().st_size > 1000
    # finished training runs keep only their last checkpoint
    assert [p.name for p in (out / "train" / "general-msn-L4").glob("checkpoint-*")] == ["checkpoint-2"]

    # Second run, default (subprocess) launcher, one output removed: only that stage runs again.
    victim = out / "quality" / "general-base" / "heldout-loss.json"
    victim.unlink()
    benches = {p: p.stat().st_mtime_ns for p in (out / "bench").glob("*/summary.json")}
    second = run_driver(common)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "ran 1, skipped 19, failed 0, blocked 0" in second.stdout
    assert second.stdout.count(": skip (complete") == 19
    assert victim.is_file()
    assert {p: p.stat().st_mtime_ns for p in benches} == benches
    log = (out / "logs" / "quality_general-base_heldout-loss.log").read_text()
    assert "-m msn.cli eval" in log  # the rerun went through a real subprocess
    report2 = json.loads((out / "report.json").read_text())
    assert report2["stage_counts"] == {"ran": 1, "skipped": 19, "failed": 0, "blocked": 0}


def test_budget_plans_compare_like_with_like(tmp_path):
    """Every variant of a group shares data, steps, batch, seed; benches use the same questions and methods."""
    drv = load_driver()
    for name in ("toy", "cpu", "gpu"):
        groups = drv.budget(name)
        stages = drv.plan(groups, tmp_path / name, "q.jsonl", 1, None, False)
        for g in groups:
            trains = [s.argv for s in stages if s.kind == "train" and s.variant_id.startswith(g.name + "-")]
            assert len(trains) == len(g.variants) - 1  # all but the untrained base

            def without_noise(argv):
                drop = {"--output", "--noise", "--noise-length", "--noise-segments"}
                return [x for i, x in enumerate(argv) if x not in drop and (i == 0 or argv[i - 1] not in drop)]

            assert len({tuple(without_noise(a)) for a in trains}) == 1
            assert all("--resume" in a and "--seed" in a for a in trains)
            benches = [s.argv for s in stages if s.kind == "speed" and s.variant_id.startswith(g.name + "-")]
            assert len(benches) == len(g.variants)
            assert len({tuple(a[a.index("--questions"):a.index("--out")]) for a in benches}) == 1
            assert all("ar,pld,jacobi,tr-jacobi" in a and "bf16" in a and "--per-category" in a for a in benches)
        names = {g.name: [v.name for v in g.variants] for g in groups}
        general = next(g for g in groups if g.name == "general")
        ablation = "x8" if name == "cpu" else ""  # cpu: the ablation runs at 8 segments per sample
        assert general.ablation_segments == (8 if name == "cpu" else 1)
        assert names["general"] == ["base", "sft", "msn-L4", "msn-L4x8", f"msn-L1{ablation}", f"msn-L8{ablation}"]
        assert names["code"][:3] == ["base", "sft", "msn-L4"]
        kinds = [s.kind for s in stages]
        assert kinds == sorted(kinds, key=["train", "quality", "speed"].index)  # benches back to back
    cpu = {g.name: g for g in drv.budget("cpu")}
    assert cpu["general"].model == "smollm2-135m" and cpu["general"].data == "sharegpt"
    assert cpu["code"].model == "qwen2.5-coder-0.5b" and cpu["code"].lora and cpu["code"].humaneval


def test_distill_budget_trains_and_scores_on_the_base_models_own_answers(tmp_path):
    """Issue 11: one distill stage per (model, prompts), shared by groups; every training needs it, quality is
    scored on the distilled file's held-out split, and greedy agreement with the base is measured."""
    drv = load_driver()
    out = tmp_path / "d"
    groups = drv.budget("distill")
    stages = drv.plan(groups, out, "q.jsonl", 1, None, False)
    distills = [s for s in stages if s.argv[0] == "distill"]
    assert [s.id for s in distills] == ["distill:smollm2-135m-sharegpt", "distill:qwen2.5-coder-0.5b-stdlib-code"]
    by_id = {s.id: s for s in stages}
    smol = out / "distill" / "smollm2-135m-sharegpt.jsonl"
    for s in stages:
        if s.kind == "train" and s.argv[0] == "train":
            assert s.needs in by_id and by_id[s.needs].argv[0] == "distill"
            assert s.argv[s.argv.index("--data") + 1] == str(by_id[s.needs].output).removesuffix(".meta.json")
        if s.argv[:1] == ["eval"] and "humaneval" not in s.argv:
            assert s.argv[s.argv.index("--split") + 1] == "heldout"
    general = [s for s in stages if s.variant_id.startswith("general-")]
    assert {s.argv[s.argv.index("--data") + 1] for s in general if "--data" in s.argv} == {str(smol)}
    assert {s.id for s in stages if s.id.endswith(":agreement")} >= {
        "quality:general-base:agreement", "quality:general-sft:agreement", "quality:general-msn-L4x4:agreement"}
    trains = [s for s in stages if s.id.startswith("train:general-")]
    steps = {int(s.argv[s.argv.index("--max-steps") + 1]) * int(s.argv[s.argv.index("--batch-size") + 1])
             for s in trains}
    assert steps == {760 * 8}  # same budget for SFT and MSN: ~2 epochs of ~3040 samples of ~167 tokens

    meta = smol.with_name(smol.name + ".meta.json")
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"counts": {"prompts": 10, "answered": 9}}))
    assert not drv.distill_done(meta)
    meta.write_text(json.dumps({"counts": {"prompts": 10, "answered": 10}}))
    assert drv.distill_done(meta)

    # --distill-limit: fewer prompts for every distilled group (a shorter run), nothing else changes.
    small = drv.configure(drv.parse_args(["--budget", "distill", "--groups", "general,code", "--distill-limit", "800"]))
    assert [g.distill["limit"] for g in small] == [800, 800]
    assert [g.distill["limit"] for g in drv.budget("distill") if g.name != "ablation"] == [3200, 2000]
    argv = next(s.argv for s in drv.plan(small, out, "q.jsonl", 1, None, False) if s.argv[0] == "distill")
    assert argv[argv.index("--limit") + 1] == "800"
    # HumanEval of the code group: batched greedy, the same batch for every variant (base, sft, msn, predicted)
    he = [s.argv for s in stages if s.id.endswith(":humaneval")]
    assert len(he) == 4 and all(a[a.index("--batch-size") + 1] == "8" and a[a.index("--method") + 1] == "ar"
                                for a in he)


def test_issue11_targets_are_judged_from_paired_results():
    drv = load_driver()
    rep = sys.modules["report"]
    g = next(g for g in drv.budget("distill") if g.name == "general")

    def entry(loss, jacobi_mat, by_jacobi, agree):
        return {"quality": {"heldout-loss": {"loss": loss}, "agreement": {"exact": agree}},
                "speed": {"overall": {"jacobi": {"mat": jacobi_mat},
                                      "tr-jacobi": {"jacobi_per_step": by_jacobi}}}}

    variants = {"general-sft": entry(1.00, 1.2, 0.10, 0.5), "general-msn-L4x4": entry(1.01, 1.7, 0.25, 0.45)}
    fast = {"general-msn-L4x4": {"ratio": 1.2, "diff": {"mean": 3.0, "ci95": (1.0, 5.0), "wins": 20, "losses": 6,
                                                        "n": 26}}}
    rows = rep._issue11_targets(g, variants, {"tps_vs_sft": {"general": fast}}, variants["general-sft"])
    assert [r["holds"] for r in rows] == ["yes", "yes", "yes", "yes"]
    variants["general-msn-L4x4"] = entry(1.02, 1.5, 0.15, 0.45)
    fast["general-msn-L4x4"]["diff"]["ci95"] = (-1.0, 5.0)
    rows = rep._issue11_targets(g, variants, {"tps_vs_sft": {"general": fast}}, variants["general-sft"])
    assert [r["holds"] for r in rows] == ["no", "no", "no", "no"]
    assert rep.ratio_vs({"1": 20.0, "2": 30.0}, {"1": 10.0, "3": 1.0})["ratio"] == 2.0


@pytest.mark.parametrize("group", ["ablation", "code"])
def test_predicted_noise_is_kept_only_if_it_beats_ahead_paired(group):
    """Both distilled groups that train ``--noise predicted`` judge it against ahead noise at the same L x segments:
    Jacobi-drafted tokens and tr-jacobi speed must both rise, each paired per question with an interval above 0."""
    load_driver()
    rep = sys.modules["report"]
    by_jacobi = sys.modules["budgets"].BY_JACOBI
    g = next(g for g in sys.modules["budgets"].budget("distill") if g.name == group)

    def entry(jac, tps):
        mean = sum(jac.values()) / len(jac)
        return {"speed": {"overall": {"tr-jacobi": {"jacobi_per_step": mean}},
                          "per_question_mat": {by_jacobi: jac}, "per_question_tps": {"tr-jacobi": tps}}}

    def shifted(d, up):  # every question up by ``up``; a list alternates the sign: noise, no shift
        return {k: v + (up if not isinstance(up, list) else up[int(k) % 2]) for k, v in d.items()}

    tps = {str(i): 20.0 + i for i in range(10)}
    jac = {str(i): 0.155 + 0.01 * i for i in range(10)}
    ahead, pred = f"{group}-msn-L4x4", f"{group}-msn-L4x4-predicted"
    variants = {ahead: entry(jac, tps), pred: entry(shifted(jac, 0.1), shifted(tps, 2.0))}
    rows = rep.predicted_vs_ahead(g, variants)
    assert len(rows) == 1 and rows[0]["variant"] == f"{pred} vs {ahead}"
    assert rows[0]["holds"] == "yes" and "0.300 vs 0.200 (paired +0.100" in rows[0]["ours"]
    variants[pred] = entry(shifted(jac, 0.1), shifted(tps, [1.0, -1.0]))
    assert rep.predicted_vs_ahead(g, variants)[0]["holds"] == "no"  # more Jacobi tokens, no faster
    variants[pred] = entry(shifted(jac, [0.02, -0.01]), shifted(tps, 2.0))
    row = rep.predicted_vs_ahead(g, variants)[0]  # faster, but not through Jacobi drafts (section 14g)
    assert row["holds"] == "no" and "0.205 vs 0.200" in row["ours"]
    assert rep.predicted_vs_ahead(g, {**variants, ahead: {}})[0]["holds"] == "n/a"


def test_training_uses_every_core_and_benches_their_own_threads(tmp_path, monkeypatch):
    """Stages run one at a time: training/eval get torch's default threads, benchmarks the fixed --threads."""
    drv = load_driver()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    groups = drv.budget("toy")[:1]
    groups[0].variants = [sys.modules["budgets"].SFT]
    stages = drv.plan(groups, tmp_path, "q.jsonl", 1, None, False)
    seen: dict[str, str | None] = {}

    def fake_launch(st, log, env, verbose):  # writes what the real command would, so the next stage runs
        seen[st.id] = env.get("OMP_NUM_THREADS")
        assert env["PYTHONUNBUFFERED"] == "1"
        body = {"train": {"steps": 10**6}, "speed": {"status": "complete", "questions": 1}}.get(
            st.kind, {"loss": 1.0, "acc": 0.1})
        drv.write_json(st.output, body)
        return 0

    monkeypatch.setattr(drv, "launch_subprocess", fake_launch)
    result = drv.run_stages(stages, tmp_path, "subprocess", 1, False, False, train_threads=None)
    assert result["counts"] == {"ran": 4, "skipped": 0, "failed": 0, "blocked": 0}
    assert seen == {"train:general-sft": None, "quality:general-sft:heldout-loss": None,
                    "quality:general-sft:denoise": None, "speed:general-sft": "1"}
    again = drv.plan(groups, tmp_path / "again", "q.jsonl", 1, None, False)
    drv.run_stages(again, tmp_path / "again", "subprocess", 1, False, False, train_threads=2)
    assert seen["train:general-sft"] == "2" and seen["speed:general-sft"] == "1"


def _summary(speedups: dict[str, dict[str, float]], mats: dict[str, float]) -> dict:
    """A bench summary.json with the shape msn bench writes, for two categories."""
    methods = {}
    for m in ("ar", "pld", "jacobi", "tr-jacobi"):
        cats = {c: {"tokens_per_s": 10.0 * s, "speedup": s, "mat": mats[m], "identical_rate": 1.0, "answers": 1}
                for c, s in speedups[m].items()}
        overall = sum(speedups[m].values()) / len(speedups[m])
        methods[m] = {"overall": {"tokens_per_s": 10.0 * overall, "speedup": overall, "mat": mats[m],
                                  "identical_rate": 1.0, "answers": 2}, "categories": cats}
    return {"status": "complete", "questions": 2, "categories": ["writing", "qa"], "methods": methods,
            "device": "cpu", "dtype": "bf16"}


def test_claims_from_synthetic_results(tmp_path):
    """The claims column reads the numbers right: MSN faster than SFT, retrieval per category, L ablation."""
    drv = load_driver()
    groups = [g for g in drv.budget("toy") if g.name == "general"]
    out = tmp_path
    speed = {  # variant -> (tr-jacobi speedups per category, jacobi, MATs)
        "base": ({"writing": 1.1, "qa": 1.2}, {"writing": 0.9, "qa": 0.9}, 1.2, 1.5),
        "sft": ({"writing": 1.2, "qa": 1.3}, {"writing": 0.9, "qa": 1.0}, 1.2, 1.6),
        "msn-L4": ({"writing": 2.4, "qa": 2.6}, {"writing": 1.5, "qa": 2.8}, 2.0, 3.1),
        "msn-L4x8": ({"writing": 2.0, "qa": 2.1}, {"writing": 1.4, "qa": 1.5}, 1.9, 2.9),
        "msn-L1": ({"writing": 1.5, "qa": 1.6}, {"writing": 1.0, "qa": 1.1}, 1.3, 1.9),
        "msn-L8": ({"writing": 2.2, "qa": 2.3}, {"writing": 1.4, "qa": 1.5}, 1.9, 2.8),
    }
    loss = {"base": 2.0, "sft": 1.50, "msn-L4": 1.52, "msn-L4x8": 1.60, "msn-L1": 1.5, "msn-L8": 1.55}
    for v, (tr, jac, mat_j, mat_t) in speed.items():
        vid = f"general-{v}"
        s = _summary({"ar": {"writing": 1.0, "qa": 1.0}, "pld": {"writing": 1.3, "qa": 1.4}, "jacobi": jac,
                      "tr-jacobi": tr}, {"ar": 1.0, "pld": 1.5, "jacobi": mat_j, "tr-jacobi": mat_t})
        drv.write_json(out / "bench" / vid / "summary.json", s)
        drv.write_json(out / "quality" / vid / "heldout-loss.json", {"loss": loss[v], "perplexity": 5.0,
                                                                     "next_token_acc": 0.5})
        drv.write_json(out / "quality" / vid / "denoise.json", {"acc": 0.1, **{f"acc_{k}": 0.1 for k in range(4)}})
    stages = drv.plan(groups, out, "q.jsonl", 1, None, False)
    result = {"status": {}, "counts": {"ran": 0, "skipped": 0, "failed": 0, "blocked": 0}}
    report = drv.write_report(groups, stages, out, "toy", "q.jsonl", "python run.py", result)
    claims = {(c["claim"].split(" ")[0] + " " + c["claim"].split(" ")[1], c["variant"]): c
              for c in report["tables"]["claims"]}
    assert claims[("tr-jacobi speed-up", "general-msn-L4")]["holds"] == "yes"  # 2.5x
    assert claims[("tr-jacobi speed-up", "general-msn-L4x8")]["holds"] == "no"  # 2.05x
    assert claims[("noisy SFT", "general-msn-L4")]["holds"] == "yes"
    assert claims[("quality kept", "general-msn-L4")]["holds"] == "yes"  # 1.52 <= 1.50 * 1.02
    assert claims[("quality kept", "general-msn-L4x8")]["holds"] == "no"  # 1.60 > 1.53
    assert claims[("retrieval helps", "general-msn-L4")]["holds"] == "no"  # qa: 2.8 jacobi > 2.6 tr-jacobi
    assert claims[("retrieval helps", "general-msn-L4")]["ours"] == "1/2 categories"
    assert claims[("noise length", "general ablation")]["holds"] == "yes"
    md = (out / "report.md").read_text()
    assert "| general-msn-L4 | ahead L=4 x1 |" in md and "2.50x (MAT 3.10)" in md


def test_skip_stale_and_blocked_stages(tmp_path, monkeypatch):
    """Complete outputs skip; a result older than its model reruns; a failed training blocks its dependents."""
    drv = load_driver()
    ran: list[str] = []

    def fake_launch(stage, log, env, verbose):
        ran.append(stage.id)
        if stage.extra.get("fail"):
            return 1
        stage.output.write_text("{}")
        return 0

    monkeypatch.setattr(drv, "launch_subprocess", fake_launch)
    done = drv.eval_done("x")

    def exists(p: Path) -> bool:
        return p.is_file()

    model, result = tmp_path / "model.json", tmp_path / "result.json"
    stages = [drv.Stage("train:a", "train", "a", ["train"], model, exists),
              drv.Stage("quality:a", "quality", "a", ["eval"], result, exists, needs="train:a")]
    first = drv.run_stages(stages, tmp_path, "subprocess", None, False, False)
    assert ran == ["train:a", "quality:a"] and first["counts"]["ran"] == 2
    ran.clear()
    again = drv.run_stages(stages, tmp_path, "subprocess", None, False, False)
    assert ran == [] and again["counts"]["skipped"] == 2
    os.utime(model, (result.stat().st_mtime + 10, result.stat().st_mtime + 10))  # the model was retrained
    drv.run_stages(stages, tmp_path, "subprocess", None, False, False)
    assert ran == ["quality:a"]
    ran.clear()
    broken = [drv.Stage("train:b", "train", "b", ["train"], tmp_path / "b.json", done, extra={"fail": True}),
              drv.Stage("speed:b", "speed", "b", ["bench"], tmp_path / "c.json", done, needs="train:b")]
    res = drv.run_stages(broken, tmp_path, "subprocess", None, False, False)
    assert ran == ["train:b"] and res["status"] == {"train:b": "failed", "speed:b": "blocked"}


def test_paired_per_question_comparison(tmp_path):
    """MAT per question from answer files, then paired differences with a bootstrap interval."""
    load_driver()
    rep = sys.modules["report"]
    answers = tmp_path / "jacobi.jsonl"
    rows = [{"question_id": 1, "choices": [{"new_tokens": [8, 4], "decoding_steps": [4, 2],
                                            "accepted_by_source": {"jacobi": [1, 0, 0, 1, 1, 0]}}]},
            {"question_id": 2, "choices": [{"new_tokens": [9], "decoding_steps": [9]}]},
            {"question_id": 3, "choices": [{"new_tokens": [4], "decoding_steps": [2],  # before the per-source maps
                                            "jacobi_accepted": [1, 0]}]}]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert rep.per_question(answers, rep.tokens_per_step) == {"1": 2.0, "2": 1.0, "3": 2.0}
    # q2 has no per-source counts (a method without a tree); q3 only the older jacobi_accepted field
    assert rep.per_question(answers, rep.drafted_per_step("jacobi")) == {"1": 0.5, "3": 0.5}
    assert rep.per_question(tmp_path / "missing.jsonl", rep.tokens_per_step) == {}

    a = {str(i): 1.5 + 0.01 * i for i in range(20)}
    b = {str(i): 1.4 for i in range(20)} | {"extra": 9.0}  # only shared questions count
    r = rep.paired(a, b)
    assert r["n"] == 20 and r["wins"] == 20 and r["losses"] == 0
    assert r["ci95"][0] <= r["mean"] <= r["ci95"][1] and r["ci95"][0] > 0
    flipped = rep.paired(b, a)
    assert flipped["mean"] == pytest.approx(-r["mean"]) and flipped["losses"] == 20
    assert rep.paired({"1": 1.0}, {"2": 1.0}) is None


def test_jacobi_depth_curve_from_answer_steps(tmp_path):
    """Per-depth acceptance: share of all steps (every question and turn) that accepted >= d drafts."""
    load_driver()
    rep = sys.modules["report"]
    answers = tmp_path / "jacobi.jsonl"
    rows = [{"question_id": 1, "choices": [{"accept_lengths": [1, 2, 3, 1], "tree_sizes": [0, 2, 4, 2]}]},
            {"question_id": 2, "choices": [{"accept_lengths": [5, 1, 1, 1]}]}]  # no tree sizes: steps still count
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows) + "torn line\n")
    c = rep.depth_curve(answers, depths=4)
    assert c["steps"] == 8
    assert c["at_least"] == [3 / 8, 2 / 8, 1 / 8, 1 / 8]  # drafts per step: 0,1,2,0,4,0,0,0
    assert c["nodes_per_step"] == 2.0
    assert rep.depth_curve(tmp_path / "missing.jsonl") is None


def test_last_doubling_reads_the_training_curves():
    """Denoising and loss gap at half the steps and at the end: the report's evidence of a flat trend."""
    load_driver()
    rep = sys.modules["report"]
    msn = [{"step": 190, "eval_loss": 0.52, "eval_denoise_acc": 0.12}, {"step": 380, "eval_loss": 0.49, "eval_denoise_acc": 0.13},
           {"step": 570, "eval_loss": 0.488}, {"step": 760, "eval_loss": 0.48, "eval_denoise_acc": 0.133}]
    sft = [{"step": 380, "eval_loss": 0.40}, {"step": 760, "eval_loss": 0.40}]
    d = rep.last_doubling(msn, sft)
    assert (d["from_step"], d["to_step"]) == (380, 760)
    assert d["denoise"] == (0.13, 0.133) and d["loss"] == (0.49, 0.48)
    assert d["loss_gap"] == pytest.approx((0.225, 0.2))
    assert rep.last_doubling(msn, None)["loss_gap"] is None
    assert rep.last_doubling(msn[:1]) is None
