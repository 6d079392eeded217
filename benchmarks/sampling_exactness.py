"""Sampling is exact (issue 12, item 2): msn's sampled 3-token continuations against the exact distribution.

On tiny random models of two families (llama, qwen2; tests/conftest.py's config with a 32-token vocabulary and
initializer_range 0.3, so the joint distribution of 3 tokens is enumerable and not flat), for each sampling
setting the exact joint p(x1) p(x2 | x1) p(x3 | x1, x2) is enumerated with the same processors as transformers'
warpers (``exact`` from tests/test_sampling.py), then every method of ``msn.METHODS`` samples 3 tokens per
seed (seeds 0..n-1) and four targets are tested: the per-position marginals of tokens 1, 2, 3 and the joint
of the whole 3-token sequence. Two statistics per target:

* Pearson's chi-square goodness of fit, bins expected below 5 pooled into one, p-value from the exact
  chi-square tail (regularized incomplete gamma);
* total-variation distance, against a threshold that holds with probability >= 1 - a for a correct sampler:
  E[TV] under the exact distribution (computed exactly from binomial mean absolute deviations) plus
  sqrt(ln(1/a) / (2n)) (McDiarmid: one sample moves TV by at most 1/n).

Significance: family-wise alpha = 0.001 over all correct-rule tests, Bonferroni: each test at a = alpha / m
(m printed). The runs share seeds, and by construction (coupled sampling) every method's text equals ``ar``'s
for the same seed, so the tests are strongly dependent and Bonferroni is conservative.

A deliberately broken rule (drafts accepted when they equal the argmax, only the bonus token sampled) runs
through the same tests and must be rejected by the joint tests (chi-square and TV). Exit status 1 if any
correct-rule test rejects, a sample falls outside the support, or the broken rule passes a joint test.

    nice -n 10 python benchmarks/sampling_exactness.py --samples 10000 --out runs/sampling-exactness.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tiny_config  # noqa: E402
from test_sampling import chi_square_statistic, exact  # noqa: E402  (pooled chi-square; one row's exact distribution)

import msn  # noqa: E402
from msn.decoding import engine  # noqa: E402
from msn.decoding.engine import DecoderState  # noqa: E402
from msn.decoding.tree import TreeTemplate  # noqa: E402
from msn.decoding.verify import greedy_accept  # noqa: E402

SETTINGS = [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}]
TEMPLATE = TreeTemplate(((0,), (1,), (0, 0)), 3, name="test-template", recycling=8)
TARGETS = ("token1", "token2", "token3", "joint3")


# -- pure math ---------------------------------------------------------------------------------------------
def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof >= stat): the regularized upper incomplete gamma Q(dof/2, stat/2) (Numerical Recipes)."""
    a, x = dof / 2.0, stat / 2.0
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for P, Q = 1 - P
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)  # continued fraction for Q (Lentz)
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def chi_square(counts: dict, probs: dict) -> tuple[float, int, float]:
    """Pearson's chi-square (statistic, dof, p-value), the p-value from the exact tail."""
    stat, dof = chi_square_statistic(counts, probs)
    return stat, dof, chi2_sf(stat, dof)


def binomial_mad(n: int, p: float) -> float:
    """E|X - np| for X ~ Binomial(n, p), de Moivre's closed form: 2 m C(n, m) p^m (1-p)^(n-m+1), m = floor(np)+1."""
    if p <= 0 or p >= 1:
        return 0.0
    m = math.floor(n * p) + 1
    if m > n:
        return 0.0
    log = (math.log(2 * m) + math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1)
           + m * math.log(p) + (n - m + 1) * math.log1p(-p))
    return math.exp(log)


def tv_distance(counts: dict, probs: dict) -> float:
    n = sum(counts.values())
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in keys)


def tv_threshold(n: int, probs: dict, level: float) -> float:
    """A bound the empirical TV of n exact samples exceeds with probability <= level."""
    expected = 0.5 * sum(binomial_mad(n, p) for p in probs.values()) / n
    return expected + math.sqrt(math.log(1 / level) / (2 * n))


# -- the model and its exact distribution ------------------------------------------------------------------
def tiny(family: str, vocab: int, init: float, seed: int = 1):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.vocab_size, cfg.initializer_range = vocab, init
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    return model.eval()


@torch.no_grad()
def exact_joint(model, prompt: torch.Tensor, settings: dict, length: int = 3) -> dict[tuple, float]:
    """p(x1..x_length) for every sequence in the processed support, one batched forward per position."""
    joint: dict[tuple, float] = {(): 1.0}
    for _ in range(length):
        prefixes = list(joint)
        out: dict[tuple, float] = {}
        for start in range(0, len(prefixes), 1024):
            chunk = prefixes[start : start + 1024]
            ids = torch.cat([prompt.repeat(len(chunk), 1), torch.tensor([list(c) for c in chunk], dtype=torch.long).view(len(chunk), -1)], 1)
            rows = model(ids).logits[:, -1]
            for prefix, row in zip(chunk, rows, strict=True):
                for tok, q in exact(row, settings).items():
                    out[prefix + (tok,)] = joint[prefix] * q
        joint = out
    return joint


def marginal(joint: dict[tuple, float], pos: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for seq, p in joint.items():
        out[seq[pos]] = out.get(seq[pos], 0.0) + p
    return out


# -- sampling through msn.generate --------------------------------------------------------------------------
def _broken_accept(self, tree, logits, top_vals, top_ids):
    """Drafts accepted when they equal the argmax, only the bonus sampled (NOT distribution-preserving)."""
    acc = greedy_accept(tree.children, logits.argmax(-1).tolist())
    node = acc.accepted[-1] if acc.accepted else 0
    return type(acc)(acc.accepted, self.sampler.sample(logits[node], self.length + len(acc.accepted)))


@contextlib.contextmanager
def broken_rule():
    saved = engine._Decoder.accept
    engine._Decoder.accept = _broken_accept
    try:
        yield
    finally:
        engine._Decoder.accept = saved


def sample(model, prompt, method: str, tree, n: int, settings: dict) -> dict:
    state = DecoderState()  # one per run: a fresh recycling table, calibration and t(n) for this run only
    seqs, steps, drafted = [], 0, 0
    start = time.perf_counter()
    for seed in range(n):
        out = msn.generate(model, prompt, max_new_tokens=3, method=method, tree=tree, do_sample=True, seed=seed,
                           eos_token_id=[], state=state, **settings)
        seqs.append(tuple(out.sequences[0, -3:].tolist()))
        steps += out.steps
        drafted += 3 - out.steps  # tokens that came from accepted drafts
    return {"seqs": seqs, "steps_per_sample": steps / n, "accepted_draft_share": drafted / (3 * n),
            "seconds": time.perf_counter() - start}


def test_run(seqs: list[tuple], joint: dict, level: float) -> dict:
    n = len(seqs)
    results = {}
    for i, target in enumerate(TARGETS):
        if target == "joint3":
            probs, keys = joint, seqs
        else:
            probs, keys = marginal(joint, i), [s[i] for s in seqs]
        counts: dict = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        outside = sum(c for k, c in counts.items() if k not in probs)
        stat, dof, p = chi_square({k: c for k, c in counts.items() if k in probs}, probs)
        if outside:
            p = 0.0
        tv, tv_max = tv_distance(counts, probs), tv_threshold(n, probs, level)
        results[target] = {"chi2": stat, "dof": dof, "p": p, "tv": tv, "tv_threshold": tv_max,
                           "outside_support": outside, "chi2_reject": p < level, "tv_reject": tv > tv_max}
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10_000, help="seeds for ar, tr-jacobi and the broken rule")
    ap.add_argument("--samples-other", type=int, default=2000,
                    help="seeds for jacobi/retrieval/recycling and every auto-tree run (>= 2000 recommended)")
    ap.add_argument("--families", default="llama,qwen2")
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--init", type=float, default=0.3, help="initializer_range of the tiny models")
    ap.add_argument("--alpha", type=float, default=1e-3, help="family-wise significance level (Bonferroni)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    families = [f for f in args.families.split(",") if f]

    runs = [("ar", None, args.samples, False)]
    for method in ("jacobi", "retrieval", "recycling", "tr-jacobi"):
        runs.append((method, "template", args.samples if method == "tr-jacobi" else args.samples_other, False))
    for method in ("jacobi", "retrieval", "recycling", "tr-jacobi"):
        runs.append((method, "auto", args.samples_other, False))
    runs += [("tr-jacobi", "template", args.samples, True), ("tr-jacobi", "auto", args.samples_other, True)]
    n_correct = sum(1 for r in runs if not r[3])
    m = len(families) * len(SETTINGS) * n_correct * len(TARGETS) * 2
    level = args.alpha / m
    print(f"# {m} correct-rule tests; family-wise alpha {args.alpha:g}, per test {level:.3g} (Bonferroni)",
          flush=True)

    started = time.time()
    records, ok = [], True
    for family in families:
        model = tiny(family, args.vocab, args.init)
        seed_prefix = torch.tensor([[5, 9, 17]])  # then the model's own greedy text: retrieval finds its n-grams
        prompt = msn.generate(model, seed_prefix, max_new_tokens=13, method="ar", eos_token_id=[]).sequences
        for settings in SETTINGS:
            joint = exact_joint(model, prompt, settings)
            ar_seqs = None
            for method, tree_name, n, broken in runs:
                tree = {"template": TEMPLATE, "auto": "auto", None: None}[tree_name]
                with broken_rule() if broken else contextlib.nullcontext():
                    s = sample(model, prompt, method, tree, n, settings)
                if method == "ar":
                    ar_seqs = s["seqs"]
                k = min(n, len(ar_seqs))
                same = sum(a == b for a, b in zip(s["seqs"][:k], ar_seqs[:k], strict=True)) / k
                tests = test_run(s["seqs"], joint, level)
                rec = {"family": family, "settings": settings, "method": method, "tree": tree_name or "-",
                       "rule": "broken" if broken else "exact", "n": n, "same_as_ar": same,
                       "steps_per_sample": s["steps_per_sample"], "accepted_draft_share": s["accepted_draft_share"],
                       "seconds": s["seconds"], "support_joint": len(joint), "prompt": prompt[0].tolist(),
                       "tests": tests}
                if broken:
                    rec["verdict_ok"] = tests["joint3"]["chi2_reject"] and tests["joint3"]["tv_reject"]
                else:
                    rec["verdict_ok"] = not any(t["chi2_reject"] or t["tv_reject"] or t["outside_support"]
                                                for t in tests.values())
                ok = ok and rec["verdict_ok"]
                records.append(rec)
                print(f"# {family} {settings} {method}/{rec['tree']} rule={rec['rule']} n={n}: "
                      f"{s['seconds']:.0f}s, {rec['steps_per_sample']:.2f} steps/sample, "
                      f"{rec['accepted_draft_share']:.0%} tokens from drafts, same text as ar {same:.1%}, "
                      f"ok={rec['verdict_ok']}", flush=True)
                if args.out:
                    _write(args, records, m, level, started, ok, done=False)

    print()
    print("| family | setting | method/tree | rule | n | test | chi2 (dof) | p-value | TV (threshold) | result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rec in records:
        setting = ", ".join(f"{k}={v}" for k, v in rec["settings"].items())
        for target, t in rec["tests"].items():
            reject = t["chi2_reject"] or t["tv_reject"] or t["outside_support"]
            if rec["rule"] == "broken":
                result = "FAIL (as it must)" if reject else "pass (!)"
            else:
                result = "FAIL" if reject else "pass"
            print(f"| {rec['family']} | {setting} | {rec['method']}/{rec['tree']} | {rec['rule']} | {rec['n']} | "
                  f"{target} | {t['chi2']:.1f} ({t['dof']}) | {t['p']:.3g} | {t['tv']:.4f} ({t['tv_threshold']:.4f}) "
                  f"| {result} |")
    print()
    print(f"correct-rule tests: {m}, per-test level {level:.3g}; same text as ar (exact rule): "
          f"min {min(r['same_as_ar'] for r in records if r['rule'] == 'exact'):.1%}; "
          f"total {time.time() - started:.0f}s; overall {'PASS' if ok else 'FAIL'}")
    if args.out:
        _write(args, records, m, level, started, ok, done=True)
    return 0 if ok else 1


def _write(args, records, m, level, started, ok, done: bool) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "settings": SETTINGS, "template": TEMPLATE.to_dict(), "n_tests": m, "alpha_family": args.alpha,
            "alpha_per_test": level, "done": done, "ok": ok, "seconds": time.time() - started,
            "records": records}
    args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
