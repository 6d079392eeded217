"""One generation request, checked before any compute: what we cannot do correctly is refused, and no
keyword is silently ignored (a typo like ``max_new_token=5`` must not run with the default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn.decoding.sampling import SAMPLING_KEYS, Sampling, check_seed, sampling_from
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
        # A list of rows is a batch: refused below like a batch tensor, never cut to its first row.
        nested = bool(input_ids) and all(isinstance(r, list | tuple) for r in input_ids)
        rows = list(input_ids) if nested else [input_ids]
        if len({len(r) for r in rows}) > 1:
            raise MsnError(f"input_ids is a ragged list of {len(rows)} rows (lengths "
                           f"{', '.join(str(len(r)) for r in rows)}): msn decodes one sequence at a time; "
                           "pass one list of token ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) for r in rows for t in r):
            raise MsnError("input_ids must be integer token ids (got a list with non-integers)")
        if not all(-(2**63) <= t < 2**63 for r in rows for t in r):
            raise MsnError("input_ids contain ids outside the vocabulary (beyond 64 bits)")
        input_ids = torch.tensor([list(r) for r in rows], dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise MsnError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise MsnError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    return input_ids.long()


def _check_flag(name: str, value, allowed: str = "True, False or None") -> None:
    """Flags are read by truth value: a string like ``"no"`` would silently mean True."""
    if value is not None and not isinstance(value, bool):
        raise MsnError(f"{name} must be {allowed}, got {value!r}")


def _check_eos(eos_token_id) -> None:
    """One token id, or a list/tuple/set/1-D tensor of them (empty: stop at max_new_tokens only)."""
    if eos_token_id is None:
        return
    values = eos_token_id
    if isinstance(values, torch.Tensor):
        integral = not (values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool)
        values = values.tolist() if integral and values.dim() <= 1 else [None]
    if not isinstance(values, list | tuple | set):
        values = [values]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise MsnError(f"eos_token_id must be a token id (an integer >= 0) or a list of them, got {eos_token_id!r}")


def _check_mask(attention_mask, ids: torch.Tensor) -> None:
    if attention_mask is None:
        return
    try:
        mask = torch.as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError):
        raise MsnError(f"attention_mask must be a [1, length] tensor of 1s (or None), got "
                       f"{type(attention_mask).__name__}") from None
    if tuple(mask.shape) != tuple(ids.shape):
        raise MsnError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}: "
                       "give one 1 per prompt token (or no mask)")
    if not bool((mask == 1).all()):
        raise MsnError("attention_mask with padding is not supported (msn decodes one unpadded sequence): "
                       "pass the prompt without padding")


_WARPERS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"}
_STOP_FIX = "stop with eos_token_id / max_new_tokens"
# Generation-config settings msn cannot honour, each with its no-op test and the fix: transformers hands them
# over in the config, so anything else would be silently dropped. Its defaults (None, False, 1) all pass.
_HF_NEUTRAL = {
    "return_dict_in_generate": (lambda v: not v, "it returns the sequences; call msn.generate(model, ids, ...) "
                                "for a GenerateOutput with the per-step details"),
    "output_scores": (lambda v: not v, "drop it"),
    "output_logits": (lambda v: not v, "drop it"),
    "output_attentions": (lambda v: not v, "drop it"),
    "output_hidden_states": (lambda v: not v, "drop it"),
    "penalty_alpha": (lambda v: not v, "contrastive search is a different decoding; drop penalty_alpha"),
    "max_time": (lambda v: v is None, _STOP_FIX),
    "stop_strings": (lambda v: not v, _STOP_FIX),
    "num_beams": (lambda v: v in (None, 1), "msn decodes one sequence, greedy or sampled"),
    "num_return_sequences": (lambda v: v in (None, 1), "call it once per sequence, with a different seed"),
}


def _from_config(criterion, generation_config) -> bool:
    """Whether a stopping criterion is the max-length or EOS one transformers built from the generation
    config: msn applies those itself (max_new_tokens, eos_token_id)."""
    name = type(criterion).__name__
    if name == "MaxLengthCriteria":
        return getattr(criterion, "max_length", None) == generation_config.max_length
    ours = getattr(generation_config, "_eos_token_tensor", None)
    if name == "EosTokenCriteria" and ours is not None:
        theirs = torch.as_tensor(criterion.eos_token_id).cpu()
        return theirs.shape == ours.shape and torch.equal(theirs, ours.cpu())
    return False


def _check_hf(kwargs: dict, generation_config) -> None:
    """What transformers passes through ``custom_generate``: the generation config, prepared logits
    processors and stopping criteria, and model inputs. Each setting msn would drop is refused."""
    for key, (neutral, fix) in _HF_NEUTRAL.items():
        value = getattr(generation_config, key, None)
        if not neutral(value):
            raise MsnError(f"{key}={value!r} is not supported by msn.generate: {fix}")
    processors = kwargs.pop("logits_processor", None) or []
    other = [type(p).__name__ for p in processors if type(p).__name__ not in _WARPERS]
    if other:
        raise MsnError(f"generation settings that change the logits ({', '.join(other)}) are not supported by "
                       "msn decoding; drop them from the generation config")
    criteria = kwargs.pop("stopping_criteria", None) or []
    other = [type(c).__name__ for c in criteria if not _from_config(c, generation_config)]
    if other:
        raise MsnError(f"stopping_criteria ({', '.join(other)}) is not supported by msn.generate; {_STOP_FIX}")
    # The rest are model inputs transformers prepared itself (cache, positions, logits_to_keep, ...): it has
    # already refused unknown ones (``_validate_model_kwargs``), and we build our own cache and positions.
    kwargs.clear()


def _sampling(kwargs: dict, via_hf: bool, generation_config, seed: int) -> Sampling | None:
    """Sampling settings, or None for greedy; every other keyword left in ``kwargs`` is an error."""
    do_sample = kwargs.pop("do_sample", None)
    given = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
    if via_hf:
        _check_hf(kwargs, generation_config)
        do_sample = do_sample or getattr(generation_config, "do_sample", False)
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise MsnError(f"unknown or unsupported keyword(s) for msn.generate: {names} (accepted: max_new_tokens, "
                       "method, tree, eos_token_id, streamer, seed, attention_mask, state, compile, pack, "
                       f"do_sample, {', '.join(SAMPLING_KEYS)})")
    _check_flag("do_sample", do_sample, "True or False")
    if not do_sample:
        if any(v is not None for v in given.values()):
            raise MsnError(f"{', '.join(k for k, v in given.items() if v is not None)} only apply to sampling: "
                           "pass do_sample=True (or drop them for greedy decoding)")
        return None
    return sampling_from(given, base=generation_config if via_hf else None, seed=seed)


def _check_model_object(model) -> None:
    """A tokenizer passed as the model, or a model built without its weights (the meta device), would fail deep
    inside torch or transformers: named here instead."""
    if getattr(model, "config", None) is None or not callable(getattr(model, "parameters", None)):
        hint = ("; msn.generate(model, input_ids, ...) takes the model first, not the tokenizer"
                if callable(getattr(model, "decode", None)) else "")
        raise MsnError(f"model must be a loaded causal LM (e.g. from msn.load_model), got {type(model).__name__}{hint}")
    params = list(model.parameters())
    if not params:
        raise MsnError(f"model {type(model).__name__} has no parameters: pass a loaded causal LM")
    if any(p.is_meta for p in params):
        raise MsnError(f"model {type(model).__name__} has weights on the meta device (built without loading them): "
                       "load the weights first (msn.load_model, from_pretrained, or load_state_dict(..., assign=True))")


def parse_request(model, input_ids, max_new_tokens, method, tree, eos_token_id, generation_config,
                  attention_mask, kwargs: dict, seed: int = 0, *, streamer=None, compile=None,
                  pack=None) -> Request:
    _check_model_object(model)
    via_hf = generation_config is not None
    given_eos = eos_token_id
    kwargs = dict(kwargs)
    check_seed(seed)
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
    _check_mask(attention_mask, ids)
    _check_eos(eos_token_id)
    _check_flag("compile", compile)
    _check_flag("pack", pack)
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise MsnError(f"streamer must be an object with put() and end() methods (e.g. transformers' "
                       f"TextStreamer), got {type(streamer).__name__}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise MsnError(f"input_ids contain ids outside the vocabulary 0..{vocab - 1}")
    outside = sorted(e for e in eos_ids(override=given_eos) if vocab and e >= vocab) if given_eos is not None else []
    if outside:  # it could never be generated: the output would silently run to max_new_tokens
        raise MsnError(f"eos_token_id {outside[0]} is outside the vocabulary 0..{vocab - 1}: give the id of a token "
                       "the model can generate")
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
