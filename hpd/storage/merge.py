"""Teacher ensembles: targets that are a weighted mixture of several teachers' caches of the same sequences.

Per scored position, teachers i = 1..T with weights w_i (summing to 1) each give their top-k ids and log-probs,
the exact log-prob of the sequence's own next token, and their tail (the mass outside their top-k). The mixture
p(v) = sum_i w_i p_i(v) is formed over the union of the teachers' top-k ids:
  - where teacher i listed v, its own p_i(v);
  - where it did not, v lies in teacher i's tail, and gets that tail shared out evenly over the V - k_i tokens
    outside its top-k. (The losses share a tail out in proportion to the student's distribution; a merge has no
    student, and an even share is that estimate for a student that knows nothing.) The error of a mixed value is
    therefore at most sum over the teachers that did not list v of w_i T_i;
  - the sequence's own token mixes exactly: log sum_i w_i exp(target_i), every teacher stores it exactly;
  - the merged top-k are the k largest mixed values, and the tail is what remains of the mixture:
    sum_i w_i (T_i + teacher i's listed mass not kept - the even shares of kept tokens it did not list).
With k = the vocabulary every teacher lists every token, and the merge is the exact mixture.

Weighting "fixed" uses w_i as given. "confidence" reweights each position: w_i exp(-H_i), renormalised, where H_i
is teacher i's entropy there (its top-k plus its tail shared out evenly): a teacher sure of the next token
counts more at that token, one unsure counts less.

`merge` publishes a mixture as a cache of its own (keyed with `derived_from`, like a repack), so any method trains
from it unchanged; `MixedCache` reads the same mixture batch by batch without writing one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import encodings as enc
from .fingerprint import digest
from .logit_cache import (
    CacheBatch,
    CacheMismatchError,
    CacheRoot,
    LogitCache,
    ScoredSequence,
    cache_key,
    grid_batch,
    key_id,
)

WEIGHTINGS = ("fixed", "confidence")
CHUNK = 1024  # positions mixed at once: the candidate x top-k comparison is [CHUNK, sum of k, k] booleans


def _entropy(p: torch.Tensor, tail: torch.Tensor, outside: int) -> torch.Tensor:
    """Entropy [n] of listed probabilities p [n, k] plus a tail [n] shared evenly over `outside` tokens."""
    listed = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    spread = torch.where(tail > 0, -tail * (tail / outside).log(), torch.zeros_like(tail)) if outside else 0.0
    return listed + spread


def mix_positions(teachers: list[tuple], weights, vocab_size: int, k: int, weighting: str = "fixed"):
    """The mixture of T teachers at n positions. `teachers`: per teacher (ids [n, k_i] int, log-probs [n, k_i],
    tail log-mass [n], target log-prob [n]); `weights`: [T], or [T, n] where a teacher's weight differs by position
    (0 where it has nothing to say: across tokenizers, a position it is not aligned to; every position needs one
    teacher with weight > 0). Returns the merged (ids [n, k] by descending probability, log-probs [n, k] float32,
    tail log-mass [n] float32, target log-prob [n] float32). Arithmetic in float64."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if not 1 <= k <= max(t[0].shape[1] for t in teachers):
        raise ValueError(f"merged k={k} must be between 1 and the largest k of the merged caches")
    ids = [torch.as_tensor(t[0], dtype=torch.long) for t in teachers]
    p = [torch.as_tensor(t[1], dtype=torch.float64).exp() for t in teachers]
    tail = [torch.as_tensor(t[2], dtype=torch.float64).exp() for t in teachers]
    target = torch.stack([torch.as_tensor(t[3], dtype=torch.float64) for t in teachers])  # [T, n]
    outside = [vocab_size - x.shape[1] for x in ids]
    even = [tl / o if o else torch.zeros_like(tl) for tl, o in zip(tail, outside)]  # per unlisted token
    w = torch.as_tensor(np.asarray(weights, np.float64))
    w = (w if w.dim() == 2 else w[:, None]).expand(len(teachers), len(target[0])).clone()
    if weighting == "confidence":
        h = torch.stack([_entropy(pi, ti, o) for pi, ti, o in zip(p, tail, outside)])
        w = w * torch.exp(-(h - h.min(0).values))  # shifted for range; renormalised below
    w = w / w.sum(0)
    n = len(target[0])
    out_ids = torch.empty(n, k, dtype=torch.long)
    out_lp = torch.empty(n, k, dtype=torch.float64)
    out_tail = torch.empty(n, dtype=torch.float64)
    for lo in range(0, n, CHUNK):
        sl = slice(lo, min(lo + CHUNK, n))
        cand = torch.cat([x[sl] for x in ids], 1)  # [m, sum k_i], ids repeated where teachers agree
        # a teacher without weight at a position lists nothing there: its columns become distinct non-ids
        silent = torch.cat([(w[i, sl] == 0)[:, None].expand(-1, x.shape[1]) for i, x in enumerate(ids)], 1)
        cand = torch.where(silent, -1 - torch.arange(cand.shape[1]).expand_as(cand), cand)
        first = torch.ones_like(cand, dtype=torch.bool)  # keep each id once: its first column
        srt, order = cand.sort(dim=1, stable=True)
        dup = torch.zeros_like(first)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        first.scatter_(1, order, ~dup)
        mixed = torch.zeros(cand.shape, dtype=torch.float64)
        listed_by = []
        for i in range(len(teachers)):
            hit = cand[:, :, None] == ids[i][sl][:, None, :]  # [m, C, k_i]
            listed = hit.any(-1)
            value = torch.where(listed, (hit * p[i][sl][:, None, :]).sum(-1), even[i][sl][:, None])
            mixed += w[i, sl][:, None] * value
            listed_by.append(listed)
        mixed = torch.where(first & ~silent, mixed, torch.full_like(mixed, -1.0))  # duplicates never chosen
        top, pos = mixed.topk(k, dim=1)
        # fewer than k distinct candidates (a bridged position whose mass fell on a few student tokens): the
        # columns past them repeat the first kept id with no mass, and count for nothing below
        real = top >= 0
        chosen = cand.gather(1, pos)
        out_ids[sl], out_lp[sl] = torch.where(real, chosen, chosen[:, :1]), top.clamp_min(0.0).log()
        rest = torch.zeros(sl.stop - sl.start, dtype=torch.float64)
        for i in range(len(teachers)):
            kept_listed = listed_by[i].gather(1, pos)  # kept tokens teacher i listed
            kept = (ids[i][sl][:, :, None] == out_ids[sl][:, None, :]) & real[:, None, :]
            rest += w[i, sl] * (
                tail[i][sl]
                + p[i][sl].sum(1)
                - (p[i][sl][:, :, None] * kept).sum((1, 2))
                - (~kept_listed & real).sum(1) * even[i][sl]
            )
        out_tail[sl] = rest.clamp_min(0.0).log()
    mixed_target = torch.logsumexp(target + w.log(), 0)
    return out_ids, out_lp.float(), out_tail.float(), mixed_target.float()


def _check(caches: list[LogitCache], weights, k: int, weighting: str, encoding=None) -> None:
    """Everything a merge needs, checked before anything is written."""
    if len(caches) < 2:
        raise ValueError("a merge needs at least two caches")
    ids = [c.id for c in caches]
    twice = next((i for i in ids if ids.count(i) > 1), None)
    if twice:
        raise ValueError(
            f"cache {twice} is named twice; a merge mixes different teachers' caches (to weight one "
            f"teacher more, give it a larger --weights entry)"
        )
    sampled = [c.id for c in caches if c.sampled]
    if sampled:
        raise ValueError(
            f"cache {sampled[0]} holds sampled targets: a mixture of teachers needs each teacher's top-k "
            f"and tail (draws from different teachers do not mix into draws from the mixture); score "
            f"every teacher with a top-k encoding"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if not 1 <= k <= max(c.k for c in caches):
        raise ValueError(
            f"merged k={k} must be between 1 and the largest k of the merged caches ({max(c.k for c in caches)})"
        )
    if len(weights) != len(caches) or not all(math.isfinite(x) and x >= 0 for x in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {list(weights)} must be one non-negative number per cache, summing to more than 0")
    if encoding is not None:
        out = enc.get(encoding)
        if out.sampled:
            raise ValueError(
                f"a merge writes the mixture's top-k; encoding {out.label} holds draws, which the "
                f"teachers' top-k cannot give; use a top-k encoding (compact, idsort-q8, rank-q8, fp16)"
            )
        if k < 2 and out.name != "fp16":
            raise ValueError(f"encoding {out.name} needs k >= 2; use encoding fp16 for k=1")
    first = caches[0]
    for c in caches[1:]:
        if c.key["tokenizer"] != first.key["tokenizer"]:
            raise ValueError(
                f"caches {first.id} and {c.id} come from teachers with different tokenizers; a merge "
                f"mixes distributions over one vocabulary"
            )
        if c.key["data"] != first.key["data"] or c.num_sequences != first.num_sequences:
            raise ValueError(
                f"caches {first.id} and {c.id} were scored on different sequences; score the same "
                f"sequences with every teacher (an ensemble) or train on both caches (routing)"
            )
        if c.key["temperature"] != first.key["temperature"]:
            raise ValueError(f"caches {first.id} and {c.id} were scored at different temperatures")
        if c.manifest["vocab_size"] != first.manifest["vocab_size"]:
            raise ValueError(f"caches {first.id} and {c.id} have different vocabulary sizes")


def _mixed_rows(caches: list[LogitCache], weights, seq_ids, k: int, weighting: str) -> list[ScoredSequence]:
    rows = [[c.rows(s) for s in seq_ids] for c in caches]
    for c, rs in zip(caches[1:], rows[1:]):
        for a, b in zip(rows[0], rs):
            if a.crc != b.crc or a.start != b.start or len(a.target_logprob) != len(b.target_logprob):
                raise CacheMismatchError(f"caches {caches[0].id} and {c.id} disagree on sequence {a.seq_id}'s tokens")
    cat = [
        tuple(
            np.concatenate([getattr(r, f) for r in rs])
            for f in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob")
        )
        for rs in rows
    ]
    ids, lp, tail, target = mix_positions(cat, weights, caches[0].manifest["vocab_size"], k, weighting)
    out, at = [], 0
    for r in rows[0]:
        sl = slice(at, at + len(r.target_logprob))
        out.append(
            ScoredSequence(
                seq_id=r.seq_id,
                input_ids=None,
                crc=r.crc,
                start=r.start,
                topk_ids=ids[sl].numpy(),
                topk_logprobs=lp[sl].numpy(),
                tail_logmass=tail[sl].numpy(),
                target_logprob=target[sl].numpy(),
            )
        )
        at = sl.stop
    return out


def merged_key(caches: list[LogitCache], weights, k: int, encoding, weighting: str) -> dict:
    total = float(sum(weights))
    first = caches[0].key
    return cache_key(
        teacher=digest([c.key["teacher"] for c in caches]),
        tokenizer=first["tokenizer"],
        data=first["data"],
        top_k=k,
        temperature=first["temperature"],
        encoding=encoding,
        derived_from={"merge": [c.id for c in caches], "weights": [w / total for w in weights], "weighting": weighting},
    )


def merge(
    caches: list[LogitCache], weights, root: CacheRoot, k: int, encoding=None, weighting: str = "fixed"
) -> LogitCache:
    """Publish the mixture of `caches` (the same sequences scored by several teachers) as a cache at `k`.
    Resumable shard by shard like any cache; a merge asked for again is found, not redone."""
    encoding = encoding or caches[0].key["encoding"]
    _check(caches, weights, k, weighting, encoding)
    key = merged_key(caches, weights, k, encoding, weighting)
    with root.lock(key):
        found = root.find(key)
        if found is not None:
            return found
        first = caches[0]
        size = first.shard_size
        writer = root.writer(
            key,
            shard_size=size,
            num_sequences=first.num_sequences,
            vocab_size=first.manifest["vocab_size"],
            provenance={"merged_from": [c.id for c in caches], "weights": list(weights), "weighting": weighting},
            learn_order=lambda: np.concatenate(
                [r.topk_ids for r in _mixed_rows(caches, weights, range(min(first.num_sequences, 256)), k, weighting)]
            ),
        )
        num_shards = -(-first.num_sequences // size)
        for shard in range(num_shards):  # a cache's row i is sequence i
            if not writer.done(shard):
                seq_ids = range(shard * size, min((shard + 1) * size, first.num_sequences))
                writer.write_rows(shard, _mixed_rows(caches, weights, seq_ids, k, weighting))
        writer.finish(num_shards)
    return LogitCache(root.path_for(key))


class MixedCache:
    """The mixture of several caches, read batch by batch without writing a cache: what `LogitCache` offers a
    trainer (`k`, `id`, `key`, `num_sequences`, `hold`, `batch`)."""

    def __init__(self, caches: list[LogitCache], weights, k: int, weighting: str = "fixed"):
        _check(caches, weights, k, weighting)
        self.caches, self.weights, self.k, self.weighting = caches, list(weights), k, weighting
        self.key = merged_key(caches, weights, k, caches[0].key["encoding"], weighting)
        self.num_sequences = caches[0].num_sequences

    sampled = False  # (_check refuses sampled caches)

    @property
    def id(self) -> str:
        return "mix-" + key_id(self.key)

    def hold(self) -> MixedCache:
        for c in self.caches:
            c.hold()
        return self

    def batch(self, seq_ids, input_ids: list | None = None, length: int | None = None) -> CacheBatch:
        rows = _mixed_rows(self.caches, self.weights, list(seq_ids), self.k, self.weighting)
        return grid_batch(rows, self.k, input_ids=input_ids, length=length, cache_id=self.id)
