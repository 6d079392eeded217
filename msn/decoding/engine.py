"""The decoding loop: prefill once, then per step propose -> tree -> forward -> accept -> keep -> observe
-> commit.

Every method is the same loop with different draft sources (``ar`` has none: plain greedy decoding on the
same cache, our baseline). Greedy verification makes the output identical to plain greedy decoding; the
drafts and the tree only decide how many tokens one forward commits.
"""

from __future__ import annotations

import copy
import time
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from msn.decoding import trie as trie_mod
from msn.decoding.attention import gqa_attention
from msn.decoding.calibrate import Calibrator
from msn.decoding.costs import Latency, for_next_request
from msn.decoding.packed import packing, resolve_pack
from msn.decoding.request import Request, parse_request
from msn.decoding.sampling import CoupledSampler, coupled_accept
from msn.decoding.sources import SOURCES, Budget, Draft, DraftSource, PromptLogits, VerifiedStep
from msn.decoding.static_kv import make_kv, resolve_compile
from msn.decoding.tree import METHODS, AutoTree, Tree, TreeTemplate
from msn.decoding.verify import Acceptance, argmax_rows, greedy_accept, top_k_rows
from msn.errors import MsnError

__all__ = ["METHODS", "GenerateOutput", "generate"]


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [1, prompt + new] like transformers' generate
    new_tokens: int
    steps: int  # forward passes after the prefill
    accept_lengths: list[int]  # tokens committed per step (accepted drafts + the bonus token)
    wall_time: float  # seconds, prefill included
    method: str = "tr-jacobi"
    tree: Tree | None = None
    # Per source name, per step: accepted draft tokens that source drafted (a token several sources drafted,
    # merged siblings, counts for each) and draft nodes of that source in the verified tree. Empty for ``ar``.
    accepted_by_source: dict[str, list[int]] = field(default_factory=dict)
    nodes_by_source: dict[str, list[int]] = field(default_factory=dict)
    # Per source name, per step: accepted draft tokens that no other source drafted at that position — what
    # the source adds over the others (accepted_by_source credits a token two sources agree on to both).
    sole_by_source: dict[str, list[int]] = field(default_factory=dict)
    tree_sizes: list[int] = field(default_factory=list)  # per step: draft nodes verified (root excluded)
    node_hits: torch.Tensor | None = None  # static templates: per template node (root first), steps accepted
    retrieval_lengths: list[int] | None = None  # per step: tokens the retrieval chain drafted (0: no match)
    compiled: bool = False  # verified through the compiled static path (compile=True, where it could be used)
    packed: bool = False  # verified with packed Linear weights (pack, msn.decoding.packed)

    @property
    def mean_accepted(self) -> float:
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)

    @property
    def jacobi_accepted(self) -> list[int] | None:
        return self.accepted_by_source.get("jacobi")

    @property
    def retrieval_accepted(self) -> list[int] | None:
        return self.accepted_by_source.get("retrieval")


@dataclass
class DecoderState:
    """What a decoder keeps across requests: its sources (the recycling table lives there), the calibration
    counters and the latency curve. By default one per model; pass ``state=DecoderState()`` to
    :func:`generate` to keep separate histories (a benchmark gives each method its own, so one method's
    table never holds another method's answer to the same prompt)."""

    sources: dict[str, DraftSource] = field(default_factory=lambda: {n: cls() for n, cls in SOURCES.items()})
    calibrator: Calibrator = field(default_factory=Calibrator)
    latencies: dict[str, Latency] = field(default_factory=dict)  # t(n) per forward path: "compiled", "packed", "eager"
    # Forwards over several requests' rows (msn.decoding.batch): observed / predicted time, a moving average. t(n)
    # is measured on one row; B rows with holes, masks and per-row attention cost more than as many tokens in one.
    batch_scale: float = 1.0

    @property
    def latency(self) -> Latency | None:
        """The uncompiled forward's t(n) (packed weights where used)."""
        return self.latencies.get("packed") or self.latencies.get("eager")


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_state(model) -> DecoderState:
    """The model's shared decoder state."""
    state = _STATES.get(model)
    if state is None:
        state = DecoderState()
        _STATES[model] = state
    return state


@torch.inference_mode()
def generate(model, input_ids=None, max_new_tokens: int | None = None, method: str = "tr-jacobi",
             tree: Tree | str | None = None, eos_token_id: int | list[int] | None = None, streamer=None,
             seed: int = 0, generation_config=None, *, state: DecoderState | None = None,
             compile: bool | None = None, pack: bool | None = None, **kwargs) -> GenerateOutput | torch.Tensor:
    """Generation with TR-Jacobi (or ``ar`` / ``jacobi`` / ``retrieval`` / ``recycling``) decoding: greedy, or
    sampled with ``do_sample=True`` (``temperature``, ``top_k``, ``top_p``, ``min_p``; exact, and for a given
    ``seed`` the same text whatever the method or tree, see :mod:`msn.decoding.sampling`).

    Returns a :class:`GenerateOutput`. Also works as ``model.generate(ids, custom_generate=msn.generate,
    method=..., tree=...)``: then settings come from the generation config and the sequences are returned.
    Unknown or unsupported keywords raise :class:`msn.errors.MsnError` instead of being ignored. ``state``:
    the draft tables, calibration and latency curve to use and update (default: the model's shared ones).
    ``compile=True``: verify through a static KV buffer and a ``torch.compile``-d forward per tree-size bucket
    (see :mod:`msn.decoding.static_kv`; the first use of each bucket compiles, ~30 s each); ``None`` (default):
    compiled on a CUDA device, where it wins several-fold, eager on a CPU, where it does not. ``pack``: on a CPU,
    verify with the Linear weights packed once for oneDNN (:mod:`msn.decoding.packed`; trees cost less, bf16
    results bit-identical); ``None`` (default): on for bf16/fp32 CPU models decoded eagerly.
    """
    # attention_mask (all 1s, or None) is read from kwargs: as a named parameter, transformers would hand it
    # over twice through custom_generate (its own, prepared one comes with the model inputs).
    attention_mask = kwargs.pop("attention_mask", None)
    if state is not None and not isinstance(state, DecoderState):
        raise MsnError(f"state must be a msn.decoding.engine.DecoderState (or None: the model's shared one), got "
                       f"{type(state).__name__}")
    req = parse_request(model, input_ids, max_new_tokens, method, tree, eos_token_id, generation_config,
                        attention_mask, kwargs, seed, streamer=streamer, compile=compile, pack=pack)
    was_training = model.training
    if was_training:
        model.eval()  # dropout on would decode a different (degenerate) text
    try:
        compile = resolve_compile(model, compile)
        with packing(model, resolve_pack(model, pack, compile)) as pk, gqa_attention(model, not compile):
            out = _Decoder(model, req, streamer, seed, state or decoder_state(model), compile, pk).run()
    finally:
        if was_training:
            model.train()
    return out.sequences if req.via_hf else out


class StepInputs(NamedTuple):
    tokens: torch.Tensor  # [n] the root, then the tree's draft nodes
    positions: torch.Tensor  # [n]
    ancestors: torch.Tensor | None  # [n, n] bool; None: one token, the model's own causal mask
    past: int  # cache entries before the step (the committed tokens but the root)


class _Decoder:
    """One request's step state; each step is the sequence of named calls in :meth:`step`."""

    def __init__(self, model, req: Request, streamer, seed: int, state: DecoderState, compile: bool = False,
                 packing=None, private_sources: bool = False, measure_again: bool = True):
        self.model, self.req, self.streamer = model, req, streamer
        self.device, self.dtype = req.input_ids.device, model.dtype
        self.compile, self.packing = compile, packing
        self.generator = torch.Generator().manual_seed(seed)
        self.prompt_len = req.input_ids.shape[1]
        self.committed = torch.empty(self.prompt_len + req.max_new_tokens, dtype=torch.long, device=self.device)
        self.committed[: self.prompt_len] = req.input_ids[0]
        self.length = self.prompt_len
        self.state = state
        self.auto = isinstance(req.tree, AutoTree)
        self.sources = {name: self.state.sources[name] for name in req.tree.sources}
        if private_sources:  # several requests at once (msn.decoding.batch): each drafts from its own state
            self.sources = {n: copy.copy(s) if s.per_request else s for n, s in self.sources.items()}
        self.shapes = {name: None if self.auto else req.tree.shape(name) for name in self.sources}
        for name, src in self.sources.items():
            src.configure(self.shapes[name])
        self.top_k = max((getattr(s, "top_k_needed", 0) for s in self.sources.values()), default=0)
        self.latency = None
        if self.auto and self.sources:
            path = "compiled" if compile else "packed" if packing is not None else "eager"
            self.latency = for_next_request(self.state.latencies.get(path), model, compile, packing is not None,
                                            measure_again)
            self.state.latencies[path] = self.latency
        self.accept_lengths: list[int] = []
        self.accepted_by_source = {name: [] for name in SOURCES} if self.sources else {}
        self.nodes_by_source = {name: [] for name in SOURCES} if self.sources else {}
        self.sole_by_source = {name: [] for name in SOURCES} if self.sources else {}
        self.tree_sizes: list[int] = []
        self.chain_lengths: list[int] = []
        self.tags = _template_tags(req.tree) if isinstance(req.tree, TreeTemplate) else None
        self.node_hits = torch.zeros(len(self.tags) + 1, dtype=torch.long) if self.tags is not None else None
        self.sampler = CoupledSampler(req.sampling) if req.sampling is not None else None
        self.done = False

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> GenerateOutput:
        if self.streamer is not None:
            self.streamer.put(self.req.input_ids.cpu())
        start = time.perf_counter()
        self.prefill()
        while not self.done:
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        if self.streamer is not None:
            self.streamer.end()
        return self.output(wall)

    def output(self, wall: float) -> GenerateOutput:
        return GenerateOutput(
            sequences=self.committed[None, : self.length].clone(),
            new_tokens=self.length - self.prompt_len,
            steps=len(self.accept_lengths),
            accept_lengths=self.accept_lengths,
            wall_time=wall,
            method=self.req.method,
            tree=self.req.tree,
            accepted_by_source=self.accepted_by_source,
            nodes_by_source=self.nodes_by_source,
            sole_by_source=self.sole_by_source,
            tree_sizes=self.tree_sizes,
            node_hits=self.node_hits,
            retrieval_lengths=self.chain_lengths,
            compiled=self.kv.compiled,
            packed=self.kv.packed,
        )

    def prefill(self) -> None:
        self.kv = make_kv(self.model, self.prompt_len + self.req.max_new_tokens, self.compile, self.packing)
        ids = self.req.input_ids
        predictions = None
        if self.prompt_len > 1:  # the last prompt token is the first step's root
            wanted = [r for s in self.sources.values() if (r := s.prompt_rows(ids[0, :-1])) is not None]
            rows = torch.cat(wanted).unique() if wanted else None  # unique() sorts
            logits = self.kv.prefill(ids[:, :-1], rows)
            if rows is not None:
                predictions = PromptLogits(rows, logits.float())
        for src in self.sources.values():
            src.begin(ids[0], predictions, self.generator)

    def step(self) -> None:
        t0, past = time.perf_counter(), self.length - 1
        trie = self.propose()
        tree = self.choose(trie)
        logits = self.forward(tree)
        self.settle(trie, tree, logits)
        if self.latency is not None:
            self.latency.observe(len(tree) - 1, self.forward_seconds, past, time.perf_counter() - t0)

    def settle(self, trie: trie_mod.Trie, tree: trie_mod.StepTree, logits: torch.Tensor) -> None:
        """Everything after the forward: accept, cut, keep, commit, observe (a batch calls it per request)."""
        top_vals, top_ids = self.top(logits)
        acc = self.accept(tree, logits, top_vals, top_ids)
        new = self.cut(tree.tokens, acc)
        self.keep(tree, acc)
        self.commit(new)
        self.observe(trie, tree, logits, top_ids, top_vals, acc, new)

    # -- the named steps -----------------------------------------------------------------------------------
    def propose(self) -> trie_mod.Trie:
        """Every source's candidates, merged into one token trie with calibrated edge estimates."""
        remaining = self.prompt_len + self.req.max_new_tokens - self.length
        root = int(self.committed[self.length - 1])
        drafts: dict[str, Draft] = {}
        history = self.committed[: self.length]
        cap = self.latency.proposal_cap(self.length - 1) if self.latency is not None else None
        for name, src in self.sources.items():
            drafts[name] = src.propose(history, Budget(max_depth=remaining - 1, shape=self.shapes[name], max_nodes=cap))
        if "retrieval" in self.sources:
            self.chain_lengths.append(self.sources["retrieval"].last_chain)
        return trie_mod.merge(root, drafts, self.state.calibrator.estimate)

    def choose(self, trie: trie_mod.Trie, n: int | None = None) -> trie_mod.StepTree:
        """Static template: every candidate. Auto: the n best by path probability, n by tokens/s (or the
        ``n`` a batch chose for all its requests together, see :mod:`msn.decoding.batch`)."""
        t = None
        if n is not None:
            n = min(n, self.node_limit(trie))
        elif self.latency is not None:
            t = self.latency.curve(self.node_limit(trie), past=self.length - 1)
        kept, q = trie_mod.select(trie, t, n)
        return trie_mod.compact(trie, kept, q)

    def node_limit(self, trie: trie_mod.Trie) -> int:
        """The most draft nodes an auto tree may verify this step."""
        return min(len(trie) - 1, self.req.tree.max_nodes, self.latency.max_nodes if self.latency else 0)

    def inputs(self, tree: trie_mod.StepTree) -> StepInputs:
        """The verification forward's tokens, their positions and the tree's ancestor matrix."""
        past = self.length - 1
        if len(tree) == 1:  # a plain one-token step with the model's own causal mask
            return StepInputs(self.committed[past : self.length], torch.arange(past, self.length, device=self.device),
                              None, past)
        return StepInputs(torch.tensor(tree.tokens, device=self.device),
                          torch.tensor(tree.depths, device=self.device) + past, tree.ancestors(self.device), past)

    def forward(self, tree: trie_mod.StepTree) -> torch.Tensor:
        tokens, positions, ancestors, past = self.inputs(tree)
        start = time.perf_counter()
        logits = self.kv.forward(tokens, positions, ancestors, past).float()  # bf16 topk on CPU is ~10x slower
        if self.latency is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the forward's own time (the step syncs right after anyway)
        self.forward_seconds = time.perf_counter() - start  # what t(n) measured, for the online refinement
        return logits

    def top(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One top-k per step, shared by acceptance and the sources."""
        if not self.top_k:
            return None, None
        return top_k_rows(logits, min(self.top_k, logits.shape[-1]))

    def accept(self, tree, logits, top_vals, top_ids) -> Acceptance:
        """Greedy: the argmax path. Sampling: the path of coupled samples (drafts only ever propose)."""
        if self.sampler is not None:
            return coupled_accept(tree.children, logits, self.sampler, self.length)
        return greedy_accept(tree.children, argmax_rows(logits, top_vals, top_ids))

    def cut(self, tokens: list[int], acc: Acceptance) -> list[int]:
        """Accepted drafts + bonus, stopped exactly at EOS (nothing after it) and at max_new_tokens."""
        new = [tokens[i] for i in acc.accepted] + [acc.bonus]
        new = new[: self.prompt_len + self.req.max_new_tokens - self.length]
        for i, t in enumerate(new):
            if t in self.req.eos:
                new = new[: i + 1]
                self.done = True
                break
        return new

    def keep(self, tree: trie_mod.StepTree, acc: Acceptance) -> None:
        """The cache keeps the root and the accepted nodes, contiguous; the rest of the tree is dropped."""
        if len(tree) > 1:
            keep = torch.tensor([0, *acc.accepted], dtype=torch.long, device=self.device)
            self.kv.keep(self.length - 1, len(tree), keep)

    def observe(self, trie, tree, logits, top_ids, top_vals, acc: Acceptance, new: list[int]) -> None:
        """Sources learn from the verified step; calibration and per-source accounting are updated."""
        if not self.sources:
            return
        drafted = acc.accepted[: len(new)]  # drafts that survived the EOS / budget cut
        full = [tree.tokens[i] for i in acc.accepted] + [acc.bonus]
        for (name, bucket, _), hit in trie_mod.calibration_trials(trie, full):
            self.state.calibrator.record(name, bucket, hit)
        counts = dict.fromkeys(SOURCES, 0)
        for node in tree.trie_ids[1:]:
            for name in {p[0] for p in trie.proposers[node]}:
                counts[name] += 1
        for name in SOURCES:
            self.nodes_by_source[name].append(counts[name])
        credited, sole = dict.fromkeys(SOURCES, 0), dict.fromkeys(SOURCES, 0)
        for node in drafted:
            proposers = trie.proposers[tree.trie_ids[node]]
            names = {p[0] for p in proposers}
            for name in names:
                credited[name] += 1
            if len(names) == 1:
                sole[names.pop()] += 1
            if self.tags is not None:
                for _, _, tag in proposers:
                    if tag in self.tags:
                        self.node_hits[self.tags[tag]] += 1
        for name in SOURCES:
            self.accepted_by_source[name].append(credited[name])
            self.sole_by_source[name].append(sole[name])
        self.tree_sizes.append(len(tree) - 1)
        probs = None
        if top_vals is not None:
            probs = (top_vals - top_vals[:, :1]).exp()
            probs = probs / probs.sum(-1, keepdim=True)
        step = VerifiedStep(
            tokens=tree.tokens, parents=tree.parents, logits=logits, top_ids=top_ids, top_probs=probs,
            accepted=acc.accepted, rejected=tree.likeliest_below(acc.accepted[-1] if acc.accepted else 0),
            new_tokens=new, committed=self.committed[: self.length], generator=self.generator,
        )
        for src in self.sources.values():
            src.observe(step)

    def commit(self, new: list[int]) -> None:
        self.committed[self.length : self.length + len(new)] = torch.tensor(new, device=self.device)
        self.length += len(new)
        self.accept_lengths.append(len(new))
        if self.sampler is not None:
            self.sampler.forget_before(self.length)
        if self.streamer is not None:
            self.streamer.put(torch.tensor(new))
        self.done = self.done or self.length - self.prompt_len >= self.req.max_new_tokens


def _template_tags(template: TreeTemplate) -> dict:
    """Template node tag -> index in ``node_hits`` (root 0, Jacobi paths, retrieval depths, recycling)."""
    tags = [("jacobi", p) for p in template.jacobi]
    tags += [("retrieval", d) for d in range(1, template.retrieval_depth + 1)]
    tags += [("recycling", i) for i in range(template.recycling)]
    return {tag: i for i, tag in enumerate(tags, start=1)}
