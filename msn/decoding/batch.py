"""Several requests decoded together: one forward verifies every request's tree (continuous batching).

A forward over more tokens costs far less than several forwards (on a CPU a 32-token forward costs ~1.6x an
8-token one; on a GPU it is flat much further), so requests that arrive together are served at nearly the
speed of one. Each request keeps its own decoder (drafts, stop rules, sampler, committed text); only the
verification forward and the KV cache are shared:

- **Cache rows.** One cache with a row per request. Row b holds its ``past_b`` committed entries at
  ``[0, past_b)``; rows shorter than the longest end in a hole, which no query sees. A step appends every
  row's tree (padded to the widest) after the longest row; afterwards each row moves the root and its
  accepted nodes right behind its own past and the cache is cut to the new longest row. Only the kept
  entries move.
- **Masks.** A 4-D mask per row: a tree token sees its own row's past and its tree ancestors, never another
  request's tokens (another row) nor the holes; a padding token sees only itself (a fully masked row would
  write NaN) and is never read.
- **The node budget.** With the padded layout a step costs t(B x width): every row pays for the widest tree.
  So the trees share one size, the one maximising the batch's expected tokens per second under t(n) (the
  requests' own curve, at B x width tokens); with many requests it shrinks toward plain batched decoding.
- **Joining and leaving.** A request joins between steps (its prompt is prefilled alone, then its cache
  becomes a row) and leaves at once when done, cancelled or failed; a failure is that request's alone.

A batch of one is exactly :func:`msn.generate` (same forwards, same kernels). Models with sliding-window
layers cannot share a forward this way (their caches drop old entries per layer); they are refused here.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from msn.decoding import trie as trie_mod
from msn.decoding.attention import gqa_attention
from msn.decoding.cache import _kv_pairs, cache_keyword, growing, keep_step_entries, tree_forward
from msn.decoding.engine import DecoderState, GenerateOutput, StepInputs, _Decoder, decoder_state
from msn.decoding.packed import packing, resolve_pack
from msn.decoding.request import parse_request
from msn.decoding.static_kv import unsupported
from msn.errors import MsnError

__all__ = ["Batch", "Member", "batch_unsupported", "generate_batch", "shared_tree_size"]


def batch_unsupported(model) -> str | None:
    """Why this model's requests cannot share a forward (None: they can)."""
    return unsupported(model)


@dataclass(eq=False)
class Member:
    """One request in a batch. After it leaves: ``output`` (finished) or ``error`` (failed, or stopped by its
    streamer raising)."""

    decoder: _Decoder
    started: float
    output: GenerateOutput | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.output is not None or self.error is not None


class _RowKeep:
    """Stands in for a request's KV object inside a batch: records which of this step's entries to keep."""

    compiled = False

    def __init__(self, packed: bool):
        self.packed = packed
        self.kept: torch.Tensor | None = None

    def keep(self, past: int, step_len: int, keep: torch.Tensor) -> None:
        self.kept = keep


def _entries(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    keys = getattr(layer, "keys", None)
    if keys is None or keys.numel() == 0:
        return None
    return keys, layer.values


def _set(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    if hasattr(layer, "is_initialized"):
        layer.is_initialized = True
        layer.device = keys.device


SCALE_ALPHA = 0.1  # moving average of a batched forward's observed / predicted time


def _resized(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` [B, H, L, D] cut or zero-padded (a hole) to ``length`` entries."""
    have = t.shape[-2]
    if have >= length:
        return t[:, :, :length]
    pad = t.new_zeros(*t.shape[:2], length - have, t.shape[-1])
    return torch.cat([t, pad], dim=-2)


class BatchKV:
    """The shared cache: one row per request, ``lengths[b]`` valid entries at the start of row b."""

    def __init__(self, model, packing=None):
        self.model, self.kw, self.packing = model, cache_keyword(model), packing
        self.cache = None
        self.lengths: list[int] = []
        self.step_start = self.step_len = 0

    @property
    def width(self) -> int:
        """Entries per row (the longest row's length; shorter rows end in a hole)."""
        return max(self.lengths, default=0)

    def add(self, cache, length: int) -> None:
        """A prefilled request's own cache ([1, ...], ``length`` entries) becomes the last row."""
        if self.cache is None:
            self.cache, self.lengths = cache, [length]
            growing(cache)
            return
        width = max(self.width, length)
        for mine, theirs in zip(_kv_pairs(self.cache), _kv_pairs(cache), strict=True):
            a, b = _entries(mine), _entries(theirs)
            if a is None and b is None:
                continue  # every row is empty so far: the first forward initialises the layer for all rows
            if a is None:
                a = tuple(t.new_zeros(len(self.lengths), *t.shape[1:2], 0, t.shape[-1]) for t in b)
            if b is None:
                b = tuple(t.new_zeros(1, *t.shape[1:2], 0, t.shape[-1]) for t in a)
            _set(mine, *(torch.cat([_resized(x, width), _resized(y, width)]) for x, y in zip(a, b, strict=True)))
        self.lengths.append(length)

    def remove(self, rows: Sequence[int]) -> None:
        """Drop these rows (the requests left)."""
        gone = set(rows)
        stay = [b for b in range(len(self.lengths)) if b not in gone]
        if not stay:
            self.cache, self.lengths = None, []
            return
        self.lengths = [self.lengths[b] for b in stay]
        index = torch.tensor(stay)
        for layer in _kv_pairs(self.cache):
            if (kv := _entries(layer)) is not None:
                _set(layer, *(t.index_select(0, index.to(t.device))[:, :, : self.width] for t in kv))

    def forward(self, rows: Sequence[StepInputs]) -> list[torch.Tensor]:
        """Logits ([n_b, V] float32) for every row's step inputs, in one forward."""
        if [r.past for r in rows] != self.lengths:
            raise RuntimeError(f"batch rows out of step: {[r.past for r in rows]} vs cache {self.lengths}")
        width = max(r.tokens.shape[0] for r in rows)
        self.step_start, self.step_len = self.width, width
        if self.packing is not None:
            self.packing.use(width * len(rows))
        if len(rows) == 1:  # exactly the single-request forward
            return [tree_forward(self.model, self.kw, self.cache, *rows[0]).float()]
        ids, positions, mask = self._layout(rows, width)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         **{self.kw: self.cache})
        return [out.logits[b, : r.tokens.shape[0]].float() for b, r in enumerate(rows)]

    def _layout(self, rows: Sequence[StepInputs], width: int):
        device, start = rows[0].tokens.device, self.step_start
        b_count = len(rows)
        ids = torch.zeros(b_count, width, dtype=torch.long, device=device)
        positions = torch.zeros(b_count, width, dtype=torch.long, device=device)
        low = torch.finfo(self.model.dtype).min
        mask = torch.full((b_count, 1, width, start + width), low, dtype=self.model.dtype, device=device)
        pad = torch.arange(width, device=device)
        for b, r in enumerate(rows):
            n = r.tokens.shape[0]
            ids[b, :n], positions[b, :n], positions[b, n:] = r.tokens, r.positions, r.past
            mask[b, 0, :n, : r.past] = 0
            tree = mask[b, 0, :n, start : start + n]
            if r.ancestors is None:
                tree.fill_(0)
            else:
                tree.masked_fill_(r.ancestors, 0)
            mask[b, 0, pad[n:], start + pad[n:]] = 0  # padding sees only itself and is never read
        return ids, positions, mask

    def keep(self, kept: Sequence[torch.Tensor]) -> None:
        """After a forward: of row b's step entries keep those at ``kept[b]`` (sorted, the root 0 first),
        moved right behind its past; the cache is cut to the longest row."""
        if len(self.lengths) == 1:
            keep_step_entries(self.cache, self.step_len, kept[0])
            self.lengths[0] += kept[0].numel()
            return
        rows, src, dst = [], [], []
        for b, k in enumerate(kept):
            m = k.numel()
            rows.append(torch.full((m,), b, dtype=torch.long))
            src.append(k.cpu() + self.step_start)
            dst.append(torch.arange(self.lengths[b], self.lengths[b] + m))
            self.lengths[b] += m
        rows_i, src_i, dst_i = torch.cat(rows), torch.cat(src), torch.cat(dst)
        for layer in _kv_pairs(self.cache):
            if (kv := _entries(layer)) is None:
                continue
            for t in kv:
                r, s, d = rows_i.to(t.device), src_i.to(t.device), dst_i.to(t.device)
                t[r, :, d] = t[r, :, s]  # the right side is a copy, so overlapping moves are safe
            _set(layer, *(t[:, :, : self.width] for t in kv))


class Batch:
    """Requests decoded together. ``add`` a request (prefilled at once), ``step`` advances every member by one
    verified forward and returns those that left (finished or failed); ``remove`` drops one (cancelled).

    Use as a context manager: the packed weights and the attention function are installed for the model while
    the batch is open, as :func:`msn.generate` does for one request."""

    def __init__(self, model, *, state: DecoderState | None = None, pack: bool | None = None,
                 measure_in_requests: bool = True):
        reason = batch_unsupported(model)
        if reason is not None:
            raise MsnError(f"requests to this model cannot share a forward ({reason}): decode them one at a time")
        if state is not None and not isinstance(state, DecoderState):
            raise MsnError(f"state must be a msn.decoding.engine.DecoderState (or None), got {type(state).__name__}")
        self.model, self.state, self.pack = model, state or decoder_state(model), pack
        # False: a request never measures a stale t(n) curve again (it would wait seconds, and so would the others;
        # msn serve); the steps keep refining it online. True: a request starting alone measures it, as msn.generate.
        self.measure_in_requests = measure_in_requests
        self.members: list[Member] = []
        self.kv: BatchKV | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Batch:
        stack = contextlib.ExitStack()
        if self.model.training:
            self.model.eval()
            stack.callback(self.model.train)
        pk = stack.enter_context(packing(self.model, resolve_pack(self.model, self.pack, False)))
        stack.enter_context(gqa_attention(self.model, True))
        stack.enter_context(torch.inference_mode())
        self._stack, self.kv = stack, BatchKV(self.model, pk)
        return self

    def __exit__(self, *exc) -> None:
        self.members = []
        self.kv = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __len__(self) -> int:
        return len(self.members)

    def add(self, input_ids, max_new_tokens: int | None = None, method: str = "tr-jacobi", tree=None,
            eos_token_id=None, streamer=None, seed: int = 0, **kwargs) -> Member:
        """A request joins (the arguments of :func:`msn.generate`, ``compile`` excepted): checked, prefilled,
        and verified with the others from the next step. Raises :class:`MsnError` for a bad request."""
        if self.kv is None:
            raise MsnError("a Batch is used inside a with block: with Batch(model) as batch: ...")
        attention_mask = kwargs.pop("attention_mask", None)
        if kwargs.get("compile"):
            raise MsnError("compile=True cannot be batched: batched requests verify eagerly")
        kwargs.pop("compile", None)
        req = parse_request(self.model, input_ids, max_new_tokens, method, tree, eos_token_id, None, attention_mask,
                            kwargs, seed, streamer=streamer, compile=False, pack=self.pack)
        decoder = _Decoder(self.model, req, streamer, seed, self.state, False, self.kv.packing, private_sources=True,
                           measure_again=self.measure_in_requests and not self.members)  # others would wait
        member = Member(decoder, time.perf_counter())
        if streamer is not None:
            streamer.put(req.input_ids.cpu())
        decoder.prefill()
        self.kv.add(decoder.kv.cache, decoder.length - 1)
        decoder.kv = _RowKeep(self.kv.packing is not None)
        self.members.append(member)
        return member

    def remove(self, member: Member) -> None:
        """The request leaves now (cancelled); its row is freed."""
        if member in self.members:
            self._leave([member])

    def step(self) -> list[Member]:
        """One verified forward for every member; returns the members that left (``output`` or ``error`` set)."""
        if not self.members:
            return []
        t0 = time.perf_counter()
        decoders = [m.decoder for m in self.members]
        tries = [d.propose() for d in decoders]
        trees = self.choose(decoders, tries)
        pasts, start = list(self.kv.lengths), time.perf_counter()
        logits = self.kv.forward([d.inputs(t) for d, t in zip(decoders, trees, strict=True)])
        seconds = time.perf_counter() - start
        root = torch.zeros(1, dtype=torch.long)
        for member, trie, tree, rows in zip(self.members, tries, trees, logits, strict=True):
            d = member.decoder
            d.forward_seconds, d.kv.kept = seconds, root
            try:
                d.settle(trie, tree, rows)
            except Exception as e:  # a streamer stopping it, a late bad stop rule: this request alone ends
                member.error = e
        self.kv.keep([d.kv.kept for d in decoders])
        latency = next((d.latency for d in decoders if d.latency is not None), None)
        if latency is not None and len(decoders) == 1:  # the curve's own shape: refine it
            latency.observe(len(trees[0]) - 1, seconds, pasts[0], time.perf_counter() - t0)
        elif latency is not None:
            tokens = len(decoders) * max(len(t) for t in trees)
            ratio = seconds / latency.predict(tokens - 1, sum(pasts) // len(pasts))
            self.state.batch_scale += SCALE_ALPHA * (min(max(ratio, 0.25), 4.0) - self.state.batch_scale)
        left = [m for m in self.members if m.error is not None or m.decoder.done]
        self._leave(left)
        return left

    def _leave(self, members: list[Member]) -> None:
        if not members:
            return
        self.kv.remove([self.members.index(m) for m in members])
        now = time.perf_counter()
        for m in members:
            self.members.remove(m)
            if m.error is None and m.decoder.done:
                if m.decoder.streamer is not None:
                    m.decoder.streamer.end()
                m.output = m.decoder.output(now - m.started)

    def choose(self, decoders: list[_Decoder], tries: list[trie_mod.Trie]) -> list[trie_mod.StepTree]:
        """Each request's tree: static templates whole; auto trees one shared size, the one maximising the
        batch's expected tokens per second, E(size) / t(B x width(size), past). A batch of one sizes its tree
        as a lone request does."""
        if len(decoders) == 1:
            return [decoders[0].choose(tries[0])]
        auto = [i for i, d in enumerate(decoders) if d.latency is not None]
        trees: dict[int, trie_mod.StepTree] = {i: decoders[i].choose(tries[i]) for i in range(len(decoders))
                                               if i not in auto}
        if auto:
            size = self.shared_size([decoders[i] for i in auto], [tries[i] for i in auto], list(trees.values()))
            trees.update({i: decoders[i].choose(tries[i], size) for i in auto})
        return [trees[i] for i in range(len(decoders))]

    def shared_size(self, decoders: list[_Decoder], tries: list[trie_mod.Trie],
                    fixed: list[trie_mod.StepTree]) -> int:
        """The auto trees' shared node count. ``fixed``: the static trees verified beside them (their width is
        paid anyway)."""
        count = len(decoders) + len(fixed)
        latency = decoders[0].latency
        past = int(sum(self.kv.lengths) / max(len(self.kv.lengths), 1))
        expected = []  # per auto request: expected tokens with its first k nodes, k = 0..limit
        for d, trie in zip(decoders, tries, strict=True):
            order, q = trie_mod.ranked(trie)
            expected.append(list(itertools.accumulate((q[i] for i in order[: d.node_limit(trie)]), initial=1.0)))
        scale = self.state.batch_scale
        return shared_tree_size(expected, lambda tokens: scale * latency.predict(tokens - 1, past) + count * latency.overhead,
                                fixed_tokens=sum(sum(t.q) for t in fixed), fixed=len(fixed),
                                fixed_width=max((len(t) for t in fixed), default=1))


def shared_tree_size(expected: Sequence[Sequence[float]], seconds: Callable[[int], float], *,
                     fixed_tokens: float = 0.0, fixed: int = 0, fixed_width: int = 1) -> int:
    """The node count k every auto tree of a batch takes: the one maximising the batch's expected tokens per
    second. ``expected[b][k]``: request b's expected tokens with its k likeliest nodes (k = 0..its limit);
    ``seconds(tokens)``: a step over that many forward tokens. Every row pays for the widest tree (padding), so
    a step over B rows of width w costs ``seconds(B * w)``. ``fixed`` static trees (``fixed_tokens`` expected
    in all, the widest ``fixed_width`` tokens) ride along. Ties go to the smaller tree."""
    rows = len(expected) + fixed
    best, best_rate = 0, -1.0
    for k in range(max(len(e) for e in expected)):
        width = max(fixed_width, 1 + max(min(k, len(e) - 1) for e in expected))
        rate = (fixed_tokens + sum(e[min(k, len(e) - 1)] for e in expected)) / seconds(rows * width)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def generate_batch(model, prompts: Sequence, *, max_batch: int = 8, state: DecoderState | None = None,
                   pack: bool | None = None, **kwargs) -> list[GenerateOutput]:
    """Decode several prompts together, at most ``max_batch`` at a time (the next joins as soon as one
    finishes); the keywords of :func:`msn.generate` apply to every prompt. Greedy (or seeded sampling), each
    output is what :func:`msn.generate` gives that prompt alone (fp32 exactly; bf16 up to near-ties)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise MsnError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    outputs: list[GenerateOutput | None] = [None] * len(prompts)
    waiting = list(enumerate(prompts))
    index: dict[Member, int] = {}
    with Batch(model, state=state, pack=pack) as batch:
        while waiting or len(batch):
            while waiting and len(batch) < max_batch:
                i, ids = waiting.pop(0)
                index[batch.add(ids, **kwargs)] = i
            for member in batch.step():
                if member.error is not None:
                    raise member.error
                outputs[index[member]] = member.output
    return outputs  # type: ignore[return-value]
