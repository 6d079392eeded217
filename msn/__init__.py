"""msn: Make Some Noise training and TR-Jacobi decoding for any Hugging Face causal LM."""

from msn.models import DEFAULT_MODEL, PRESETS, load_model

__all__ = ["DEFAULT_MODEL", "PRESETS", "load_model"]
__version__ = "0.1.0"

from msn.decoding import METHODS, GenerateOutput, TreeTemplate, generate  # noqa: E402

__all__ += ["METHODS", "GenerateOutput", "TreeTemplate", "generate"]

from msn.data import MSNCollator, build_dataset  # noqa: E402
from msn.noise import NoiseConfig, ahead_noise, apply_noise, sample_segments, uniform_noise  # noqa: E402

__all__ += ["MSNCollator", "NoiseConfig", "ahead_noise", "apply_noise", "build_dataset", "sample_segments", "uniform_noise"]
