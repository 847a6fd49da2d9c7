"""A directory of Arrow IPC shards, published one shard at a time and then as a whole.

A shard is an Arrow IPC file with one row per record batch of the data: the batch serialised as Arrow IPC
and compressed as one zstd frame (the `zstandard` package). Measured against Arrow's own per-buffer IPC
compression (bench/cache_formats.py), one frame per batch reads about twice as fast at the same size,
because every small buffer no longer pays for a decompression context of its own. The data's schema rides
in the file's schema metadata; `ShardSet.reader(i)` gives the record batches back.

Layout while being built:   <parent>/.tmp-<name>/journal.json + shard-00000.arrow ...
Layout once published:      <parent>/<name>/manifest.json     + shard-00000.arrow ...

The journal lists every shard that was fully written (rows, bytes, checksum), so an interrupted writer
resumes after its last published shard. Only `finish()` writes manifest.json and renames the directory,
so a reader never mistakes a partial set for finished work.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import zstandard
from filelock import FileLock

from hpd.common.faults import crash_point, disk_full_point

from . import atomic
from .fingerprint import digest, file_digest

MANIFEST = "manifest.json"
ZSTD_LEVEL = 9  # bench/cache_formats.py: ~8% smaller than level 1; level 19 saves 3% more, writes far slower
JOURNAL = "journal.json"
_FRAME_SCHEMA_KEY = b"hpd.schema"


class FramedShard:
    """Reads a shard: record batch i is decompressed from its zstd frame on demand, zero-copy from the map."""

    def __init__(self, path: Path):
        outer = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        meta = outer.schema.metadata or {}
        if _FRAME_SCHEMA_KEY not in meta:
            raise CorruptShardError(
                f"shard {path} was written in an older layout; rebuild it by rerunning the stage that wrote it"
            )
        self.schema = pa.ipc.read_schema(pa.py_buffer(meta[_FRAME_SCHEMA_KEY]))
        self._frames = outer.read_all().column("frame").combine_chunks()
        self._dctx = zstandard.ZstdDecompressor()

    @property
    def num_record_batches(self) -> int:
        return len(self._frames)

    def get_batch(self, i: int) -> pa.RecordBatch:
        raw = self._dctx.decompress(self._frames[i].as_buffer())
        return pa.ipc.read_record_batch(pa.py_buffer(raw), self.schema)

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches([self.get_batch(i) for i in range(self.num_record_batches)], self.schema)


def write_framed(path: Path, table: pa.Table, rows_per_batch: int | None, zstd_level: int = ZSTD_LEVEL) -> None:
    cctx = zstandard.ZstdCompressor(level=zstd_level)
    frames = [cctx.compress(rb.serialize().to_pybytes()) for rb in table.to_batches(max_chunksize=rows_per_batch)]
    outer = pa.table({"frame": pa.array(frames, pa.large_binary())}).replace_schema_metadata(
        {_FRAME_SCHEMA_KEY: table.schema.serialize().to_pybytes()}
    )
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, outer.schema) as writer:
            writer.write_table(outer)


class CorruptShardError(RuntimeError):
    pass


SEAL = "manifest_checksum"


def seal(manifest: dict) -> str:
    """Checksum of a manifest's content: shard checksums catch damaged data, this catches an edited index."""
    return digest({k: v for k, v in manifest.items() if k != SEAL})


def read_manifest(directory: Path) -> dict:
    """A published manifest, checked against its seal; CorruptShardError naming the file otherwise."""
    path = Path(directory) / MANIFEST
    fix = f"rebuild it by rerunning the stage that wrote {Path(directory).name}"
    try:
        manifest = atomic.read_json(path)
    except (ValueError, UnicodeDecodeError):
        raise CorruptShardError(f"manifest {path} is not valid JSON; {fix}") from None
    if not isinstance(manifest, dict) or manifest.get(SEAL) != seal(manifest):
        raise CorruptShardError(
            f"manifest {path} was edited or damaged (its checksum does not match its content); {fix}"
        )
    return manifest


def is_published(directory: Path, fmt: str) -> bool:
    """A finished shard set of format `fmt` is at `directory` (what a stage's published() asks)."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return atomic.read_json(manifest).get("format") == fmt
    except (ValueError, AttributeError):
        return True  # published but damaged: opening it names the file (read_manifest)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def lock_for(final_dir: Path) -> FileLock:
    """One writer per shard set: a second run asking for the same set waits, then finds it published."""
    return FileLock(str(final_dir.parent / f".{final_dir.name}.lock"))


class ShardWriter:
    """Writes a shard set into a hidden directory and publishes it whole. Under torchrun several processes
    (ranks) write one set: each writes the shards it was given and keeps its own journal, rank 0 (which
    opens the writer first, alone, and may clear leftovers of other settings) publishes once every rank is
    done. A resumed set finishes with any number of ranks: the shards already written are kept."""

    def __init__(self, final_dir: Path, meta: dict, rank: int = 0, zstd_level: int = ZSTD_LEVEL):
        # zstd_level is not part of meta: any level reads back the same, so a resumed set may mix them
        self.final_dir, self.zstd_level = Path(final_dir), zstd_level
        self.tmp_dir = self.final_dir.parent / f".tmp-{self.final_dir.name}"
        self.meta, self.rank = meta, rank
        self.shards: dict[int, dict] = {}
        if rank == 0 and any(meta != atomic.read_json(j).get("meta") for j in self._journals()):
            shutil.rmtree(self.tmp_dir)  # left over from different settings: nothing in it can be trusted
        self._load()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._save_journal()
        self.started = time.time()

    def _journals(self) -> list[Path]:
        return sorted(self.tmp_dir.glob("journal*.json")) if self.tmp_dir.is_dir() else []

    def _load(self) -> None:
        """Every rank's journal: what was written, by this process or another, before a crash or now."""
        for j in self._journals():
            state = atomic.read_json(j)
            if state.get("meta") == self.meta:
                self.shards.update({int(i): s for i, s in state["shards"].items() if self._intact(s)})

    def _intact(self, shard: dict) -> bool:
        path = self.tmp_dir / shard["file"]
        return path.exists() and file_digest(path) == shard["checksum"]

    def _save_journal(self) -> None:
        name = JOURNAL if self.rank == 0 else f"journal-rank{self.rank}.json"
        atomic.write_json(self.tmp_dir / name, {"meta": self.meta, "shards": self.shards})

    def done(self, index: int) -> bool:
        return index in self.shards

    def write(self, index: int, table: pa.Table, rows_per_batch: int | None = None, **stats) -> dict:
        name = shard_name(index)
        part = self.tmp_dir / f".{name}.tmp"
        write_framed(part, table, rows_per_batch, self.zstd_level)
        disk_full_point("shard", part)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        part.replace(self.tmp_dir / name)
        entry = {
            "file": name,
            "rows": table.num_rows,
            "bytes": (self.tmp_dir / name).stat().st_size,
            "checksum": file_digest(self.tmp_dir / name),
            **stats,
        }
        self.shards[index] = entry
        self._save_journal()
        crash_point("shard")
        return entry

    def finish(self, num_shards: int, **summary) -> dict:
        self._load()  # the shards other ranks wrote
        missing = [i for i in range(num_shards) if i not in self.shards]
        if missing:
            raise RuntimeError(f"cannot publish {self.final_dir.name}: shards {missing[:5]} were never written")
        shards = [self.shards[i] for i in range(num_shards)]
        manifest = {
            **self.meta,
            **summary,
            "shards": shards,
            "rows": sum(s["rows"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "published_at": time.time(),
        }
        manifest[SEAL] = seal(manifest)
        atomic.write_json(self.tmp_dir / MANIFEST, manifest)
        for j in self._journals():
            j.unlink()
        atomic.publish_dir(self.tmp_dir, self.final_dir)
        return manifest


class ShardSet:
    """A published shard set. Every shard's checksum is checked the first time it is opened."""

    def __init__(self, directory: Path, verify: bool = True):
        self.dir = Path(directory)
        if not (self.dir / MANIFEST).exists():
            raise FileNotFoundError(f"{self.dir} is not a published shard set (no {MANIFEST})")
        self.manifest = read_manifest(self.dir)
        self.verify = verify
        self._readers: dict[int, FramedShard] = {}

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def check(self, index: int) -> None:
        entry = self.manifest["shards"][index]
        path = self.dir / entry["file"]
        if not path.exists() or file_digest(path) != entry["checksum"]:
            raise CorruptShardError(
                f"shard {path} is missing or corrupt (checksum mismatch); rebuild it by rerunning the stage "
                f"that wrote {self.dir.name}"
            )

    def reader(self, index: int) -> FramedShard:
        """The shard's memory-mapped reader; its checksum is checked on first open."""
        if index not in self._readers:
            if self.verify:
                self.check(index)
            self._readers[index] = FramedShard(self.dir / self.manifest["shards"][index]["file"])
        return self._readers[index]

    def table(self, index: int) -> pa.Table:
        """The whole shard, decoded (not kept: callers that reread hold their own bounded cache)."""
        return self.reader(index).read_all()
