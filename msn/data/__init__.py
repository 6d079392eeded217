"""Text -> tokens, in four rooms: records and their JSON shapes (``records``), the built-in datasets and the
train / held-out split (``builtin``), chat rendering, labels and tokenized datasets (``chat``), and batches:
plain padding (``collate``). What training, evaluation and distillation share; the MSN collator, which noises
a batch, is training's own (:mod:`msn.training.collator`).

Every name is re-exported here, so ``from msn.data import build_dataset`` keeps working.
``from msn.data import MSNCollator`` still works for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings

from msn.data.builtin import (
    BUILTIN_DATASETS,
    HELDOUT_BUCKETS,
    SPLITS,
    iter_json_array,
    iter_records,
    sharegpt_path,
    sharegpt_records,
    stdlib_records,
)
from msn.data.chat import (
    IGNORE,
    TokenizedDataset,
    build_dataset,
    render_pieces,
    split_dataset,
    tokenize_messages,
)
from msn.data.collate import iter_batches, pad_batch
from msn.data.records import ROLE_ALIASES, Record, normalize_record, read_jsonl

__all__ = [
    "BUILTIN_DATASETS", "HELDOUT_BUCKETS", "IGNORE", "ROLE_ALIASES", "SPLITS", "Record",
    "TokenizedDataset", "build_dataset", "iter_batches", "iter_json_array", "iter_records", "normalize_record",
    "pad_batch", "read_jsonl", "render_pieces", "sharegpt_path", "sharegpt_records", "split_dataset",
    "stdlib_records", "tokenize_messages",
]  # fmt: skip

# Moved out of this package; the old path works for one release (0.2 drops it).
_MOVED = {"MSNCollator": "msn.training.collator"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        warnings.warn(f"msn.data.{name} moved to {_MOVED[name]}.{name}; import it from there (the old path goes "
                      "in msn 0.2)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'msn.data' has no attribute {name!r}")
