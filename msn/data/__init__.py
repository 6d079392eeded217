"""Text -> tokens, in four rooms: records and their JSON shapes (``records``), the built-in datasets and the
train / held-out split (``builtin``), chat rendering, labels and tokenized datasets (``chat``), and batches:
plain padding and the MSN collator (``collate``).

Every name is re-exported here, so ``from msn.data import build_dataset`` keeps working.
"""

from __future__ import annotations

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
from msn.data.collate import MSNCollator, iter_batches, pad_batch
from msn.data.records import ROLE_ALIASES, Record, normalize_record, read_jsonl

__all__ = [
    "BUILTIN_DATASETS", "HELDOUT_BUCKETS", "IGNORE", "ROLE_ALIASES", "SPLITS", "MSNCollator", "Record",
    "TokenizedDataset", "build_dataset", "iter_batches", "iter_json_array", "iter_records", "normalize_record",
    "pad_batch", "read_jsonl", "render_pieces", "sharegpt_path", "sharegpt_records", "split_dataset",
    "stdlib_records", "tokenize_messages",
]  # fmt: skip
