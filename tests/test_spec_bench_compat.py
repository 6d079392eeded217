"""Spec-Bench interoperability: pld's true per-step accept lengths, and ``msn bench`` answer files read with
Spec-Bench's own speed formula agree with our summary.json for every method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from fakes import ByteChatTokenizer

import msn.bench.runner as runner
import msn.bench.session as session
from msn.bench.questions import Question
from msn.bench.summary import answers_path

DRAFT = runner.PLD_SETTINGS["prompt_lookup_num_tokens"]  # a step that accepts every draft adds DRAFT + 1


def cycle_model(cycles: list[list[int]]):
    """A tiny llama whose greedy next token is a fixed permutation of the last token: every layer's output
    projections are zero (the residual stream is the embedding) and the LM head row of ``next(i)`` is the
    embedding of ``i``. A prompt holding a cycle lets prompt lookup draft the whole continuation."""
    model = tiny_model("llama")
    nxt = list(range(model.config.vocab_size))
    for c in cycles:
        for a, b in zip(c, c[1:] + c[:1], strict=True):
            nxt[a] = b
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        head = torch.empty_like(emb)
        head[torch.tensor(nxt)] = emb
        model.lm_head.weight.copy_(head)
    return model


LOOP = list(range(40, 50))  # 40 -> 41 -> ... -> 49 -> 40, no EOS
TO_EOS = list(range(70, 85)) + [2]  # 70 -> ... -> 84 -> EOS (2)


@pytest.fixture(scope="module")
def copier():
    return cycle_model([LOOP, TO_EOS])


def pld_turn(model, prompt: list[int], max_new_tokens: int, eos=(2,)):
    ids = torch.tensor([prompt])
    turn = runner.run_turn(model, ByteChatTokenizer(), "pld", ids, max_new_tokens, None, list(eos))
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=max_new_tokens, eos_token_id=list(eos))
    return turn, greedy[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize(("max_new_tokens", "lengths"), [
    (1, [1]),
    (DRAFT, [DRAFT]),  # max_new_tokens cut inside the first step: drafts stop at the limit
    (DRAFT + 1, [DRAFT + 1]),
    (DRAFT + 2, [DRAFT + 1, 1]),
    (25, [DRAFT + 1, DRAFT + 1, 25 - 2 * (DRAFT + 1)]),
    (3 * (DRAFT + 1), [DRAFT + 1] * 3),
])
def test_pld_records_accept_lengths_up_to_the_token_limit(copier, max_new_tokens, lengths):
    turn, greedy = pld_turn(copier, LOOP * 3 + LOOP[:2], max_new_tokens)
    assert turn.new_tokens == len(greedy) == max_new_tokens
    assert turn.accept_lengths == lengths
    assert sum(turn.accept_lengths) == turn.new_tokens and turn.steps == len(lengths)


def test_pld_eos_ends_the_last_step(copier):
    # the prompt holds the path to EOS, so the second step's drafts run up to the EOS; the step keeps it
    # as its last token, like new_tokens does
    turn, greedy = pld_turn(copier, TO_EOS + TO_EOS[:3], 64)
    assert greedy == TO_EOS[3:] and turn.new_tokens == len(greedy) == 13
    assert turn.accept_lengths == [DRAFT + 1, 13 - (DRAFT + 1)]
    assert "_get_candidate_generator" not in vars(copier)  # the wrapper is gone after the call


def test_pld_without_matches_is_one_token_per_step():
    model = tiny_model("llama")  # random weights: prompt lookup finds nothing to draft
    turn, greedy = pld_turn(model, [5, 6, 7], 6, eos=())
    assert turn.accept_lengths == [1] * len(greedy) and turn.steps == len(greedy)


class RoundTripTokenizer(ByteChatTokenizer):
    """ByteChatTokenizer whose decode keeps control ids (as U+2400 + id), so that re-encoding an answer's text
    gives back its tokens, as a real tokenizer does: the baseline side of Spec-Bench's formula re-counts
    tokens from the text."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 0x2400 if 0x2400 <= ord(c) < 0x2420 else super(RoundTripTokenizer, self).encode(c)[0]
                for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        special = {self.eos_token_id} if skip_special_tokens else set()
        return "".join(chr(i) if i >= 32 else chr(0x2400 + i) for i in ids if i not in special)


def spec_bench_speed(records: list[dict], base_records: list[dict], count_tokens) -> dict:
    """Spec-Bench's ``evaluation/speed.py`` ``speed()`` (github.com/hemingkx/Spec-Bench), re-implemented:
        method:   speeds = [sum(c["new_tokens"]) / sum(c["wall_time"]) per answer];
                  accept_lengths_list.extend(c["accept_lengths"])  (a null here is its crash)
        baseline: tokens re-counted from the text, sum(len(tokenizer(t).input_ids) - 1 for t in c["turns"]),
                  speeds0 = [tokens / sum(c["wall_time"]) per answer]
        tokens/s = mean(speeds), speedup = mean(speeds) / mean(speeds0), MAT = mean(accept_lengths_list).
    ``count_tokens`` is the re-count of one turn's text (the ``- 1`` drops the BOS its Llama tokenizer adds)."""
    speeds, accept = [], []
    for d in records:
        c = d["choices"][0]
        speeds.append(sum(c["new_tokens"]) / sum(c["wall_time"]))
        accept.extend(c["accept_lengths"])
    speeds0 = [sum(count_tokens(t) for t in d["choices"][0]["turns"]) / sum(d["choices"][0]["wall_time"])
               for d in base_records]
    return {"tokens_per_s": np.mean(speeds), "speedup": np.mean(speeds) / np.mean(speeds0),
            "mat": np.mean(accept)}


QUESTIONS = [
    Question(1, "qa", ("What is the capital of France?",)),
    Question(2, "writing", ("Write a haiku about rain.", "Now make it about snow.")),
    Question(3, "qa", ("abc abc abc abc abc abc abc abc",)),
]


def test_bench_answers_read_under_spec_bench_formula(tmp_path):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None  # every turn runs to the limit: the text re-count is exact
    tok = RoundTripTokenizer(vocab_size=128, eos_token_id=None)
    methods = list(runner.BENCH_METHODS)
    cfg = session.BenchConfig(model="tiny-llama", questions=QUESTIONS, methods=methods, out=tmp_path,
                              dtype="fp32", device="cpu", max_new_tokens=40)
    session.run_bench(cfg, model, tok)
    summary = json.loads((tmp_path / "summary.json").read_text())
    read = {m: [json.loads(x) for x in answers_path(tmp_path, m).read_text().splitlines()] for m in methods}
    for m in methods:
        for rec in read[m]:
            c = rec["choices"][0]
            assert sum(c["accept_lengths"]) == sum(c["new_tokens"]) == 40 * len(c["turns"])
            assert len(c["accept_lengths"]) == sum(c["decoding_steps"])
        ours = summary["methods"][m]["overall"]
        theirs = spec_bench_speed(read[m], read["ar"], lambda text: len(tok.encode(text)))
        assert ours["tokens_per_s"] == pytest.approx(theirs["tokens_per_s"], rel=1e-9)
        assert ours["mat"] == pytest.approx(theirs["mat"], rel=1e-9) and ours["mat_from"] == "accept_lengths"
        # the baseline's tokens come from its text (stripped of edge spaces), not new_tokens: a few percent
        assert ours["speedup"] == pytest.approx(theirs["speedup"], rel=0.03)
    assert summary["methods"]["ar"]["overall"]["mat"] == 1.0
