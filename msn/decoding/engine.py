"""The decoding loop: prefill once, then draft -> tree -> one forward -> accept -> keep the cache.

Every method is the same loop with a different tree: ``ar`` has no draft nodes (plain greedy decoding on
the same cache, our baseline), ``jacobi`` only Jacobi candidates, ``retrieval`` only the prompt-lookup
chain, ``tr-jacobi`` both. Greedy verification makes the output identical to plain greedy decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from msn.decoding.cache import cache_keyword, keep_step_entries, new_cache
from msn.decoding.drafts import JacobiTable, RetrievalIndex
from msn.decoding.tree import TreeTemplate, build_buffers, fill_tree, resolve_tree
from msn.decoding.verify import greedy_accept
from msn.errors import MsnError

METHODS = ("ar", "jacobi", "retrieval", "tr-jacobi")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [1, prompt + new] like transformers' generate
    new_tokens: int
    steps: int  # forward passes after the prefill
    accept_lengths: list[int]  # tokens committed per step (accepted drafts + the bonus token)
    wall_time: float  # seconds, prefill included
    method: str = "tr-jacobi"
    tree: TreeTemplate | None = None
    node_hits: torch.Tensor | None = None  # per template node (root first): steps it was accepted
    retrieval_lengths: list[int] | None = None  # per step: tokens the retrieval chain drafted (0: no match)
    # Per step: accepted draft tokens that a Jacobi node / a retrieval node drafted (a token both drafted,
    # merged siblings, counts for both). None without draft nodes (``ar``). Says which source the speed-up came from.
    jacobi_accepted: list[int] | None = None
    retrieval_accepted: list[int] | None = None

    @property
    def mean_accepted(self) -> float:
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)


def _context_limit(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, list | tuple | set) else [eos_token_id])}


def check_request(model, input_ids: torch.Tensor, max_new_tokens: int, template: TreeTemplate) -> None:
    """Refuse what we cannot do correctly, before any compute."""
    if input_ids.dim() != 2:
        raise MsnError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise MsnError(f"batch size {input_ids.shape[0]} is not supported yet: msn decodes one sequence at a time")
    if input_ids.shape[1] == 0:
        raise MsnError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise MsnError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = model.config
    limit = _context_limit(config)
    total = input_ids.shape[1] + max_new_tokens
    if limit is not None and total > limit:
        raise MsnError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's context of {limit} tokens"
        )
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if template.size and "flash" in attn:
        raise MsnError(
            f"attention backend {attn!r} ignores 4-D attention masks, which tree verification needs; "
            "load the model with attn_implementation='sdpa' (or 'eager')"
        )
    if template.size and not getattr(model, "_supports_attention_backend", True) and attn not in ("sdpa", "eager"):
        raise MsnError(f"model {type(model).__name__} does not support custom 4-D attention masks")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = window and (not layer_types or "sliding_attention" in layer_types)
    if template.size and uses_window and total + template.size + 1 > window - 1:
        raise MsnError(
            f"sequence of {total} tokens (+ {template.size + 1} tree tokens) exceeds the sliding window of "
            f"{window}: tree decoding beyond the window is not supported yet (use method='ar')"
        )


def _tree_mask(ancestors: torch.Tensor, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask [1, 1, n, past + n]: 0 where attention is allowed, dtype-min elsewhere.
    (A bool mask is silently wrong on the eager backend; the float one is exact on sdpa and eager.)"""
    n = ancestors.shape[0]
    mask = torch.zeros(1, 1, n, past + n, dtype=dtype, device=ancestors.device)
    mask[0, 0, :, past:].masked_fill_(~ancestors, torch.finfo(dtype).min)
    return mask


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    method: str = "tr-jacobi",
    tree: TreeTemplate | str | None = None,
    eos_token_id: int | list[int] | None = None,
    streamer=None,
    seed: int = 0,
    generation_config=None,
    **kwargs,
) -> GenerateOutput | torch.Tensor:
    """Greedy generation with TR-Jacobi (or ``ar`` / ``jacobi`` / ``retrieval``) decoding.

    Returns a :class:`GenerateOutput`. Also works as ``model.generate(ids, custom_generate=msn.generate,
    method=..., tree=...)``: then settings come from the generation config and the sequences are returned.
    """
    via_hf = generation_config is not None
    if via_hf:
        if getattr(generation_config, "do_sample", False):
            raise MsnError("msn decoding is greedy only: pass do_sample=False")
        if max_new_tokens is None:
            max_new_tokens = generation_config.max_new_tokens or (generation_config.max_length - input_ids.shape[1])
        if eos_token_id is None:
            eos_token_id = generation_config.eos_token_id
    if max_new_tokens is None:
        max_new_tokens = 128
    if method not in METHODS:
        raise MsnError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    device = input_ids.device
    template = resolve_tree(tree, device, model.dtype).for_method(method)
    check_request(model, input_ids, max_new_tokens, template)
    out = _decode(model, input_ids, max_new_tokens, template, _eos_set(model, eos_token_id), streamer, seed)
    out.method = method
    return out.sequences if via_hf else out


def _decode(model, input_ids, max_new_tokens, template, eos, streamer, seed) -> GenerateOutput:
    device, dtype = input_ids.device, model.dtype
    kw = cache_keyword(model)
    buf = build_buffers(template, device)
    gen = torch.Generator().manual_seed(seed)
    prompt_len = input_ids.shape[1]
    committed = torch.empty(prompt_len + max_new_tokens, dtype=torch.long, device=device)
    committed[:prompt_len] = input_ids[0]
    length = prompt_len
    jacobi = JacobiTable(template.jacobi_depth, template.top_k, gen) if template.jacobi else None
    retrieval = RetrievalIndex(template.retrieval) if template.retrieval else None
    if jacobi is not None:
        jacobi.reset(input_ids[0])
    if retrieval is not None:
        retrieval.extend(input_ids[0].tolist())
    empty_chain = torch.full((template.retrieval,), -1, dtype=torch.long, device=device)
    node_hits = torch.zeros(buf.num_nodes, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    start = time.perf_counter()
    cache = new_cache(model)
    if prompt_len > 1:
        model(input_ids=input_ids[:, :-1], use_cache=True, **{kw: cache})
    accept_lengths: list[int] = []
    chain_lengths: list[int] = []
    by_source: tuple[list[int], list[int]] | None = None if buf.num_nodes == 1 else ([], [])
    n_jacobi = len(template.jacobi)
    root = int(committed[length - 1])
    done = False
    while not done:
        remaining = prompt_len + max_new_tokens - length
        past = length - 1
        if buf.num_nodes == 1:  # ar: one token, the model's own causal mask
            logits = model(input_ids=committed[None, past:length], use_cache=True, **{kw: cache}).logits[0]
            new = [int(logits[-1].float().argmax())]  # bf16 argmax on CPU is ~10x slower than fp32
            tree_step = None
        else:
            drafts = [jacobi.table.flatten().to(device)] if jacobi is not None else []
            if retrieval is not None:
                chain = retrieval.draft()
                chain_lengths.append(len(chain))
                if chain:
                    chain_t = empty_chain.clone()
                    chain_t[: len(chain)] = torch.tensor(chain, device=device)
                    drafts.append(chain_t)
                else:
                    drafts.append(empty_chain)
            tree_step = fill_tree(buf, root, torch.cat(drafts), max_depth=remaining - 1)
            logits = model(
                input_ids=tree_step.tokens[None],
                position_ids=(tree_step.depth + past)[None],
                attention_mask=_tree_mask(tree_step.ancestors, past, dtype),
                use_cache=True,
                **{kw: cache},
            ).logits[0]
            logits = logits.float()  # bf16 argmax/topk on CPU is ~10x slower than fp32
            acc = greedy_accept(tree_step.tokens, logits.argmax(-1), tree_step.paths)
            new = tree_step.tokens[acc.accepted].tolist() + [acc.bonus]
            keep = torch.cat([torch.zeros(1, dtype=torch.long, device=device), acc.accepted])
            keep_step_entries(cache, tree_step.tokens.numel(), keep)
            accepted_set = torch.zeros(tree_step.tokens.numel(), dtype=torch.bool, device=device)
            accepted_set[acc.accepted] = True
            node_hits += (tree_step.compact_of > 0) & accepted_set[tree_step.compact_of.clamp(min=0)]
            if jacobi is not None:
                best = tree_step.paths[acc.path]
                rejected = best[acc.accepted.numel() + 1 :]
                rejected = rejected[rejected >= 0]
                jacobi.update(logits[rejected], committed[:length])
        # Stop exactly at EOS (nothing after it) and at exactly max_new_tokens.
        new = new[:remaining]
        for i, t in enumerate(new):
            if t in eos:
                new, done = new[: i + 1], True
                break
        if by_source is not None:
            kept = set(acc.accepted[: len(new)].tolist())  # drafts that survived the EOS / budget cut
            supplier = tree_step.compact_of[1:].tolist()  # template node (root excluded) -> step token
            for counts, nodes in zip(by_source, (supplier[:n_jacobi], supplier[n_jacobi:]), strict=True):
                counts.append(len(kept.intersection(nodes)))
        committed[length : length + len(new)] = torch.tensor(new, device=device)
        length += len(new)
        accept_lengths.append(len(new))
        if retrieval is not None:
            retrieval.extend(new)
        if streamer is not None:
            streamer.put(torch.tensor(new))
        root = new[-1]
        done = done or length - prompt_len >= max_new_tokens
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    if streamer is not None:
        streamer.end()
    return GenerateOutput(
        sequences=committed[None, :length].clone(),
        new_tokens=length - prompt_len,
        steps=len(accept_lengths),
        accept_lengths=accept_lengths,
        wall_time=wall,
        tree=template,
        node_hits=node_hits,
        retrieval_lengths=chain_lengths,
        jacobi_accepted=by_source[0] if by_source else None,
        retrieval_accepted=by_source[1] if by_source else None,
    )
