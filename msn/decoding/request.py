"""One generation request, checked before any compute: what we cannot do correctly is refused, and no
keyword is silently ignored (a typo like ``max_new_token=5`` must not run with the default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn.decoding.sampling import SAMPLING_KEYS, Sampling, sampling_from
from msn.decoding.tree import METHODS, Tree, resolve_tree
from msn.errors import MsnError
from msn.prompting import eos_ids


@dataclass
class Request:
    input_ids: torch.Tensor  # [1, L]
    max_new_tokens: int
    method: str
    tree: Tree  # already narrowed to the method's sources
    eos: set[int]
    via_hf: bool
    sampling: Sampling | None = None  # None: greedy


def resolve_eos(model, eos_token_id=None) -> set[int]:
    """The stop ids: the given ones, else the model's generation config's (see :func:`msn.prompting.eos_ids`)."""
    if eos_token_id is None:
        return set(eos_ids(model))
    return set(eos_ids(override=eos_token_id))


def context_limit(config) -> int | None:
    """The model's context length from its config (None when the config names none)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _as_ids(input_ids) -> torch.Tensor:
    if input_ids is None:
        raise MsnError("input_ids is required: a [1, length] tensor of token ids")
    if isinstance(input_ids, list | tuple):
        flat = input_ids[0] if input_ids and isinstance(input_ids[0], list | tuple) else input_ids
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in flat):
            raise MsnError("input_ids must be integer token ids (got a list with non-integers)")
        input_ids = torch.tensor([list(flat)], dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise MsnError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise MsnError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    return input_ids.long()


_WARPERS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"}


def _sampling(kwargs: dict, via_hf: bool, generation_config, seed: int) -> Sampling | None:
    """Sampling settings, or None for greedy; every other keyword left in ``kwargs`` is an error."""
    do_sample = kwargs.pop("do_sample", None)
    given = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
    if via_hf:
        do_sample = do_sample or getattr(generation_config, "do_sample", False)
        processors = kwargs.pop("logits_processor", None) or []
        other = [type(p).__name__ for p in processors if type(p).__name__ not in _WARPERS]
        if other:
            raise MsnError(f"generation settings that change the logits ({', '.join(other)}) are not supported by "
                           "msn decoding; drop them from the generation config")
        # The rest are model inputs transformers prepared itself (cache, positions, logits_to_keep, ...): it has
        # already refused unknown ones (``_validate_model_kwargs``), and we build our own cache and positions.
        kwargs.clear()
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise MsnError(f"unknown or unsupported keyword(s) for msn.generate: {names} (accepted: max_new_tokens, "
                       "method, tree, eos_token_id, streamer, seed, attention_mask, state, do_sample, "
                       f"{', '.join(SAMPLING_KEYS)})")
    if not do_sample:
        if any(v is not None for v in given.values()):
            raise MsnError(f"{', '.join(k for k, v in given.items() if v is not None)} only apply to sampling: "
                           "pass do_sample=True (or drop them for greedy decoding)")
        return None
    return sampling_from(given, base=generation_config if via_hf else None, seed=seed)


def parse_request(model, input_ids, max_new_tokens, method, tree, eos_token_id, generation_config,
                  attention_mask, kwargs: dict, seed: int = 0) -> Request:
    via_hf = generation_config is not None
    kwargs = dict(kwargs)
    sampling = _sampling(kwargs, via_hf, generation_config, seed)
    ids = _as_ids(input_ids)
    if via_hf:
        if max_new_tokens is None:
            max_new_tokens = generation_config.max_new_tokens or (generation_config.max_length - ids.shape[-1])
        if eos_token_id is None:
            eos_token_id = generation_config.eos_token_id
    if max_new_tokens is None:
        max_new_tokens = 128
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise MsnError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if method not in METHODS:
        raise MsnError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if ids.dim() != 2:
        raise MsnError(f"input_ids must have shape [batch, length], got {tuple(ids.shape)}")
    if ids.shape[0] != 1:
        raise MsnError(f"batch size {ids.shape[0]} is not supported yet: msn decodes one sequence at a time")
    if ids.shape[1] == 0:
        raise MsnError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise MsnError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if mask.shape != ids.shape or not bool((mask == 1).all()):
            raise MsnError("attention_mask with padding is not supported (msn decodes one unpadded sequence): "
                           "pass the prompt without padding")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise MsnError(f"input_ids contain ids outside the vocabulary 0..{vocab - 1}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    narrowed = resolve_tree(tree, device, model.dtype).for_method(method)
    _check_model(model, ids.shape[1], max_new_tokens, narrowed)
    return Request(ids, max_new_tokens, method, narrowed, resolve_eos(model, eos_token_id), via_hf, sampling)


def _check_model(model, prompt_len: int, max_new_tokens: int, tree: Tree) -> None:
    config = model.config
    vocab = getattr(config, "vocab_size", None)
    top_k = getattr(tree, "top_k", 0)
    if vocab and top_k > vocab:
        raise MsnError(f"tree {tree.name!r} asks for Jacobi candidate rank {top_k - 1}, but the vocabulary has only "
                       f"{vocab} tokens: use ranks below {vocab}")
    limit = context_limit(config)
    total = prompt_len + max_new_tokens
    if limit is not None and total > limit:
        raise MsnError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's context of {limit} tokens"
        )
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if tree.size and "flash" in attn:
        raise MsnError(
            f"attention backend {attn!r} ignores 4-D attention masks, which tree verification needs; "
            "load the model with attn_implementation='sdpa' (or 'eager')"
        )
    if tree.size and not getattr(model, "_supports_attention_backend", True) and attn not in ("sdpa", "eager"):
        raise MsnError(f"model {type(model).__name__} does not support custom 4-D attention masks")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = window and (not layer_types or "sliding_attention" in layer_types)
    if tree.size and uses_window and total + tree.size + 1 > window - 1:
        raise MsnError(
            f"sequence of {total} tokens (+ {tree.size + 1} tree tokens) exceeds the sliding window of "
            f"{window}: tree decoding beyond the window is not supported yet (use method='ar')"
        )
