"""The teacher logit cache: one schema, one key, one directory per key under a shared cache root.

Per scored position t (the teacher's distribution for the token at t+1) a cache keeps
  - the top-k token ids and their log-probs, laid out by one of the encodings in hpd/storage/encodings.py (or, for
    the `sampled` encoding, the distinct ids drawn from the teacher with their draw counts and log-probs),
  - the exact float32 log-prob of the sequence's own next token (even when it is outside the top-k),
  - the float32 log of the probability mass outside the top-k ("tail"; -inf when k = vocabulary size);
    compact and sampled keep both as float16 (|error| <= |value| x 2**-11): at 16 entries per position the two
    float32 columns were a third of the bytes.
A row is one sequence: its seq_id, a CRC of its tokens (so a reader can prove the row belongs to the batch
it is paired with; matching rows by position alone fails silently elsewhere), the first scored position,
and list columns over its positions. Shards hold record batches of ROWS_PER_BATCH sequences, so reading one
sequence decompresses only its record batch. Encodings that renumber ids by frequency (compact, sampled) keep
their VocabOrder once per cache, in VOCAB_ORDER beside the shards, its checksum in the manifest.

Versions: the format of a cache is its key's format_version and encoding; new layouts are new encoding names,
so every older cache is read as it was written, and a reader older than an encoding names it ("unknown
encoding 'compact'") instead of misreading it.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from . import atomic, leases
from . import encodings as enc
from .cache_batch import CacheBatch, CacheMismatchError, SampledBatch, ScoredSequence, grid_batch, tokens_crc  # noqa: F401
from .fingerprint import digest, file_digest
from .shards import MANIFEST, ZSTD_LEVEL, CorruptShardError, ShardSet, ShardWriter, lock_for

FORMAT_VERSION = 3  # 3: zstd-framed shards; part of every key, so older caches are never reused
ROWS_PER_BATCH = 32
DEFAULT_ENCODING = "idsort-q8"
VOCAB_ORDER = "vocab-order.npy"
# A VocabOrder is learned from the ids of a cache's first positions, this many: enough to rank the tokens a teacher
# uses often (bench/cache_formats.py measures it against an order learned on the whole cache)
LEARN_POSITIONS = 8192


def cache_key(
    *,
    teacher: str,
    tokenizer: str,
    data: str,
    top_k: int,
    temperature: float,
    encoding: str | dict = DEFAULT_ENCODING,
    derived_from: str | None = None,
    origin: dict | None = None,
    engine: str = "transformers",
    dtype: str = "float32",
) -> dict:
    key = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "data": data,
        "top_k": int(top_k),
        "temperature": float(temperature),
        "encoding": enc.get(encoding).spec,
    }
    if derived_from:  # a repacked cache is its own thing: never mistaken for one scored at that k
        key["derived_from"] = derived_from
    if engine != "transformers":  # another engine's numbers (e.g. vLLM's kernels, its tail estimate)
        key["engine"] = engine
    if dtype != "float32":  # a teacher run in bf16 / fp16 writes other numbers than in fp32
        key["dtype"] = dtype
    if origin:  # on-policy refresh: the round and the student checkpoint that sampled the sequences
        key["origin"] = dict(origin)
    return key


def key_id(key: dict) -> str:
    return digest(key)[:20]


def _list_column(values: np.ndarray, offsets: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, typ))


def rows_table(
    rows: list[ScoredSequence], encoding: enc.Encoding, vocab_size: int, order: enc.VocabOrder | None = None
) -> pa.Table:
    n = np.array([len(r.target_logprob) for r in rows], np.int64)
    pos_off = np.concatenate([[0], np.cumsum(n)])
    k = rows[0].topk_ids.shape[1] if rows else 0
    cols = encoding.encode(
        np.concatenate([r.topk_ids for r in rows]),
        np.concatenate([r.topk_logprobs for r in rows]).astype(np.float32),
        vocab_size,
        counts=np.concatenate([r.counts for r in rows]) if encoding.sampled else None,
        order=order,
    )
    types = encoding.arrow_types(vocab_size)
    exact = np.float16 if encoding.vocab_ordered else np.float32
    if encoding.sampled:  # a variable number of entries per position: row offsets from the per-position counts
        entry_off = np.concatenate([[0], np.cumsum(cols["n"], dtype=np.int64)])[pos_off]
    table = {
        "seq_id": pa.array([r.seq_id for r in rows], pa.int64()),
        "tokens_crc": pa.array([r.tokens_crc for r in rows], pa.uint32()),
        "start": pa.array([r.start for r in rows], pa.int32()),
        "target_logprob": _list_column(
            np.concatenate([r.target_logprob for r in rows]).astype(exact), pos_off, pa.from_numpy_dtype(exact)
        ),
        "tail_logmass": _list_column(
            np.concatenate([r.tail_logmass for r in rows]).astype(exact), pos_off, pa.from_numpy_dtype(exact)
        ),
    }
    if encoding.head:  # the mass outside the head, that p_hat of the drawn tokens is a share of
        table["rest_logmass"] = _list_column(
            np.concatenate([r.rest_logmass for r in rows]).astype(exact), pos_off, pa.from_numpy_dtype(exact)
        )
    for name, per_entry in encoding.per_entry_columns(vocab_size).items():
        if per_entry and encoding.sampled:
            table[name] = _list_column(cols[name], entry_off, types[name])
            continue
        width = len(cols[name]) // max(int(pos_off[-1]), 1) if per_entry else 1
        table[name] = _list_column(cols[name], pos_off * width, types[name])
    assert k == 0 or all(r.topk_ids.shape[1] == k for r in rows)
    return pa.table(table)


@dataclass
class Decoded:
    """One record batch, decoded: positions of all its rows stacked, rows delimited by `offsets`."""

    seq_ids: np.ndarray
    starts: np.ndarray
    crcs: np.ndarray
    offsets: np.ndarray  # [R+1] into the position axis
    topk_ids: torch.Tensor  # [P, k] int64
    topk_logprobs: torch.Tensor  # [P, k] float32
    target_logprob: torch.Tensor  # [P]
    tail_logmass: torch.Tensor  # [P]
    counts: torch.Tensor | None = None  # [P, k] sampled targets' draw counts
    rest_logmass: torch.Tensor | None = None  # [P] sampled targets with a head: the mass outside it

    def row(self, r: int) -> ScoredSequence:
        """Row r as a ScoredSequence of tensor views (no copies)."""
        sl = slice(int(self.offsets[r]), int(self.offsets[r + 1]))
        return ScoredSequence(
            seq_id=int(self.seq_ids[r]),
            input_ids=None,
            start=int(self.starts[r]),
            topk_ids=self.topk_ids[sl],
            topk_logprobs=self.topk_logprobs[sl],
            target_logprob=self.target_logprob[sl],
            tail_logmass=self.tail_logmass[sl],
            crc=int(self.crcs[r]),
            counts=None if self.counts is None else self.counts[sl],
            rest_logmass=None if self.rest_logmass is None else self.rest_logmass[sl],
        )


def decode_batch(rb: pa.RecordBatch, encoding: enc.Encoding, k: int, order: enc.VocabOrder | None = None) -> Decoded:
    def flat(name):
        return rb.column(name).values.to_numpy(zero_copy_only=False)

    tgt = rb.column("target_logprob")
    offsets = tgt.offsets.to_numpy().astype(np.int64) - tgt.offsets[0].as_py()
    P = int(offsets[-1])
    cols = {name: flat(name) for name in encoding.per_entry_columns(1 << 32) if name in rb.schema.names}
    ids, lps = encoding.decode(cols, P, k, order=order)
    tail = flat("tail_logmass").astype(np.float32)
    if not encoding.logprobs:  # sampled-counts: p_hat over the drawn ids, scaled to the mass they hold
        lps += torch.from_numpy(np.log1p(-np.exp(np.minimum(tail, -1e-7))))[:, None]
    return Decoded(
        seq_ids=rb.column("seq_id").to_numpy(),
        starts=rb.column("start").to_numpy(),
        crcs=rb.column("tokens_crc").to_numpy(),
        offsets=offsets,
        topk_ids=ids,
        topk_logprobs=lps,
        target_logprob=torch.from_numpy(flat("target_logprob").astype(np.float32)),
        tail_logmass=torch.from_numpy(tail),
        counts=encoding.decode_counts(cols, P) if encoding.sampled else None,
        rest_logmass=torch.from_numpy(flat("rest_logmass").astype(np.float32)) if encoding.head else None,
    )


def round_trip(
    rows: list[ScoredSequence],
    encoding: str | dict,
    vocab_size: int,
    order: enc.VocabOrder | None = None,
    length: int | None = None,
) -> CacheBatch | SampledBatch:
    """What a cache of `rows` would hand a reader (LogitCache.batch) without writing one: the rows encoded as a
    shard holds them and decoded back onto a [B, length] grid. For measuring an encoding before choosing it."""
    code = enc.get(encoding)
    k = code.slots or rows[0].topk_ids.shape[1]
    decoded = [decode_batch(rb, code, k, order) for rb in rows_table(rows, code, vocab_size, order).to_batches()]
    return grid_batch(
        [d.row(r) for d in decoded for r in range(len(d.seq_ids))], k, length=length, draws=code.draws
    )  # (a SampledBatch's p_hat: counts / draws)


def write_vocab_order(path: Path, order: enc.VocabOrder) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(order.order, enc.id_dtype(order.vocab_size)), allow_pickle=False)
    atomic.write_bytes(path, buf.getvalue())


def read_vocab_order(path: Path, vocab_size: int) -> enc.VocabOrder:
    return enc.VocabOrder(np.load(path, allow_pickle=False), vocab_size)


class LogitCache:
    """A published cache, memory-mapped; `batch()` returns the rows of given sequences as aligned tensors."""

    def __init__(self, directory: Path, verify: bool = True, decoded_batches: int = 16):
        self.dir = Path(directory)
        self.shards = ShardSet(self.dir, verify=verify)
        self.manifest = self.shards.manifest
        self.key = self.manifest["key"]
        self.encoding = enc.get(self.key["encoding"])
        self.k = self.encoding.slots or self.key["top_k"]  # slots per position
        self.order = self._vocab_order(verify) if self.encoding.vocab_ordered else None
        self.shard_size = self.manifest["shard_size"]
        self.rows_per_batch = self.manifest["rows_per_batch"]
        self._decoded: OrderedDict = OrderedDict()
        self._capacity = decoded_batches

    def _vocab_order(self, verify: bool) -> enc.VocabOrder:
        path, entry = self.dir / VOCAB_ORDER, self.manifest.get("vocab_order") or {}
        damaged = CorruptShardError(
            f"{path} is missing or corrupt (checksum mismatch); rebuild the cache by "
            f"rerunning the stage that wrote {self.dir.name}"
        )
        if not path.is_file() or (verify and file_digest(path) != entry.get("checksum")):
            raise damaged
        try:
            return read_vocab_order(path, self.manifest["vocab_size"])
        except (ValueError, OSError, IndexError):
            raise damaged from None

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def sampled(self) -> bool:
        return self.encoding.sampled

    @property
    def bytes(self) -> int:
        """On disk: the shards and what is stored once per cache (the vocabulary order)."""
        return self.manifest["bytes"] + (self.manifest.get("vocab_order") or {}).get("bytes", 0)

    def hold(self) -> LogitCache:
        """Marks this process as a reader until it exits, so that `hpd cache gc` leaves the cache alone."""
        try:
            with lock_for(self.dir):
                if not (self.dir / MANIFEST).exists():
                    raise FileNotFoundError(
                        f"cache {self.dir} was removed (hpd cache gc?) while opening it; "
                        f"rerun the score stage to rebuild it"
                    )
                leases.take(self.dir)
        except PermissionError:
            pass  # a read-only shared cache: its owner's gc is not ours to stop; reading needs no lease
        return self

    @property
    def num_sequences(self) -> int:
        return self.manifest["rows"]

    def decoded(self, shard: int, batch: int) -> Decoded:
        key = (shard, batch)
        if key not in self._decoded:
            rb = self.shards.reader(shard).get_batch(batch)
            self._decoded[key] = decode_batch(rb, self.encoding, self.k, self.order)
            if len(self._decoded) > self._capacity:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(key)
        return self._decoded[key]

    def iter_decoded(self):
        for shard in range(self.shards.num_shards):
            for batch in range(self.shards.reader(shard).num_record_batches):
                yield decode_batch(self.shards.reader(shard).get_batch(batch), self.encoding, self.k, self.order)

    def _locate(self, seq_id: int) -> tuple[Decoded, int]:
        shard, row = divmod(int(seq_id), self.shard_size)
        if not (0 <= shard < self.shards.num_shards and 0 <= seq_id < self.num_sequences):
            raise KeyError(f"sequence {seq_id} is not in cache {self.id}")
        batch, r = divmod(row, self.rows_per_batch)
        d = self.decoded(shard, batch)
        if d.seq_ids[r] != seq_id:
            raise CacheMismatchError(f"cache {self.id} shard {shard} row {row} is not sequence {seq_id}")
        return d, r

    def rows(self, seq_id: int) -> ScoredSequence:
        """One sequence's rows, as numpy arrays."""
        d, r = self._locate(seq_id)
        row = d.row(r)
        return dataclasses.replace(
            row,
            input_ids=np.empty(0, np.int32),
            **{
                f: getattr(row, f).numpy()
                for f in ("topk_ids", "topk_logprobs", "target_logprob", "tail_logmass", "counts", "rest_logmass")
                if getattr(row, f) is not None
            },
        )

    def batch(self, seq_ids, input_ids: list | None = None, length: int | None = None) -> CacheBatch | SampledBatch:
        """Rows for `seq_ids`, placed at their token positions in a [B, length] grid (a SampledBatch for sampled
        targets).

        Pass the batch's token ids as `input_ids` to have every row's token CRC checked against them.
        """
        rows = [d.row(r) for d, r in (self._locate(s) for s in seq_ids)]
        return grid_batch(rows, self.k, input_ids=input_ids, length=length, cache_id=self.id, draws=self.encoding.draws)


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

    def writer(
        self,
        key: dict,
        *,
        shard_size: int,
        num_sequences: int,
        vocab_size: int,
        provenance: dict | None = None,
        rank: int = 0,
        zstd_level: int = ZSTD_LEVEL,
        learn_order: Callable[[], np.ndarray] | None = None,
    ) -> CacheWriter:
        """`learn_order()` gives the ids whose frequencies make the cache's VocabOrder (encodings that renumber
        ids): called once, by rank 0, when no order was stored by an earlier attempt; the other ranks read it."""
        return CacheWriter(
            self.path_for(key),
            {
                "format": "hpd-logit-cache",
                "key": key,
                "shard_size": shard_size,
                "rows_per_batch": ROWS_PER_BATCH,
                "num_sequences": num_sequences,
                "vocab_size": vocab_size,
                "provenance": provenance or {},
            },
            rank,
            zstd_level,
            learn_order,
        )

    def open(self, cache_id: str) -> LogitCache:
        matches = [p for p in self.published_dirs() if p.name.startswith(cache_id)] if cache_id else []
        if len(matches) != 1:
            what = "no cache" if not matches else f"{len(matches)} caches"
            raise KeyError(f"{what} under {self.root} with an id starting {cache_id!r}; `hpd cache ls` lists them")
        return LogitCache(matches[0], verify=False)

    def published_dirs(self) -> list[Path]:
        if not self.root.exists():
            return []
        return [p for p in sorted(self.root.iterdir()) if p.is_dir() and (p / MANIFEST).exists()]

    def list(self) -> list[LogitCache]:
        return [LogitCache(p, verify=False) for p in self.published_dirs()]

    def record_use(self, cache: LogitCache, run: str) -> None:
        """Remember which runs use a cache and when it was last used."""
        path = cache.dir / "users.json"
        users = atomic.read_json(path) if path.exists() else {}
        if isinstance(users, list):
            users = {u: 0 for u in users}
        users[run] = time.time()
        atomic.write_json(path, users)


def users(cache: LogitCache) -> dict[str, float]:
    path = cache.dir / "users.json"
    return atomic.read_json(path) if path.exists() else {}


class CacheWriter(ShardWriter):
    def __init__(
        self,
        final_dir: Path,
        meta: dict,
        rank: int = 0,
        zstd_level: int = ZSTD_LEVEL,
        learn_order: Callable[[], np.ndarray] | None = None,
    ):
        super().__init__(final_dir, meta, rank, zstd_level)
        self.order = None
        if self.encoding.vocab_ordered:
            path = self.tmp_dir / VOCAB_ORDER  # cleared with the rest of tmp_dir when the settings changed
            if rank == 0 and not path.is_file():
                if learn_order is None:
                    raise ValueError(
                        f"encoding {self.encoding.name} renumbers ids by frequency: give the writer "
                        f"the ids to learn the order from (learn_order)"
                    )
                write_vocab_order(path, enc.VocabOrder.learn(learn_order(), meta["vocab_size"]))
            self.order = read_vocab_order(path, meta["vocab_size"])

    @property
    def encoding(self) -> enc.Encoding:
        return enc.get(self.meta["key"]["encoding"])

    def write_rows(self, index: int, rows: list[ScoredSequence]) -> dict:
        table = rows_table(rows, self.encoding, self.meta["vocab_size"], self.order)
        return self.write(
            index,
            table,
            rows_per_batch=self.meta["rows_per_batch"],
            tokens=int(sum(len(r.target_logprob) for r in rows)),
        )

    def finish(self, num_shards: int, **summary) -> dict:
        tokens = sum(self.shards[i]["tokens"] for i in range(num_shards) if i in self.shards)
        if self.order is not None:
            path = self.tmp_dir / VOCAB_ORDER
            summary["vocab_order"] = {
                "file": VOCAB_ORDER,
                "checksum": file_digest(path),
                "bytes": path.stat().st_size,
                "tokens": len(self.order.order),
            }
        return super().finish(num_shards, tokens=tokens, **summary)
