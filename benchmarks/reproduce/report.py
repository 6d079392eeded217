"""The reproduce driver's report: read what the msn commands wrote, pair models per question, render
report.md / report.json / report.png. Reads files only, so ``--stages ''`` rewrites it in a second."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from budgets import BY_JACOBI, DENOISE_L, METHODS, PAIRED, PAPER, QUALITY_HE_PROBLEMS, QUALITY_LOSS_TOL, Group

from msn.bench.stats import drafted_per_step, paired, per_question, tokens_per_s, tokens_per_step
from msn.clock import load_average, now

DEPTHS = 4  # depth curve columns: accepted at least 1..DEPTHS Jacobi drafts in one step


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _fmt(x: Any, spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _sx(stats: dict | None) -> str:
    """'2.31x (MAT 3.10)'"""
    if not stats:
        return "n/a"
    return f"{_fmt(stats.get('speedup'), '.2f', 'x')} (MAT {_fmt(stats.get('mat'), '.2f')})"


def _sources(stats: dict | None) -> str:
    """'0.21 / 0.85': accepted draft tokens per step a Jacobi node / the retrieval chain drafted."""
    j, r = (stats or {}).get("jacobi_per_step"), (stats or {}).get("retrieval_per_step")
    return "n/a" if j is None or r is None else f"{j:.2f} / {r:.2f}"


def collect(groups: Sequence[Group], out: Path) -> dict[str, Any]:
    """Everything the report shows, read from the files the msn commands wrote."""
    variants: dict[str, Any] = {}
    for g in groups:
        for v in g.variants:
            vid = f"{g.name}-{v.name}"
            qdir, bdir, rdir = out / "quality" / vid, out / "bench" / vid, out / "train" / vid
            entry: dict[str, Any] = {
                "group": g.name, "variant": v.name, "base_model": g.model, "data": g.data,
                "trained": v.noise is not None,
                "noise": None if v.noise is None else {"type": v.noise, "length": v.length, "segments": v.segments},
                "train": None, "quality": {}, "speed": None,
            }
            meta = read_json(rdir / "msn.json") if v.noise is not None else None
            if isinstance(meta, dict):
                entry["train"] = {k: meta.get(k) for k in ("steps", "epochs", "seed", "batch_size", "grad_accum",
                                                           "lr", "bf16", "lora", "noise", "metrics", "data")}
                stamp = read_json(out / "stamps" / f"train_{vid}.json")
                entry["train"]["seconds"] = stamp.get("seconds") if isinstance(stamp, dict) else None
                entry["train"]["log"] = _train_log(read_json(qdir / "train_log.json"))
            for task in ("heldout-loss", "denoise", "agreement", "humaneval"):
                res = read_json(qdir / f"{task}.json")
                if isinstance(res, dict):
                    res.pop("results", None)  # per-problem detail stays in the file
                    entry["quality"][task] = res
            summ = read_json(bdir / "summary.json")
            if isinstance(summ, dict) and summ.get("methods"):
                entry["speed"] = {
                    "status": summ.get("status"), "questions": summ.get("questions"),
                    "categories": summ.get("categories"),
                    "meta": {k: summ.get(k) for k in ("device", "device_name", "dtype", "torch_threads", "tree",
                                                       "max_new_tokens", "started", "finished",
                                                       "load_average_start", "load_average_end")},
                    "overall": {m: e["overall"] for m, e in summ["methods"].items()},
                    "per_category": {m: e["categories"] for m, e in summ["methods"].items()},
                    "per_question_mat": {m: per_question(bdir / "answers" / f"{m}.jsonl", tokens_per_step)
                                         for m in summ["methods"]},
                }
                entry["speed"]["per_question_tps"] = {m: per_question(bdir / "answers" / f"{m}.jsonl", tokens_per_s)
                                                      for m in summ["methods"]}
                entry["speed"]["jacobi_depths"] = depth_curve(bdir / "answers" / "jacobi.jsonl")
                by_jacobi = per_question(bdir / "answers" / "tr-jacobi.jsonl", drafted_per_step("jacobi"))
                if by_jacobi:  # benches before the per-source counts existed have none
                    entry["speed"]["per_question_mat"][BY_JACOBI] = by_jacobi
            variants[vid] = entry
    return variants


def depth_curve(path: Path, depths: int = DEPTHS) -> dict[str, Any] | None:
    """Where Jacobi's gain goes, step by step: over every decoding step of one method's answers, the share of
    steps that accepted at least d drafts (d = 1..``depths``), and the draft nodes verified per step.

    Read from pure ``jacobi`` answers this is the per-depth acceptance curve of the model's own Jacobi drafts
    (the auto tree decides how many nodes each step verifies, so the node count is shown beside it)."""
    lengths: list[int] = []
    nodes: list[int] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                c = json.loads(line)["choices"][0]
                lengths += [int(a) - 1 for a in c["accept_lengths"]]
                nodes += [int(n) for n in (c.get("tree_sizes") or [])]
    if not lengths:
        return None
    return {"steps": len(lengths), "at_least": [sum(x >= d for x in lengths) / len(lengths) for d in range(1, depths + 1)],
            "nodes_per_step": sum(nodes) / len(nodes) if nodes else None}


def ratio_vs(a: dict[str, float], b: dict[str, float]) -> dict[str, Any] | None:
    """Per question a / b (tokens/s of two models on the same question): the ratio of the means and the paired
    difference a - b with its bootstrap interval (does the speed difference exceed question-to-question noise?)."""
    diff = paired(a, b)  # on the shared questions
    return None if diff is None else {"ratio": diff["ratio"], "diff": diff}


def _train_log(history: Any) -> list[dict[str, Any]]:
    """Per evaluation step: held-out loss and denoising accuracy (from Trainer's log history)."""
    if not isinstance(history, list):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for e in history:
        if not isinstance(e, dict) or "step" not in e:
            continue
        row = by_step.setdefault(int(e["step"]), {"step": int(e["step"])})
        if "eval_loss" in e:
            row["eval_loss"] = e["eval_loss"]
        accs = {k: v for k, v in e.items() if k.startswith("eval_denoise_acc")}
        row.update(accs)
    return [r for _, r in sorted(by_step.items()) if len(r) > 1]


def last_doubling(log: list[dict[str, Any]], sft_log: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """What the last doubling of training bought: denoising accuracy (mean over k) and held-out loss at the
    final evaluation and at the evaluation nearest half its steps; with ``sft_log``, the held-out loss gap to
    plain SFT at the same two steps. A flat last doubling says more of the same budget will not reach a target."""
    rows = [r for r in log if r.get("eval_denoise_acc") is not None]
    if len(rows) < 2:
        return None
    end = rows[-1]
    half = min(rows[:-1], key=lambda r: abs(r["step"] - end["step"] / 2))
    out = {"from_step": half["step"], "to_step": end["step"],
           "denoise": (half["eval_denoise_acc"], end["eval_denoise_acc"]),
           "loss": (half.get("eval_loss"), end.get("eval_loss")), "loss_gap": None}
    sft = {r["step"]: r.get("eval_loss") for r in sft_log or []}
    if None not in (sft.get(half["step"]), sft.get(end["step"]), *out["loss"]):
        out["loss_gap"] = tuple(m / sft[r["step"]] - 1 for m, r in zip(out["loss"], (half, end), strict=True))
    return out


def _q(entry: dict, task: str, key: str) -> Any:
    return (entry["quality"].get(task) or {}).get(key)


def _speed(entry: dict, method: str) -> dict | None:
    return (entry.get("speed") or {}).get("overall", {}).get(method)


def _noise_label(entry: dict) -> str:
    n = entry["noise"]
    if n is None:
        return "untrained"
    if n["type"] == "none":
        return "plain SFT"
    return f"{n['type']} L={n['length']} x{n['segments']}"


def tables(groups: Sequence[Group], variants: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"side_by_side": {}, "decoders": {}, "noise_length_ablation": [], "paired_vs_sft": {},
                           "tps_vs_sft": {},
                           "retrieval_ablation": {}, "claims": [], "training_curves": {}, "bench_runs": []}
    for g in groups:
        rows = []
        ids = [f"{g.name}-{v.name}" for v in g.variants]
        for vid in ids:
            e = variants[vid]
            rows.append({
                "variant": vid, "noise": _noise_label(e), "steps": (e["train"] or {}).get("steps"),
                "heldout_loss": _q(e, "heldout-loss", "loss"), "perplexity": _q(e, "heldout-loss", "perplexity"),
                "next_token_acc": _q(e, "heldout-loss", "next_token_acc"),
                "denoise_acc": _q(e, "denoise", "acc"),
                "denoise_acc_k": [_q(e, "denoise", f"acc_{k}") for k in range(DENOISE_L)],
                "humaneval_pass_at_1": _q(e, "humaneval", "pass_at_1") if g.humaneval else None,
                "humaneval_n": _q(e, "humaneval", "n") if g.humaneval else None,
                "agreement_exact": _q(e, "agreement", "exact"), "agreement_prefix": _q(e, "agreement", "prefix"),
                "ar_tokens_per_s": (_speed(e, "ar") or {}).get("tokens_per_s"),
                **{f"{m}_speedup": (_speed(e, m) or {}).get("speedup") for m in METHODS if m != "ar"},
                **{f"{m}_mat": (_speed(e, m) or {}).get("mat") for m in METHODS if m != "ar"},
                "tr-jacobi_identical": (_speed(e, "tr-jacobi") or {}).get("identical_rate"),
            })
        out["side_by_side"][g.name] = rows
        out["decoders"][g.name] = {
            m: {vid: _speed(variants[vid], m) for vid in ids} for m in METHODS if m != "ar"
        }
        # retrieval ablation: jacobi vs tr-jacobi, per category, from the same bench runs
        retr: dict[str, Any] = {}
        for vid in ids:
            sp = variants[vid].get("speed")
            if not sp:
                continue
            cats = {}
            for c in sp["categories"] or []:
                j = sp["per_category"].get("jacobi", {}).get(c)
                t = sp["per_category"].get("tr-jacobi", {}).get(c)
                if j and t:
                    cats[c] = {"jacobi": j, "tr-jacobi": t,
                               "helps": (t.get("speedup") or 0) > (j.get("speedup") or 0)}
            retr[vid] = {"categories": cats, "helped": sum(c["helps"] for c in cats.values()), "n": len(cats),
                         "overall": {"jacobi": _speed(variants[vid], "jacobi"),
                                     "tr-jacobi": _speed(variants[vid], "tr-jacobi")}}
        out["retrieval_ablation"][g.name] = retr
        sft_speed = (variants.get(f"{g.name}-sft") or {}).get("speed")
        if sft_speed:
            out["paired_vs_sft"][g.name] = {
                vid: {m: paired(variants[vid]["speed"]["per_question_mat"].get(m, {}),
                                sft_speed["per_question_mat"].get(m, {})) for m in PAIRED}
                for vid in ids if vid != f"{g.name}-sft" and variants[vid].get("speed")}
            out["tps_vs_sft"][g.name] = {
                vid: ratio_vs(variants[vid]["speed"]["per_question_tps"].get("tr-jacobi", {}),
                              sft_speed["per_question_tps"].get("tr-jacobi", {}))
                for vid in ids if vid != f"{g.name}-sft" and variants[vid].get("speed")
                and "per_question_tps" in variants[vid]["speed"] and "per_question_tps" in sft_speed}
        for vid in ids:
            e = variants[vid]
            if e["train"] and e["train"].get("log"):
                out["training_curves"][vid] = e["train"]["log"]
            if e.get("speed"):
                out["bench_runs"].append({"variant": vid, "questions": e["speed"]["questions"],
                                          "status": e["speed"]["status"], **e["speed"]["meta"]})
        if g.ablation:
            abl = [v for v in g.variants if v.noise == "ahead" and v.segments == g.ablation_segments]
            for v in sorted(abl, key=lambda v: v.length):
                e = variants[f"{g.name}-{v.name}"]
                out["noise_length_ablation"].append({
                    "variant": f"{g.name}-{v.name}", "length": v.length, "segments": v.segments,
                    "denoise_acc": _q(e, "denoise", "acc"), "heldout_loss": _q(e, "heldout-loss", "loss"),
                    "next_token_acc": _q(e, "heldout-loss", "next_token_acc"),
                    "jacobi_mat": (_speed(e, "jacobi") or {}).get("mat"),
                    "tr-jacobi_mat": (_speed(e, "tr-jacobi") or {}).get("mat"),
                    "tr-jacobi_speedup": (_speed(e, "tr-jacobi") or {}).get("speedup"),
                    "jacobi_mat_vs_sft": (out["paired_vs_sft"].get(g.name, {}).get(f"{g.name}-{v.name}")
                                          or {}).get("jacobi"),
                })
    out["claims"] = claims(groups, variants, out)
    return out


def claims(groups: Sequence[Group], variants: dict[str, Any], t: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def holds(x: bool | None) -> str:
        return "n/a" if x is None else ("yes" if x else "no")

    for g in groups:
        sft = variants.get(f"{g.name}-sft")
        if g.distill and not g.ablation and sft:
            rows += _issue11_targets(g, variants, t, sft)
        for v in g.variants:
            if v.noise != "ahead" or (v.length != PAPER["best_length"]):
                continue
            vid = f"{g.name}-{v.name}"
            e = variants[vid]
            tr = _speed(e, "tr-jacobi") or {}
            s = tr.get("speedup")
            rows.append({"claim": "tr-jacobi speed-up 2.3-2.7x", "paper": "2.3-2.7x (Vicuna-7B, A100)",
                         "variant": vid, "ours": _fmt(s, ".2f", "x"),
                         "holds": holds(None if s is None else s >= PAPER["speedup"][0])})
            if sft:
                mj, sj = (_speed(e, "jacobi") or {}).get("mat"), (_speed(sft, "jacobi") or {}).get("mat")
                mt, st = tr.get("mat"), (_speed(sft, "tr-jacobi") or {}).get("mat")
                ok = None if None in (mj, sj, mt, st) else (mj > sj and mt > st)
                rows.append({"claim": "noisy SFT unlocks Jacobi: more accepted tokens than plain SFT",
                             "paper": "yes", "variant": vid,
                             "ours": f"MAT jacobi {_fmt(mj, '.2f')} vs {_fmt(sj, '.2f')}, "
                                     f"tr-jacobi {_fmt(mt, '.2f')} vs {_fmt(st, '.2f')}", "holds": holds(ok)})
                ml, sl = _q(e, "heldout-loss", "loss"), _q(sft, "heldout-loss", "loss")
                ok_loss = None if None in (ml, sl) else ml <= sl * (1 + QUALITY_LOSS_TOL)
                text = f"held-out loss {_fmt(ml)} vs SFT {_fmt(sl)}"
                ok = ok_loss
                if g.humaneval:
                    mh, sh, n = _q(e, "humaneval", "pass_at_1"), _q(sft, "humaneval", "pass_at_1"), _q(e, "humaneval", "n")
                    text += f"; HumanEval {_fmt(mh)} vs {_fmt(sh)} (n={n})"
                    ok_he = None if None in (mh, sh) or not n else mh >= sh - QUALITY_HE_PROBLEMS / n
                    ok = None if None in (ok_loss, ok_he) else (ok_loss and ok_he)
                rows.append({"claim": "quality kept (vs plain SFT, same data/steps/seed)", "paper": "yes",
                             "variant": vid, "ours": text, "holds": holds(ok)})
            r = t["retrieval_ablation"][g.name].get(vid)
            if r and r["n"]:
                rows.append({"claim": "retrieval helps every category (tr-jacobi > jacobi)", "paper": "yes",
                             "variant": vid, "ours": f"{r['helped']}/{r['n']} categories",
                             "holds": holds(r["helped"] == r["n"])})
        rows += predicted_vs_ahead(g, variants)  # no row unless the group trains a predicted variant
        if g.ablation:
            abl = [r for r in t["noise_length_ablation"] if r["variant"].startswith(f"{g.name}-")]
            scored = [r for r in abl if r["tr-jacobi_speedup"] is not None]
            if {r["length"] for r in scored} >= {1, 4, 8}:
                best = max(scored, key=lambda r: r["tr-jacobi_speedup"])
                ours = ", ".join(f"L={r['length']}: {r['tr-jacobi_speedup']:.2f}x" for r in scored)
                rows.append({"claim": "noise length 4 is best of {1, 4, 8}", "paper": "L=4",
                             "variant": f"{g.name} ablation", "ours": ours + f" (best L={best['length']})",
                             "holds": holds(best["length"] == PAPER["best_length"])})
            else:
                rows.append({"claim": "noise length 4 is best of {1, 4, 8}", "paper": "L=4",
                             "variant": f"{g.name} ablation", "ours": "n/a (ablation incomplete)", "holds": "n/a"})
    return rows


def predicted_vs_ahead(g: Group, variants: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11 item 2: keep ``--noise predicted`` only if it wins against ``ahead`` at the same length and
    segments on the mechanism it is for: more Jacobi-drafted tokens per step *and* faster tr-jacobi, both paired
    per question with a bootstrap interval above 0. Speed alone is not enough: a model whose answers repeat more
    is faster through retrieval (docs/results.md section 14g), which says nothing about the noise."""
    rows = []
    for v in g.variants:
        ahead = next((a for a in g.variants if a.noise == "ahead" and (a.length, a.segments) == (v.length, v.segments)),
                     None)
        if v.noise != "predicted" or ahead is None:
            continue
        vid, aid = f"{g.name}-{v.name}", f"{g.name}-{ahead.name}"
        e, a = variants[vid], variants[aid]
        rj = rt = None
        if e.get("speed") and a.get("speed"):
            rj = ratio_vs(e["speed"]["per_question_mat"].get(BY_JACOBI, {}),
                          a["speed"]["per_question_mat"].get(BY_JACOBI, {}))
            rt = ratio_vs(e["speed"]["per_question_tps"].get("tr-jacobi", {}),
                          a["speed"]["per_question_tps"].get("tr-jacobi", {}))
        dj, dt = (rj or {}).get("diff"), (rt or {}).get("diff")
        ok = None if not (dj and dt) else (dj["ci95"][0] > 0 and dt["ci95"][0] > 0)
        mj, aj = ((_speed(x, "tr-jacobi") or {}).get("jacobi_per_step") for x in (e, a))
        ours = f"Jacobi-drafted per step {_fmt(mj, '.3f')} vs {_fmt(aj, '.3f')}"
        if dj:
            ours += f" (paired {dj['mean']:+.3f} [{dj['ci95'][0]:+.3f}, {dj['ci95'][1]:+.3f}])"
        if dt:
            ours += f"; tr-jacobi {rt['ratio']:.2f}x, paired {dt['mean']:+.1f} tok/s [{dt['ci95'][0]:+.1f}, {dt['ci95'][1]:+.1f}]"
        rows.append({"claim": "predicted noise beats ahead noise (else drop it)", "paper": "issue 11 item 2",
                     "variant": f"{vid} vs {aid}", "ours": ours, "holds": "n/a" if ok is None else ("yes" if ok else "no")})
    return rows


def _issue11_targets(g: Group, variants: dict[str, Any], t: dict[str, Any], sft: dict) -> list[dict[str, Any]]:
    """Issue 11's acceptance for each MSN variant trained on the base model's own answers."""
    rows = []

    def holds(x: bool | None) -> str:
        return "n/a" if x is None else ("yes" if x else "no")

    for v in g.variants:
        if v.noise != "ahead":
            continue
        vid = f"{g.name}-{v.name}"
        e, target = variants[vid], "issue 11 target"
        mj = (_speed(e, "tr-jacobi") or {}).get("jacobi_per_step")
        sj = (_speed(sft, "tr-jacobi") or {}).get("jacobi_per_step")
        ok = None if None in (mj, sj) or not sj else mj >= 2 * sj
        rows.append({"claim": "Jacobi-drafted accepted tokens per step (inside tr-jacobi) >= 2x SFT's", "paper": target,
                     "variant": vid, "ours": f"{_fmt(mj, '.3f')} vs {_fmt(sj, '.3f')}", "holds": holds(ok)})
        r = t["tps_vs_sft"].get(g.name, {}).get(vid)
        d = (r or {}).get("diff")
        ok = None if not r or not d else (r["ratio"] >= 1.15 and d["ci95"][0] > 0)
        ours = "n/a" if not r or not d else (f"{r['ratio']:.2f}x; paired {d['mean']:+.1f} tok/s "
                                              f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] {d['wins']}/{d['losses']} of {d['n']}")
        rows.append({"claim": "tr-jacobi tokens/s >= 1.15x SFT's, paired interval excludes 0", "paper": target,
                     "variant": vid, "ours": ours, "holds": holds(ok)})
        jm = (_speed(e, "jacobi") or {}).get("mat")
        rows.append({"claim": "pure jacobi MAT >= 1.6", "paper": target, "variant": vid, "ours": _fmt(jm, ".2f"),
                     "holds": holds(None if jm is None else jm >= 1.6)})
        ml, sl = _q(e, "heldout-loss", "loss"), _q(sft, "heldout-loss", "loss")
        ok = None if None in (ml, sl) else ml <= sl * 1.015
        ae, se = _q(e, "agreement", "exact"), _q(sft, "agreement", "exact")
        rows.append({"claim": "held-out loss (distilled held-out split) within 1.5% of SFT's", "paper": target,
                     "variant": vid, "ours": f"{_fmt(ml)} vs {_fmt(sl)}; greedy agreement with the base "
                                            f"{_fmt(ae, '.2f')} vs SFT {_fmt(se, '.2f')}", "holds": holds(ok)})
    return rows


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "load_average": load_average()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):  # no torch import: the report stays instant
        info["torch"] = importlib.metadata.version("torch")
    info["gpu"] = None
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            info["gpu"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                         timeout=30).stdout.strip() or None
    return info


def render_markdown(report: dict[str, Any], groups: Sequence[Group]) -> str:
    t = report["tables"]
    L: list[str] = [
        f"# Reproduction: plain SFT vs MSN ({report['budget']} budget)", "",
        f"- generated: {report['created']}",
        f"- machine: {report['machine'].get('cpu', '?')} ({report['machine'].get('cpu_count')} cores), "
        f"GPU {report['machine'].get('gpu') or 'none'}, torch {report['machine'].get('torch', '?')}, "
        f"{report['machine'].get('platform')}",
        f"- questions: `{report['questions']}`",
        f"- stages: {report['stage_counts']}", "",
        "Speed-up is tokens/s relative to `ar` within the same bench run (Spec-Bench conventions, bf16, greedy, "
        "batch 1); MAT = mean accepted tokens per decoding step, bonus token included. Denoising accuracy: one "
        f"ahead-noise segment of {DENOISE_L} in held-out text, accuracy of the argmax at noised position k for "
        "the clean next token, mean over k (the same L for every model).", "",
    ]
    for g in groups:
        rows = t["side_by_side"][g.name]
        L += [f"## {g.name}: `{g.model}` on `{g.data}`" + (" (LoRA)" if g.lora else ""), "",
              "### Quality and speed side by side", ""]
        he = " HumanEval pass@1 |" if g.humaneval else ""
        he += " agreement with base (exact / prefix) |" if g.distill else ""
        L.append("| variant | noise | steps | held-out loss | ppl | next-token acc | denoise acc (k=0..3) |" + he +
                 " AR tok/s | pld | jacobi | tr-jacobi | tr-jacobi identical |")
        L.append("|---|---|---:|---:|---:|---:|---|" + ("---:|" if g.humaneval else "") + ("---:|" if g.distill else "")
                 + "---:|---:|---:|---:|---:|")
        for r in rows:
            ks = " ".join(_fmt(a, ".2f") for a in r["denoise_acc_k"])
            steps = "0" if r["noise"] == "untrained" else _fmt(r["steps"], "d")
            cells = [r["variant"], r["noise"], steps,
                     _fmt(r["heldout_loss"]), _fmt(r["perplexity"], ".2f"), _fmt(r["next_token_acc"]),
                     f"{_fmt(r['denoise_acc'])} ({ks})"]
            if g.humaneval:
                cells.append(f"{_fmt(r['humaneval_pass_at_1'])} (n={r['humaneval_n'] or 0})")
            if g.distill:
                cells.append(f"{_fmt(r['agreement_exact'], '.2f')} / {_fmt(r['agreement_prefix'], '.2f')}")
            cells += [_fmt(r["ar_tokens_per_s"], ".1f")]
            for m in ("pld", "jacobi", "tr-jacobi"):
                cells.append(f"{_fmt(r[f'{m}_speedup'], '.2f', 'x')} (MAT {_fmt(r[f'{m}_mat'], '.2f')})")
            ident = r["tr-jacobi_identical"]
            cells.append(_fmt(None if ident is None else 100 * ident, ".0f", "%"))
            L.append("| " + " | ".join(cells) + " |")
        L += ["", "### Each decoder across models (speed-up vs the same model's ar, MAT)", ""]
        dec = t["decoders"][g.name]
        vids = [r["variant"] for r in rows]
        L.append("| decoder | " + " | ".join(vids) + " |")
        L.append("|---|" + "---:|" * len(vids))
        for m, by in dec.items():
            L.append(f"| {m} | " + " | ".join(_sx(by[v]) for v in vids) + " |")
        tr = dec.get("tr-jacobi", {})
        if any((tr.get(v) or {}).get("jacobi_per_step") is not None for v in vids):
            L.append("| tr-jacobi: accepted drafts per step by Jacobi / retrieval | "
                     + " | ".join(_sources(tr.get(v)) for v in vids) + " |")
        retr = t["retrieval_ablation"][g.name]
        if retr:
            cats = list(dict.fromkeys(c for r in retr.values() for c in r["categories"]))
            L += ["", "### Retrieval ablation: jacobi -> tr-jacobi speed-up per category (same bench runs)", ""]
            L.append("| category | " + " | ".join(retr) + " |")
            L.append("|---|" + "---:|" * len(retr))
            for c in cats:
                cells = []
                for r in retr.values():
                    x = r["categories"].get(c)
                    cells.append("n/a" if not x else f"{_fmt(x['jacobi'].get('speedup'), '.2f')} -> "
                                 f"{_fmt(x['tr-jacobi'].get('speedup'), '.2f')}x" + (" +" if x["helps"] else " -"))
                L.append(f"| {c} | " + " | ".join(cells) + " |")
            L.append("| **helped** | " + " | ".join(f"{r['helped']}/{r['n']}" for r in retr.values()) + " |")
        L.append("")
    for gname, rows in t["paired_vs_sft"].items():
        if not rows:
            continue
        L += [f"## {gname}: MAT per question against plain SFT (paired)", "",
              "Each model writes its own answers, so its MAT mixes better drafts with easier (more repetitive) text. "
              "Per question: this model's MAT minus plain SFT's; mean, 95% bootstrap interval, questions won/lost.", "",
              f"`{BY_JACOBI}`: accepted draft tokens per step that a Jacobi node drafted inside tr-jacobi (Jacobi's "
              "part of tr-jacobi's MAT, without the retrieval chain's).", "",
              "| variant | " + " | ".join(PAIRED) + " |",
              "|---|" + "---:|" * len(PAIRED)]
        for vid, per in rows.items():
            cells = ["n/a" if not r else f"{r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] "
                     f"{r['wins']}/{r['losses']} of {r['n']}" for r in per.values()]
            L.append(f"| {vid} | " + " | ".join(cells) + " |")
        L.append("")
    curves = {vid: e["speed"]["jacobi_depths"] for vid, e in report["variants"].items()
              if (e.get("speed") or {}).get("jacobi_depths")}
    if curves:
        L += ["## Jacobi acceptance by depth (pure `jacobi`, every decoding step)", "",
              "Share of decoding steps whose Jacobi drafts were accepted at least d deep, and the draft nodes the "
              "auto tree verified per step: where a model's denoising shows up (or not) in decoding.", "",
              "| variant | steps | " + " | ".join(f">= {d}" for d in range(1, DEPTHS + 1)) + " | nodes per step |",
              "|---|---:|" + "---:|" * DEPTHS + "---:|"]
        for vid, c in curves.items():
            L.append(f"| {vid} | {c['steps']} | " + " | ".join(_fmt(x, ".3f") for x in c["at_least"])
                     + f" | {_fmt(c['nodes_per_step'], '.2f')} |")
        L.append("")
    if t["noise_length_ablation"]:
        segs = sorted({r["segments"] for r in t["noise_length_ablation"]})
        per = " / ".join(f"{n} segment{'s' if n > 1 else ''}" for n in segs)
        L += [f"## Noise-length ablation ({per} per sample, same data/steps/seed)", "",
              "| variant | L | denoise acc | held-out loss | next-token acc | jacobi MAT | jacobi MAT - SFT's (paired) "
              "| tr-jacobi MAT | tr-jacobi speed-up |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in t["noise_length_ablation"]:
            d = r.get("jacobi_mat_vs_sft")
            vs = "n/a" if not d else f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            L.append(f"| {r['variant']} | {r['length']} | {_fmt(r['denoise_acc'])} | {_fmt(r['heldout_loss'])} | "
                     f"{_fmt(r['next_token_acc'])} | {_fmt(r['jacobi_mat'], '.2f')} | {vs} | "
                     f"{_fmt(r['tr-jacobi_mat'], '.2f')} | {_fmt(r['tr-jacobi_speedup'], '.2f', 'x')} |")
        L.append("")
    L += ["## The paper's claims", "",
          f"Quality kept means: held-out loss at most {100 * QUALITY_LOSS_TOL:.0f}% above plain SFT and HumanEval "
          f"pass@1 at most {QUALITY_HE_PROBLEMS} problems below it.", "",
          "| claim | paper | variant | ours | holds here |", "|---|---|---|---|---|"]
    for c in t["claims"]:
        L.append(f"| {c['claim']} | {c['paper']} | {c['variant']} | {c['ours']} | {c['holds']} |")
    L.append("")
    if t["training_curves"]:
        L += ["## Denoising accuracy during training (msn train's evaluations)", "",
              "The in-training denoise metric uses each run's own --noise-length; the tables above use "
              f"L={DENOISE_L} for every model.", "",
              "| variant | step | held-out loss | denoise acc k=0.. |", "|---|---:|---:|---|"]
        for vid, log in t["training_curves"].items():
            for r in log:
                ks = sorted((k for k in r if k.startswith("eval_denoise_acc_")), key=lambda k: int(k.rsplit("_", 1)[1]))
                L.append(f"| {vid} | {r['step']} | {_fmt(r.get('eval_loss'))} | "
                         + " ".join(_fmt(r[k], ".3f") for k in ks) + " |")
        L.append("")
        trends = {}
        for vid, log in t["training_curves"].items():
            sft_log = t["training_curves"].get(f"{report['variants'][vid]['group']}-sft")
            if report["variants"][vid]["noise"] and report["variants"][vid]["noise"]["type"] != "none":
                trends[vid] = last_doubling(log, sft_log)
        if any(trends.values()):
            L += ["### Trend: what the last doubling of training steps bought", "",
                  "| variant | steps | denoise acc | held-out loss | loss gap to plain SFT |", "|---|---|---|---|---|"]
            for vid, d in trends.items():
                if d:
                    gap = "n/a" if d["loss_gap"] is None else " -> ".join(f"{100 * g:+.1f}%" for g in d["loss_gap"])
                    L.append(f"| {vid} | {d['from_step']} -> {d['to_step']} | {_fmt(d['denoise'][0])} -> "
                             f"{_fmt(d['denoise'][1])} | {_fmt(d['loss'][0])} -> {_fmt(d['loss'][1])} | {gap} |")
            L.append("")
    if t["bench_runs"]:
        L += ["## Bench runs (timing context)", "",
              "| variant | questions | status | device | threads | tree | started | finished | load start/end |",
              "|---|---:|---|---|---:|---|---|---|---|"]
        for r in t["bench_runs"]:
            L.append(f"| {r['variant']} | {r['questions']} | {r['status']} | {r.get('device_name') or r.get('device')} | "
                     f"{r.get('torch_threads')} | {r.get('tree')} | {r.get('started')} | {r.get('finished')} | "
                     f"{r.get('load_average_start')}/{r.get('load_average_end')} |")
        L.append("")
    missing = [s for s in report["stages"] if s["status"] not in ("ran", "complete")]
    if missing:
        L += ["## Missing results", "", "These stages have no complete output yet (logs in `logs/`); rerun the "
              "driver command below to continue.", "", "| stage | status |", "|---|---|"]
        L += [f"| {s['id']} | {s['status'] or 'not selected in this invocation'} |" for s in missing]
        L.append("")
    L += ["![MAT and speed-up per variant](report.png)", "", "## How to reproduce", "",
          "The whole pipeline (resumable; completed stages are skipped):", "", "```",
          report["driver_command"], "```", "",
          "Each stage is one documented command (`msn` = `python -m msn.cli`), in this order:", "", "```"]
    L += [s["command"] + (f"    # {s['seconds']} s" if s.get("seconds") is not None else "") for s in report["stages"]]
    L += ["```", ""]
    return "\n".join(L)


def plot(report: dict[str, Any], path: Path) -> bool:
    rows = [r for g in report["tables"]["side_by_side"].values() for r in g]
    rows = [r for r in rows if r["ar_tokens_per_s"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ("pld", "jacobi", "tr-jacobi")
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.8 * len(rows) + 2), 7.0), sharex=True)
    width = 0.8 / len(methods)
    for ax, key, label in ((axes[0], "mat", "MAT (tokens / step)"), (axes[1], "speedup", "speed-up vs ar")):
        for i, m in enumerate(methods):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            ax.bar(xs, [r[f"{m}_{key}"] or 0.0 for r in rows], width, label=m)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the legend
    axes[0].legend(fontsize="small", ncol=len(methods), loc="upper left")
    axes[0].set_title(f"MSN reproduction ({report['budget']} budget)")
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels([r["variant"] for r in rows], rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(groups: Sequence[Group], stages: Sequence[Any], out: Path, budget_name: str, questions: str,
                 driver_command: str, result: dict[str, Any]) -> dict[str, Any]:
    variants = collect(groups, out)
    stage_rows = []
    for st in stages:
        stamp = read_json(out / "stamps" / (st.id.replace(":", "_") + ".json"))
        stage_rows.append({"id": st.id, "kind": st.kind, "variant": st.variant_id, "command": st.display,
                           "status": result["status"].get(st.id), "output": str(st.output),
                           "seconds": stamp.get("seconds") if isinstance(stamp, dict) else None,
                           "finished": stamp.get("finished") if isinstance(stamp, dict) else None})
    report = {
        "budget": budget_name, "created": now(), "out": str(out), "questions": questions,
        "driver_command": driver_command, "machine": machine(), "stage_counts": result["counts"],
        "variants": variants, "stages": stage_rows,
    }
    report["tables"] = tables(groups, variants)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report, groups))
    report["plot"] = plot(report, out / "report.png")
    return report
