"""msn: Make Some Noise training and TR-Jacobi decoding for any Hugging Face causal LM."""

from msn.data import MSNCollator, build_dataset
from msn.decoding import METHODS, GenerateOutput, TreeTemplate, generate
from msn.models import DEFAULT_MODEL, PRESETS, load_model
from msn.noise import NoiseConfig, ahead_noise, apply_noise, sample_segments, uniform_noise

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "PRESETS",
    "GenerateOutput",
    "MSNCollator",
    "NoiseConfig",
    "TreeTemplate",
    "ahead_noise",
    "apply_noise",
    "build_dataset",
    "generate",
    "load_model",
    "sample_segments",
    "uniform_noise",
]
