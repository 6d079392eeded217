"""msn: Make Some Noise training and TR-Jacobi decoding for any Hugging Face causal LM.

Names are imported on first use, so ``msn --help`` and ``import msn`` do not pay for torch/transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "MSNCollator": "msn.training.collator",
    "build_dataset": "msn.data",
    "METHODS": "msn.decoding",
    "GenerateOutput": "msn.decoding",
    "TreeTemplate": "msn.decoding",
    "generate": "msn.decoding",
    "generate_batch": "msn.decoding",
    "DEFAULT_MODEL": "msn.models",
    "PRESETS": "msn.models",
    "load_model": "msn.models",
    "NoiseConfig": "msn.training.noise",
    "ahead_noise": "msn.training.noise",
    "apply_noise": "msn.training.noise",
    "sample_segments": "msn.training.noise",
    "uniform_noise": "msn.training.noise",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from msn.data import build_dataset  # noqa: F401
    from msn.decoding import METHODS, GenerateOutput, TreeTemplate, generate, generate_batch  # noqa: F401
    from msn.models import DEFAULT_MODEL, PRESETS, load_model  # noqa: F401
    from msn.training.collator import MSNCollator  # noqa: F401
    from msn.training.noise import NoiseConfig, ahead_noise, apply_noise, sample_segments, uniform_noise  # noqa: F401


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        try:  # submodules (msn.decoding, msn.errors, ...) as attributes, like an eager package
            return importlib.import_module(f"msn.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'msn' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
