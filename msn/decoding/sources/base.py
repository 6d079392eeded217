"""The draft-source interface: propose scored candidate tokens, then observe what verification decided.

A source never decides anything: the engine merges every source's candidates into one token tree, picks the
nodes worth verifying, runs one forward and tells each source what happened. A bad draft costs speed, never
correctness. Adding a source is one file with a subclass of :class:`DraftSource` plus one line in
``sources/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class Draft:
    """Candidate nodes as a tree fragment hanging from the root, parents listed before their children.

    ``parents[i]`` indexes this draft's own nodes (-1 = the root); ``scores[i]`` is the source's estimate
    that node i is accepted given that its parent is (an edge probability in [0, 1]); ``buckets[i]`` is the
    key under which the engine calibrates that estimate against what was really accepted; ``tags[i]``
    names a node of a static template (for per-node statistics) or is None.
    """

    parents: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    buckets: list[Any] = field(default_factory=list)
    tags: list[Any] = field(default_factory=list)

    def add(self, parent: int, token: int, score: float, bucket: Any, tag: Any = None) -> int:
        self.parents.append(parent)
        self.tokens.append(token)
        self.scores.append(score)
        self.buckets.append(bucket)
        self.tags.append(tag)
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class PromptLogits:
    """The model's predictions inside the prompt, at the positions sources asked for (``rows``, sorted):
    ``logits[i]`` is the prediction after ``prompt[rows[i]]``."""

    rows: torch.Tensor  # [m] long
    logits: torch.Tensor  # [m, V] float32


@dataclass
class Budget:
    """How much a source may propose this step. ``shape`` is a static template's part for this source
    (None in auto mode, where the source proposes generously and the engine selects)."""

    max_depth: int  # tokens left in the request minus the bonus token
    shape: Any = None
    # Auto mode: the most nodes worth proposing (None: the source's own limit). Every proposed node is merged,
    # ranked and calibrated each step, and on a CPU the tree never takes more than a few dozen.
    max_nodes: int | None = None


@dataclass
class VerifiedStep:
    """What one verified forward showed, for sources to learn from. ``logits`` rows follow ``tokens``
    (root first); row i is the model's prediction after node i given node i's path."""

    tokens: list[int]  # the step's input tokens, root first
    parents: list[int]  # parent per node (-1 for the root)
    logits: torch.Tensor  # [n, V] float32
    top_ids: torch.Tensor | None  # [n, K] the K best next tokens per row, best first (K = max top_k_needed)
    top_probs: torch.Tensor | None  # [n, K] their probabilities renormalised over the K (a score, not a softmax)
    accepted: list[int]  # accepted node indices along the path, root excluded
    rejected: list[int]  # the most likely continuation below the last accepted node (its inputs were wrong)
    new_tokens: list[int]  # committed this step: accepted drafts + the bonus token
    committed: torch.Tensor  # every committed id so far, the new ones included
    generator: torch.Generator



class DraftSource:
    """Base class. Subclasses set ``name`` and override what they need."""

    name: ClassVar[str] = "?"
    top_k_needed: int = 0  # how many of each row's best next tokens observe() needs
    # Whether the source's state is one request's (then requests decoded together each get a copy, made before
    # begin(), which replaces that state) or learnt across requests and shared (the recycling table).
    per_request: ClassVar[bool] = True

    def configure(self, shape) -> None:
        """A static template's part for this source, or None for the auto tree (propose generously)."""

    def prompt_rows(self, prompt: torch.Tensor) -> torch.Tensor | None:
        """Positions of ``prompt`` (all but its last token) whose predictions :meth:`begin` wants; None: none.
        The prefill computes logits only there (the LM head over a long prompt is ~20% of its cost)."""
        return None

    def begin(self, prompt: torch.Tensor, prefill_logits: PromptLogits | None, generator: torch.Generator) -> None:
        """A new request: ``prompt`` [L] ids; ``prefill_logits`` the predictions at the rows the sources asked
        for (their union; None when none did or the prompt is one token)."""

    def propose(self, committed: torch.Tensor, budget: Budget) -> Draft:
        raise NotImplementedError

    def observe(self, step: VerifiedStep) -> None:
        """Called after every verified step (also plain one-token steps)."""
