"""Run questions through decoding methods, interleaved per question, and record Spec-Bench answers.

Methods run A B C D on question 1, then A B C D on question 2, ... after an untimed warm-up, so slow drift
of the machine (thermal, other load) hits every method alike. Each method holds its own conversation: a
two-turn question's second prompt contains that method's own first answer, as in Spec-Bench.

Sampling (``Sampling`` settings instead of None): each turn of a question gets its own seed, derived from the
run's seed, the question id and the turn (:func:`turn_seed`), the same for every method. msn's methods sample
with the engine's coupled noise, so for a seed they all give the same text (``ar``'s); ``pld`` samples through
transformers (``torch.manual_seed(seed)`` before its ``generate``), another random stream, so its text is
another sample of the same distribution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass

import torch

from msn.bench.questions import Question
from msn.decoding import METHODS as ENGINE_METHODS
from msn.decoding import generate
from msn.decoding.engine import DecoderState
from msn.decoding.request import context_limit
from msn.decoding.sampling import Sampling
from msn.decoding.tree import TreeTemplate
from msn.errors import InputError, MsnError
from msn.prompting import encode_chat, eos_ids

COMPILED = "+compile"  # e.g. "tr-jacobi+compile": the same method through the compiled path (compile=True)
UNPACKED = "+unpacked"  # e.g. "tr-jacobi+unpacked": eager without packed weights (pack=False), the A/B for packing
BENCH_METHODS = ("ar", "pld", *[m for m in ENGINE_METHODS if m != "ar"], *[m + COMPILED for m in ENGINE_METHODS],
                 *[m + UNPACKED for m in ENGINE_METHODS])
DEFAULT_METHODS = ("ar", "pld", "jacobi", "tr-jacobi")
PLD_SETTINGS = {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 3}


def turn_seed(seed: int, question_id, turn: int) -> int:
    """The sampling seed of one turn of one question: stable across runs, machines and Python processes
    (a hash, not Python's salted ``hash``), below 2**63."""
    digest = hashlib.sha256(json.dumps([seed, question_id, turn]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def question_hash(question: Question) -> str:
    """A digest of the question's turns, recorded in each answer: a resume must not count an answer to an edited
    or another question (same id, other text) as this question's."""
    return hashlib.sha256(json.dumps(list(question.turns)).encode()).hexdigest()


LEAVE_OUT = "leave its category {category!r} out with --categories"  # msn bench's way to skip a question


def _too_long(question: Question, turn: int, prompt_len: int, max_new_tokens: int, limit: int,
              leave_out: str = LEAVE_OUT) -> InputError:
    """One line naming the question, its turn and the fix, for a turn that does not fit the model's context;
    ``leave_out`` says how to skip the question (``{category}`` is filled in)."""
    at = f" ({question.where})" if question.where else ""
    what = ("its first turn is" if turn == 0 else
            f"at turn {turn + 1} the conversation (its earlier answers included) is")
    room, skip = limit - prompt_len, leave_out.format(category=question.category)
    if turn > 0:  # earlier answers are part of the prompt, and as long as --max-new-tokens lets them be
        fix = f"lower --max-new-tokens (it bounds the earlier answers too), or {skip}"
    elif room >= 1:
        fix = f"lower --max-new-tokens to {room} or less, or {skip}"
    else:
        fix = f"{skip}, or use a model with a longer context"
    return InputError(f"question {question.question_id!r}{at}: {what} {prompt_len} tokens, + --max-new-tokens "
                      f"{max_new_tokens} = {prompt_len + max_new_tokens} exceeds the model's context of {limit} "
                      f"tokens; {fix}")


def check_first_turns(model, tokenizer, questions: Sequence[Question], max_new_tokens: int,
                      leave_out: str = LEAVE_OUT) -> None:
    """Refuse the first question whose first turn cannot fit the context, before any question runs (later
    turns hold earlier answers, so they are checked when they come, by :func:`answer_question`)."""
    limit = context_limit(model.config)
    if limit is None:
        return
    for q in questions:
        n = encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}]).shape[-1]
        if n + max_new_tokens > limit:
            raise _too_long(q, 0, n, max_new_tokens, limit, leave_out)


def hf_sampling_kwargs(sampling: Sampling) -> dict:
    """The settings for transformers' ``generate``, stated in full: a setting left unset there would fall back
    to transformers' defaults (top_k=50), not to "off" as in msn."""
    return {"do_sample": True, "temperature": float(sampling.temperature),
            "top_k": sampling.top_k or 0, "top_p": 1.0 if sampling.top_p is None else float(sampling.top_p),
            "min_p": sampling.min_p}


def sampling_record(sampling: Sampling | None) -> dict | None:
    """Sampling settings as written to bench.json, the summary and each answer (None: greedy)."""
    return None if sampling is None else dataclasses.asdict(sampling)


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"ar,pld"`` -> ``["ar", "pld"]``; unknown or repeated names are an error."""
    names = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [m for m in names if m]
    if not names:
        raise InputError("no methods given")
    unknown = [m for m in names if m not in BENCH_METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(BENCH_METHODS)}")
    if len(set(names)) != len(names):
        raise InputError(f"method listed twice in {','.join(names)}")
    return names


@dataclass
class TurnResult:
    text: str
    new_tokens: int
    wall_time: float
    steps: int | None  # verification forwards (prefill included in the first)
    accept_lengths: list[int] | None  # per step, bonus included; sums to new_tokens
    _: KW_ONLY  # the optional per-step records are named, so a new one cannot shift the others
    # Tree methods, per source name, per step: accepted drafts that source drafted / its nodes in the tree.
    accepted_by_source: dict[str, list[int]] | None = None
    nodes_by_source: dict[str, list[int]] | None = None
    sole_by_source: dict[str, list[int]] | None = None  # accepted drafts no other source drafted
    tree_sizes: list[int] | None = None  # per step: draft nodes verified
    seed: int | None = None  # the turn's sampling seed (None: greedy)


class _PldAcceptRecorder:
    """Per-step accept lengths of transformers' prompt lookup, without forking its decoding loop.

    For the duration of one ``generate`` call the model's ``_get_candidate_generator`` is wrapped (on the
    instance only) so that the ``PromptLookupCandidateGenerator`` it builds reports to us: transformers calls
    ``update_candidate_strategy(input_ids, scores, num_matches)`` once after every verification forward, and
    that step appended ``num_matches`` accepted drafts plus the model's own (bonus) token.

    Final step, EOS and max_new_tokens cuts: prompt lookup drafts stop before an EOS and never reach past
    ``max_length``, and transformers crops a step's tokens at the first EOS and at ``max_length`` *before*
    this call and recomputes ``num_matches`` from what it kept, so ``num_matches + 1`` is exactly what the
    step appended (an EOS counts as the step's last token, as in ``new_tokens``) and the loop stops right
    after the call that reached EOS or the limit. So that this holds on transformers versions that pass an
    uncropped count too, a step is clipped to how much ``input_ids`` actually grew since the previous step
    (starting from the prompt). The lengths therefore always sum to the new tokens, and their count is the
    number of verification forwards (the prefill forward, which also verifies the first drafts, included).
    """

    def __init__(self, model, prompt_len: int):
        self.lengths: list[int] = []
        self._model, self._seen = model, prompt_len
        self._original = model._get_candidate_generator  # bound method of the class

    def __enter__(self):
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

        def build(*args, **kwargs):
            gen = self._original(*args, **kwargs)
            if not isinstance(gen, PromptLookupCandidateGenerator):
                raise RuntimeError(f"expected transformers' prompt lookup, got {type(gen).__name__}")
            update = gen.update_candidate_strategy

            def recording_update(input_ids, scores, num_matches):
                grown = int(input_ids.shape[-1]) - self._seen
                self._seen += grown
                self.lengths.append(min(int(num_matches) + 1, grown))
                return update(input_ids, scores, num_matches)

            gen.update_candidate_strategy = recording_update
            return gen

        self._model._get_candidate_generator = build  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc):
        del self._model._get_candidate_generator


def run_turn(
    model, tokenizer, method: str, input_ids: torch.Tensor, max_new_tokens: int,
    tree: TreeTemplate | str | None, eos: list[int], state: DecoderState | None = None,
    sampling: Sampling | None = None, seed: int = 0,
) -> TurnResult:
    """One generation, greedy or (``sampling``) sampled with ``seed``, timed with perf_counter around the
    whole call (prefill included)."""
    input_ids = input_ids.to(model.device)
    if method == "pld":
        pad = model.generation_config.pad_token_id
        how = {"do_sample": False} if sampling is None else hf_sampling_kwargs(sampling)
        with _PldAcceptRecorder(model, input_ids.shape[1]) as recorder:
            if sampling is not None:
                torch.manual_seed(seed)  # transformers samples from torch's global generator
            start = time.perf_counter()
            seq = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), **how,
                max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                pad_token_id=pad if pad is not None else (eos[0] if eos else None), **PLD_SETTINGS,
            )
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            wall = time.perf_counter() - start
        new = seq[0, input_ids.shape[1]:]
        lengths = recorder.lengths
        if sum(lengths) != new.numel():  # would mean transformers changed its loop: never write wrong MATs
            raise RuntimeError(f"pld recorded {sum(lengths)} accepted tokens for {new.numel()} new tokens")
        return TurnResult(_decode(tokenizer, new), int(new.numel()), wall, len(lengths), lengths,
                          seed=None if sampling is None else seed)
    how = {} if sampling is None else {
        "do_sample": True, "seed": seed,
        **{k: v for k, v in dataclasses.asdict(sampling).items() if k != "seed" and v is not None},
    }
    compiled, unpacked = method.endswith(COMPILED), method.endswith(UNPACKED)
    out = generate(model, input_ids, max_new_tokens=max_new_tokens,
                   method=method.removesuffix(COMPILED).removesuffix(UNPACKED), tree=tree, eos_token_id=eos,
                   state=state, compile=compiled, pack=False if unpacked else None, **how)
    if compiled and not out.compiled:  # never report an eager run under a compiled name
        raise MsnError(f"{method}: this model could not use the compiled path (see the warning above)")
    new = out.sequences[0, input_ids.shape[1]:]
    tree_run = bool(out.accepted_by_source)
    return TurnResult(
        _decode(tokenizer, new), out.new_tokens, out.wall_time, out.steps, list(out.accept_lengths),
        accepted_by_source=out.accepted_by_source if tree_run else None,
        nodes_by_source=out.nodes_by_source if tree_run else None,
        sole_by_source=out.sole_by_source if tree_run else None,
        tree_sizes=out.tree_sizes if tree_run else None,
        seed=None if sampling is None else seed,
    )


def _per_step(turns: Sequence[TurnResult], field: str) -> list[int] | None:
    """A per-step list over all turns, or None when some turn does not record it."""
    values = [getattr(t, field) for t in turns]
    return None if any(v is None for v in values) else [x for v in values for x in v]


def _per_source(turns: Sequence[TurnResult], field: str) -> dict[str, list[int]] | None:
    """Per source name, a per-step list over all turns; None when some turn does not record it."""
    values = [getattr(t, field) for t in turns]
    if any(v is None for v in values):
        return None
    return {name: [x for v in values for x in v[name]] for name in values[0]}


def _decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()


def answer_question(
    model, tokenizer, question: Question, method: str, max_new_tokens: int,
    tree: TreeTemplate | str | None, eos: list[int], model_id: str, state: DecoderState | None = None,
    sampling: Sampling | None = None,
) -> dict:
    """All turns of one question with one method, as a Spec-Bench answer record; sampled (each turn with its
    :func:`turn_seed`) when ``sampling`` is given."""
    messages: list[dict[str, str]] = []
    turns: list[TurnResult] = []
    limit = context_limit(model.config)
    for i, turn in enumerate(question.turns):
        messages.append({"role": "user", "content": turn})
        seed = 0 if sampling is None else turn_seed(sampling.seed, question.question_id, i)
        ids = encode_chat(tokenizer, messages)
        if limit is not None and ids.shape[-1] + max_new_tokens > limit:
            raise _too_long(question, i, ids.shape[-1], max_new_tokens, limit)
        result = run_turn(model, tokenizer, method, ids, max_new_tokens, tree, eos, state, sampling, seed)
        messages.append({"role": "assistant", "content": result.text})
        turns.append(result)
    return {
        "question_id": question.question_id,
        "category": question.category,
        "question_sha256": question_hash(question),  # what was asked, so a resume can tell an edited question
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "method": method,
        "sampling": sampling_record(sampling),  # None: greedy
        "choices": [
            {
                "index": 0,
                "turns": [t.text for t in turns],
                "new_tokens": [t.new_tokens for t in turns],
                "wall_time": [t.wall_time for t in turns],
                "decoding_steps": [t.steps for t in turns],
                "accept_lengths": _per_step(turns, "accept_lengths"),
                "accepted_by_source": (by_source := _per_source(turns, "accepted_by_source")),
                "nodes_by_source": _per_source(turns, "nodes_by_source"),
                "sole_by_source": _per_source(turns, "sole_by_source"),
                "tree_sizes": _per_step(turns, "tree_sizes"),
                "seeds": None if sampling is None else [t.seed for t in turns],  # per turn, see turn_seed
                # kept for readers of older runs (benchmarks/reproduce): two of the sources above
                "jacobi_accepted": by_source["jacobi"] if by_source else None,
                "retrieval_accepted": by_source["retrieval"] if by_source else None,
            }
        ],
        "tstamp": time.time(),
    }


def precompile_for(model, tokenizer, questions: Sequence[Question], max_new_tokens: int,
                   tree: TreeTemplate | str | None) -> None:
    """Compile every (cache length, tree bucket) the compiled methods will use on these questions before any is
    timed: a long prompt needs a longer static cache, whose first use would otherwise compile inside a timed
    answer (§12: extraction 0.30x). A multi-turn question is sized for its longest possible last turn."""
    from msn.decoding.static_kv import BUCKETS, auto_buckets, bucket, buffer_length, precompile
    from msn.decoding.tree import AutoTree, resolve_tree

    resolved = resolve_tree(tree, model.device, model.dtype)
    if isinstance(resolved, AutoTree):
        sizes = auto_buckets(model)
    else:
        sizes = [b for b in BUCKETS if b < bucket(resolved.size + 1)] + [bucket(resolved.size + 1)]
    lengths: dict[int, int] = {}
    for q in questions:
        messages = [{"role": "user", "content": t} for t in q.turns]
        total = encode_chat(tokenizer, messages).shape[-1] + len(q.turns) * max_new_tokens + 16 * len(q.turns)
        lengths.setdefault(buffer_length(total), total)
    for total in sorted(lengths.values()):
        precompile(model, total, sizes)


def run_questions(
    model, tokenizer, questions: Sequence[Question], methods: Sequence[str], max_new_tokens: int,
    on_question: Callable[[Question, dict[str, dict]], None],
    tree: TreeTemplate | str | None = None, model_id: str = "model", warmup: int = 1,
    sampling: Sampling | None = None,
) -> None:
    """Warm up, then answer every question with every method in turn. ``on_question`` receives one
    question's records (method -> record) only once all methods have finished it, so an interruption
    never leaves a question measured for some methods and not others.

    Each method has its own decoder state (recycling table, calibration), started fresh after the warm-up:
    with one shared state, a method would draft from the table another method had just filled with its
    answer to the very same prompt, an advantage no real request has."""
    eos = eos_ids(model, tokenizer)
    if any(m.endswith(COMPILED) for m in methods):
        precompile_for(model, tokenizer, questions, max_new_tokens, tree)
    for q in list(questions)[:warmup]:
        short = Question(q.question_id, q.category, q.turns[:1])
        for m in methods:
            answer_question(model, tokenizer, short, m, min(16, max_new_tokens), tree, eos, model_id, DecoderState(),
                            sampling)
    states = {m: DecoderState() for m in methods}
    for q in questions:
        records = {m: answer_question(model, tokenizer, q, m, max_new_tokens, tree, eos, model_id, states[m],
                                      sampling) for m in methods}
        on_question(q, records)
