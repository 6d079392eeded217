"""TR-Jacobi decoding: draft sources (jacobi, retrieval, recycling) -> token tree -> verify -> cache -> engine."""

from msn.decoding.batch import Batch, generate_batch
from msn.decoding.engine import DecoderState, GenerateOutput, generate
from msn.decoding.tree import METHODS, TREE_PRESETS, AutoTree, TreeError, TreeTemplate, default_tree

__all__ = ["METHODS", "TREE_PRESETS", "AutoTree", "Batch", "DecoderState", "GenerateOutput", "TreeError", "TreeTemplate",
           "default_tree", "generate", "generate_batch"]
