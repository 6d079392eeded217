"""TR-Jacobi decoding: drafts (jacobi, retrieval) -> tree -> verify -> cache -> engine."""

from msn.decoding.engine import METHODS, GenerateOutput, generate
from msn.decoding.tree import TREE_PRESETS, TreeError, TreeTemplate, default_tree

__all__ = ["METHODS", "TREE_PRESETS", "GenerateOutput", "TreeError", "TreeTemplate", "default_tree", "generate"]
