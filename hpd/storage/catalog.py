"""The catalog of caches under a cache root: listing, verification, repacking and garbage collection."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from filelock import Timeout

from . import encodings as enc
from . import leases
from .logit_cache import LEARN_POSITIONS, CacheRoot, LogitCache, ScoredSequence, key_id, users
from .shards import MANIFEST, CorruptShardError, lock_for


def describe(cache: LogitCache) -> dict:
    m, key = cache.manifest, cache.key
    prov = m.get("provenance", {})
    used = users(cache)
    return {
        "id": cache.id,
        "key": key_id(key),
        "teacher": prov.get("teacher", key["teacher"][:12]),
        "data": prov.get("sequences_source") or prov.get("sequences") or key["data"][:12],
        "k": key["top_k"],
        "encoding": enc.get(key["encoding"]).spec,
        "temperature": key["temperature"],
        "sequences": m["rows"],
        "tokens": m["tokens"],
        "bytes": cache.bytes,
        "bytes_per_token": round(cache.bytes / max(m["tokens"], 1), 2),
        "shards": len(m["shards"]),
        "created": m.get("published_at"),
        "last_used": max(used.values(), default=m.get("published_at")),
        "runs": sorted(used),
        "derived_from": key.get("derived_from"),
        "origin": key.get("origin"),
        "path": str(cache.dir),
    }


def verify(directory: Path) -> list[str]:
    """The manifest's seal and every shard's checksum; the messages for what is bad (empty when intact)."""
    try:
        cache = LogitCache(directory, verify=False)
    except CorruptShardError as e:
        return [str(e)]  # without a trustworthy manifest the shards cannot be checked against anything
    bad = []
    if cache.encoding.vocab_ordered:
        try:
            cache._vocab_order(verify=True)
        except CorruptShardError as e:
            bad.append(str(e))
    for i in range(cache.shards.num_shards):
        try:
            cache.shards.check(i)
        except CorruptShardError as e:
            bad.append(str(e))
    return bad


def repack(cache: LogitCache, root: CacheRoot, k: int, encoding: str | dict | None = None) -> LogitCache:
    """A cache with a smaller k (and/or another encoding) derived from `cache` without the teacher.

    The dropped entries' mass joins the tail. Rank-ordered encodings keep their exact rank order, so the
    new top-k is the prefix; id-ordered ones are re-ranked by their stored (quantised) log-probs. Sampled targets
    are neither made nor remade here: a top-k cache keeps no shape of its tail, so draws from it would only ever
    pick top-k tokens (a biased sample), and a sampled cache holds no top-k.
    """
    encoding = enc.get(encoding or cache.key["encoding"])
    if cache.sampled or encoding.sampled:
        raise ValueError(
            f"cache {cache.id} is {'sampled targets' if cache.sampled else 'a top-k cache'}: sampled "
            f"targets cannot be derived without the teacher (a top-k cache has no tail shape to "
            f'draw from); rescore with score.encoding="sampled:N"'
        )
    if not 1 <= k <= cache.k:
        raise ValueError(f"repack k={k} must be between 1 and the cache's k ({cache.k})")
    if k < 2 and encoding.name != "fp16":
        raise ValueError(f"encoding {encoding.name} needs k >= 2; use --encoding fp16 for k=1")
    key = {**cache.key, "top_k": k, "encoding": encoding.spec, "derived_from": cache.id}
    with root.lock(key):
        found = root.find(key)
        if found is not None:
            return found
        writer = root.writer(
            key,
            shard_size=cache.shard_size,
            num_sequences=cache.num_sequences,
            vocab_size=cache.manifest["vocab_size"],
            provenance={**cache.manifest.get("provenance", {}), "repacked_from": cache.id},
            learn_order=lambda: _first_ids(cache, k),
        )
        ranked = cache.encoding.name in ("fp16", "rank-q8")
        for shard in range(cache.shards.num_shards):
            if writer.done(shard):
                continue
            rows = []
            for b in range(cache.shards.reader(shard).num_record_batches):
                d = cache.decoded(shard, b)
                lps, ids = d.topk_logprobs, d.topk_ids
                if not ranked:
                    lps, order = lps.sort(dim=1, descending=True, stable=True)
                    ids = ids.gather(1, order)
                dropped = torch.logsumexp(lps[:, k:].double(), dim=1).float() if k < cache.k else None
                tail = d.tail_logmass if dropped is None else torch.logaddexp(d.tail_logmass, dropped)
                for r in range(len(d.seq_ids)):
                    sl = slice(d.offsets[r], d.offsets[r + 1])
                    rows.append(
                        ScoredSequence(
                            seq_id=int(d.seq_ids[r]),
                            input_ids=None,
                            crc=int(d.crcs[r]),
                            start=int(d.starts[r]),
                            topk_ids=ids[sl, :k].numpy(),
                            topk_logprobs=lps[sl, :k].numpy(),
                            target_logprob=d.target_logprob[sl].numpy(),
                            tail_logmass=tail[sl].numpy(),
                        )
                    )
            writer.write_rows(shard, rows)
        writer.finish(cache.shards.num_shards)
    return LogitCache(root.path_for(key))


def _first_ids(cache: LogitCache, k: int, positions: int = LEARN_POSITIONS) -> np.ndarray:
    """The top-k ids of the cache's first positions: what a repacked cache learns its VocabOrder from."""
    out, seen = [], 0
    for d in cache.iter_decoded():
        lps, order = d.topk_logprobs.sort(dim=1, descending=True, stable=True)
        out.append(d.topk_ids.gather(1, order)[:, :k].numpy())
        seen += len(out[-1])
        if seen >= positions:
            break
    return np.concatenate(out)


def gc(root: CacheRoot, referenced: set[str], dry_run: bool = False) -> list[tuple[Path, str]]:
    """Remove temporaries no writer holds and published caches no run references and no process reads;
    returns what (and why). Each decision is taken, and a cache moved aside, under that cache's lock, so a
    reader that registers at the same moment either keeps the cache or finds it gone, never half-removed."""
    doomed: list[tuple[Path, str]] = []
    if not root.root.exists():
        return doomed
    for p in sorted(root.root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith((".tmp-", ".old-")):
            final, why = p.with_name(p.name.split("-", 1)[1]), "unfinished temporary"
        elif (p / MANIFEST).exists() and p.name not in referenced:
            final, why = p, "no run references it"
        else:
            continue
        try:  # a live writer holds the lock: its temporary is work in progress, not garbage
            with lock_for(final).acquire(timeout=0):
                if final == p and leases.live(p):
                    continue  # an experiment is training from it right now
                doomed.append((p, why))
                if not dry_run and final == p:
                    aside = p.with_name(f".old-{p.name}")
                    os.replace(p, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                elif not dry_run:
                    shutil.rmtree(p, ignore_errors=True)
        except Timeout:
            continue
        if not dry_run and final == p:
            (p.parent / f".{p.name}.lock").unlink(missing_ok=True)
    return doomed


def age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"
