"""Draft sources, by name. A new source: one file with a :class:`DraftSource` subclass, one line here."""

from msn.decoding.sources.base import Budget, Draft, DraftSource, PromptLogits, VerifiedStep
from msn.decoding.sources.jacobi import JacobiSource
from msn.decoding.sources.recycling import RecyclingSource
from msn.decoding.sources.retrieval import RetrievalSource

SOURCES: dict[str, type[DraftSource]] = {
    "jacobi": JacobiSource,
    "retrieval": RetrievalSource,
    "recycling": RecyclingSource,
}

__all__ = ["SOURCES", "Budget", "Draft", "DraftSource", "JacobiSource", "PromptLogits", "RecyclingSource",
           "RetrievalSource", "VerifiedStep"]
