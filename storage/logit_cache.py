"""The teacher logit cache: one schema, one key, one directory per key under a shared cache root.

Per scored position t (the teacher's distribution for the token at t+1) a cache row stores
  - the top-k token ids and their log-probs (float16: |error| <= |log p| * 2**-11, round to nearest),
  - the exact float32 log-prob of the sequence's own next token (even when outside the top-k),
  - the float32 log of the probability mass outside the top-k ("tail"; -inf when k = vocabulary size).
Rows are keyed by seq_id and carry a CRC of the sequence's tokens, so a reader can prove that the cached
row belongs to the batch it is paired with (rows matched by position alone fail silently elsewhere).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from . import atomic
from .fingerprint import digest
from .shards import MANIFEST, ShardSet, ShardWriter, lock_for

FORMAT_VERSION = 1
LOGPROB_REL_ERROR = 2.0 ** -11  # float16 round-to-nearest


def cache_key(*, teacher: str, tokenizer: str, data: str, top_k: int, temperature: float) -> dict:
    return {"format_version": FORMAT_VERSION, "teacher": teacher, "tokenizer": tokenizer, "data": data,
            "top_k": int(top_k), "temperature": float(temperature)}


def key_id(key: dict) -> str:
    return digest(key)[:20]


def tokens_crc(ids) -> int:
    return zlib.crc32(np.asarray(ids, dtype=np.int32).tobytes())


def id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def schema(vocab_size: int) -> pa.Schema:
    return pa.schema([
        ("seq_id", pa.int64()),
        ("tokens_crc", pa.uint32()),
        ("start", pa.int32()),  # first scored position; the row covers start .. start+n-1
        ("topk_ids", pa.list_(id_type(vocab_size))),  # n*k, row-major by position
        ("topk_logprobs", pa.list_(pa.float16())),
        ("target_logprob", pa.list_(pa.float32())),
        ("tail_logmass", pa.list_(pa.float32())),
    ])


@dataclass
class ScoredSequence:
    seq_id: int
    input_ids: np.ndarray
    start: int
    topk_ids: np.ndarray        # [n, k]
    topk_logprobs: np.ndarray   # [n, k]
    target_logprob: np.ndarray  # [n]
    tail_logmass: np.ndarray    # [n]


def rows_table(rows: list[ScoredSequence], vocab_size: int) -> pa.Table:
    ids_np = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    s = schema(vocab_size)
    return pa.table({
        "seq_id": pa.array([r.seq_id for r in rows], pa.int64()),
        "tokens_crc": pa.array([tokens_crc(r.input_ids) for r in rows], pa.uint32()),
        "start": pa.array([r.start for r in rows], pa.int32()),
        "topk_ids": pa.array([r.topk_ids.astype(ids_np).ravel() for r in rows], s.field("topk_ids").type),
        "topk_logprobs": pa.array([r.topk_logprobs.astype(np.float16).ravel() for r in rows],
                                  s.field("topk_logprobs").type),
        "target_logprob": pa.array([r.target_logprob.astype(np.float32) for r in rows], pa.list_(pa.float32())),
        "tail_logmass": pa.array([r.tail_logmass.astype(np.float32) for r in rows], pa.list_(pa.float32())),
    }, schema=s)


@dataclass
class CacheBatch:
    """Teacher targets aligned to token positions: entry [b, t] is the distribution for token t+1."""
    topk_ids: torch.Tensor        # [B, L, k] int64
    topk_logprobs: torch.Tensor   # [B, L, k] float32
    target_logprob: torch.Tensor  # [B, L] float32
    tail_logmass: torch.Tensor    # [B, L] float32
    mask: torch.Tensor            # [B, L] bool, True where the teacher scored the position

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]


class CacheMismatchError(RuntimeError):
    pass


class LogitCache:
    """A published cache. `batch()` returns the rows of given sequences as aligned tensors."""

    def __init__(self, directory: Path, verify: bool = True):
        self.dir = Path(directory)
        self.shards = ShardSet(self.dir, verify=verify)
        self.manifest = self.shards.manifest
        self.key = self.manifest["key"]
        self.k = self.key["top_k"]
        self.shard_size = self.manifest["shard_size"]

    @property
    def id(self) -> str:
        return self.dir.name

    def _row(self, seq_id: int):
        shard, row = divmod(int(seq_id), self.shard_size)
        if not 0 <= shard < self.shards.num_shards:
            raise KeyError(f"sequence {seq_id} is not in cache {self.id}")
        t = self.shards.table(shard)
        if t.column("seq_id")[row].as_py() != seq_id:
            raise CacheMismatchError(f"cache {self.id} shard {shard} row {row} is not sequence {seq_id}")
        return t, row

    def rows(self, seq_id: int) -> ScoredSequence:
        t, r = self._row(seq_id)
        k = self.k
        tgt = np.array(t.column("target_logprob")[r].values.to_numpy(zero_copy_only=False), np.float32)
        n = len(tgt)
        return ScoredSequence(
            seq_id=seq_id, input_ids=np.empty(0, np.int32), start=t.column("start")[r].as_py(),
            topk_ids=t.column("topk_ids")[r].values.to_numpy().astype(np.int64).reshape(n, k),
            topk_logprobs=t.column("topk_logprobs")[r].values.to_numpy(zero_copy_only=False)
            .astype(np.float32).reshape(n, k),
            target_logprob=tgt,
            tail_logmass=np.array(t.column("tail_logmass")[r].values.to_numpy(zero_copy_only=False), np.float32))

    def batch(self, seq_ids, input_ids: list | None = None, length: int | None = None) -> CacheBatch:
        """Rows for `seq_ids`, placed at their token positions in a [B, length] grid.

        Pass the batch's token ids as `input_ids` to have every row's token CRC checked against them.
        """
        rows = [self.rows(int(s)) for s in seq_ids]
        if input_ids is not None:
            for i, (r, ids) in enumerate(zip(rows, input_ids)):
                t, row = self._row(r.seq_id)
                if t.column("tokens_crc")[row].as_py() != tokens_crc(ids):
                    raise CacheMismatchError(
                        f"cache {self.id}: row for sequence {r.seq_id} was scored on different tokens than "
                        f"batch item {i}; the cache does not belong to these sequences")
        need = max(r.start + len(r.target_logprob) for r in rows)
        L = length or need
        if L < need:
            raise ValueError(f"length {L} is shorter than the cached positions ({need})")
        B, k = len(rows), self.k
        out = CacheBatch(
            topk_ids=torch.zeros(B, L, k, dtype=torch.long),
            topk_logprobs=torch.full((B, L, k), -float("inf")),
            target_logprob=torch.zeros(B, L),
            tail_logmass=torch.full((B, L), -float("inf")),
            mask=torch.zeros(B, L, dtype=torch.bool))
        for b, r in enumerate(rows):
            sl = slice(r.start, r.start + len(r.target_logprob))
            out.topk_ids[b, sl] = torch.from_numpy(r.topk_ids)
            out.topk_logprobs[b, sl] = torch.from_numpy(r.topk_logprobs)
            out.target_logprob[b, sl] = torch.from_numpy(r.target_logprob)
            out.tail_logmass[b, sl] = torch.from_numpy(r.tail_logmass)
            out.mask[b, sl] = True
        return out


class CacheRoot:
    """All caches on this machine (or shared disk) live under one root, one directory per key."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, key: dict) -> Path:
        return self.root / key_id(key)

    def find(self, key: dict) -> LogitCache | None:
        path = self.path_for(key)
        if (path / MANIFEST).exists():
            cache = LogitCache(path)
            if cache.key == key:
                return cache
        return None

    def lock(self, key: dict):
        self.root.mkdir(parents=True, exist_ok=True)
        return lock_for(self.path_for(key))

    def writer(self, key: dict, *, shard_size: int, num_sequences: int, vocab_size: int) -> "CacheWriter":
        return CacheWriter(self.path_for(key), {"format": "hpd-logit-cache", "key": key, "shard_size": shard_size,
                                                "num_sequences": num_sequences, "vocab_size": vocab_size})

    def list(self) -> list[LogitCache]:
        if not self.root.exists():
            return []
        return [LogitCache(p, verify=False) for p in sorted(self.root.iterdir())
                if p.is_dir() and (p / MANIFEST).exists()]

    def record_use(self, cache: LogitCache, run: str) -> None:
        """Remember which runs use a cache, so `gc` knows what is still referenced."""
        path = cache.dir / "users.json"
        users = atomic.read_json(path) if path.exists() else []
        if run not in users:
            atomic.write_json(path, sorted(users + [run]))


class CacheWriter(ShardWriter):
    def write_rows(self, index: int, rows: list[ScoredSequence]) -> dict:
        table = rows_table(rows, self.meta["vocab_size"])
        return self.write(index, table, tokens=int(sum(len(r.target_logprob) for r in rows)))

    def finish(self, num_shards: int, **summary) -> dict:
        tokens = sum(self.shards[i]["tokens"] for i in range(num_shards) if i in self.shards)
        return super().finish(num_shards, tokens=tokens, **summary)
