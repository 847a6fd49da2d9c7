"""Values of whole responses: one number per sequence of a sequence store, stored beside it.

A value store is a shard set like the sequences it judges (the same shards, so a judging run resumes after its
last published shard): per sequence its seq_id, the prompt it answers (samples of one prompt are compared with
each other) and its value in float64. The manifest names the sequences (their fingerprint) and the value
function, so a store is never read against other sequences.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import shards
from .fingerprint import digest
from .shards import CorruptShardError, ShardSet, ShardWriter

SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("prompt_index", pa.int64()),  # the prompt the sequence answers: a prompt's samples share one
        ("value", pa.float64()),
    ]
)
FORMAT = "hpd-values/1"


def values_table(seq_ids, prompt_index, values) -> pa.Table:
    return pa.table(
        {
            "seq_id": pa.array(np.asarray(seq_ids, np.int64)),
            "prompt_index": pa.array(np.asarray(prompt_index, np.int64)),
            "value": pa.array(np.asarray(values, np.float64)),
        },
        schema=SCHEMA,
    )


def is_published(directory: Path) -> bool:
    return shards.is_published(directory, FORMAT)


class ValueWriter(ShardWriter):
    def __init__(self, final_dir: Path, meta: dict, rank: int = 0):
        super().__init__(final_dir, {"format": FORMAT, **meta}, rank)

    def write_rows(self, index: int, table: pa.Table) -> dict:
        h = hashlib.sha256()
        for name in SCHEMA.names:
            h.update(table.column(name).to_numpy().tobytes())
        return self.write(index, table, content=h.hexdigest())

    def finish(self, num_shards: int, **summary) -> dict:
        contents = [self.shards[i]["content"] for i in range(num_shards)]
        return super().finish(num_shards, fingerprint=digest(contents), **summary)


class ValueStore:
    """A published value store, read whole (one float per sequence)."""

    def __init__(self, directory: Path):
        self.shards = ShardSet(Path(directory))
        self.manifest = self.shards.manifest
        if self.manifest.get("format") != FORMAT:
            raise CorruptShardError(
                f"values in {directory} have format {self.manifest.get('format')!r}, this hpd "
                f"reads {FORMAT!r}; rerun the judge stage"
            )

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seq_ids, prompt_index, values) of every sequence, in seq_id order."""
        t = pa.concat_tables([self.shards.table(i) for i in range(self.shards.num_shards)])
        return tuple(t.column(n).to_numpy() for n in SCHEMA.names)
