"""Token sequences (prompt + response) that the teacher scores and students train on."""

from __future__ import annotations

import functools
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
        ("prompt_index", pa.int64()),  # which prompt the sequence answers (N samples share one)
        ("prompt_len", pa.int32()),  # response starts at this token
        ("input_ids", pa.list_(pa.int32())),
    ]
)
FORMAT = "hpd-sequences/2"  # 2: zstd-framed shards


def rows_table(seq_ids, prompt_index, prompt_lens, input_ids) -> pa.Table:
    return pa.table(
        {
            "seq_id": pa.array(seq_ids, pa.int64()),
            "prompt_index": pa.array(prompt_index, pa.int64()),
            "prompt_len": pa.array(prompt_lens, pa.int32()),
            "input_ids": pa.array([list(map(int, x)) for x in input_ids], pa.list_(pa.int32())),
        },
        schema=SCHEMA,
    )


def is_published(directory: Path) -> bool:
    """A finished sequence store of this format is at `directory`."""
    return shards.is_published(directory, FORMAT)


def content_digest(table: pa.Table) -> str:
    """Digest of what the sequences say (tokens and prompt boundaries), independent of Arrow's bytes."""
    h = hashlib.sha256()
    for name in ("seq_id", "prompt_len"):
        h.update(table.column(name).to_numpy().astype(np.int64).tobytes())
    ids = table.column("input_ids").combine_chunks()
    h.update(ids.offsets.to_numpy().astype(np.int64).tobytes())
    h.update(ids.values.to_numpy().astype(np.int32).tobytes())
    return h.hexdigest()


class SequenceWriter(ShardWriter):
    def __init__(self, final_dir: Path, meta: dict, rank: int = 0):
        super().__init__(final_dir, {"format": FORMAT, **meta}, rank)

    def write_rows(self, index: int, table: pa.Table) -> dict:
        tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("input_ids"))).as_py() or 0)
        return self.write(index, table, tokens=tokens, content=content_digest(table))

    def finish(self, num_shards: int, **summary) -> dict:
        contents = [self.shards[i]["content"] for i in range(num_shards) if i in self.shards]
        return super().finish(num_shards, fingerprint=digest(contents), **summary)


class SequenceStore:
    """Random access to published sequences by seq_id."""

    def __init__(self, directory: Path):
        self.shards = ShardSet(directory)
        self.manifest = self.shards.manifest
        if self.manifest.get("format") != FORMAT:
            raise CorruptShardError(
                f"sequences in {directory} have format {self.manifest.get('format')!r}, this "
                f"hpd reads {FORMAT!r}; rerun the generate stage"
            )
        self.shard_size = self.manifest["shard_size"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return self.manifest["rows"]

    @functools.lru_cache(maxsize=4)
    def shard_rows(self, index: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(seq_ids, prompt_lens, input_ids) of one shard."""
        t = self.shards.table(index)
        ids = t.column("input_ids").combine_chunks()
        offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
        seqs = [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        return t.column("seq_id").to_numpy(), t.column("prompt_len").to_numpy(), seqs

    def prompt_index(self, index: int) -> np.ndarray:
        """Which prompt each sequence of shard `index` answers (a prompt's samples share one)."""
        return self.shards.table(index).column("prompt_index").to_numpy()

    def range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(seq_ids, prompt_lens, input_ids) of sequences start .. stop-1, across shard boundaries."""
        ids, plens, seqs = [], [], []
        for shard in range(start // self.shard_size, (stop - 1) // self.shard_size + 1):
            s_ids, s_plens, s_seqs = self.shard_rows(shard)
            lo = max(start - shard * self.shard_size, 0)
            hi = min(stop - shard * self.shard_size, len(s_ids))
            ids.append(s_ids[lo:hi])
            plens.append(s_plens[lo:hi])
            seqs += s_seqs[lo:hi]
        return np.concatenate(ids), np.concatenate(plens), seqs

    def get(self, seq_id: int) -> tuple[np.ndarray, int]:
        _, plens, seqs = self.range(seq_id, seq_id + 1)
        return seqs[0], int(plens[0])
