"""What a cache reader hands a student: teacher targets as tensors, aligned to token positions (torch and numpy
only; the on-disk format is hpd/storage/logit_cache.py's). `ScoredSequence` is one sequence's scored positions,
`CacheBatch` a batch of them on a [B, L] grid, `grid_batch` places the one into the other."""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import torch


def tokens_crc(ids) -> int:
    return zlib.crc32(np.asarray(ids, dtype=np.int32).tobytes())


@dataclass
class ScoredSequence:
    seq_id: int
    input_ids: np.ndarray
    start: int
    topk_ids: np.ndarray  # [n, k], sorted by log-prob, descending
    topk_logprobs: np.ndarray  # [n, k]
    target_logprob: np.ndarray  # [n]
    tail_logmass: np.ndarray  # [n]
    crc: int | None = None  # of input_ids; given directly when the tokens are not at hand (repack)
    counts: np.ndarray | None = (
        None  # [n, S] sampled targets: draws of each slot (0: the head, or empty); None for top-k
    )
    rest_logmass: np.ndarray | None = None  # [n] sampled targets with a head: log of the mass outside it

    @property
    def tokens_crc(self) -> int:
        return self.crc if self.crc is not None else tokens_crc(self.input_ids)


class _Batch:
    """A dataclass of [B, L, ...] tensors: rows selected and moved together."""

    def _map(self, fn):
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def select(self, rows):
        """The batch rows `rows` (a boolean mask or indices over the first dimension)."""
        return self._map(lambda t: t[rows])

    def to(self, device, non_blocking: bool = False):
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    @staticmethod
    def stack(parts: list[tuple[list[int], _Batch]], batch_size: int) -> _Batch:
        """One [batch_size, L] batch from parts that each fill the rows they name (a mixture's sources)."""
        if len(parts) == 1 and len(parts[0][0]) == batch_size:
            return parts[0][1]
        first = parts[0][1]
        out = first._map(lambda t: torch.zeros((batch_size, *t.shape[1:]), dtype=t.dtype))
        for rows, part in parts:
            for f in dataclasses.fields(out):
                getattr(out, f.name)[rows] = getattr(part, f.name)
        return out


@dataclass
class CacheBatch(_Batch):
    """Teacher targets aligned to token positions: entry [b, t] is the distribution for token t+1."""

    topk_ids: torch.Tensor  # [B, L, k] int64
    topk_logprobs: torch.Tensor  # [B, L, k] float32
    target_logprob: torch.Tensor  # [B, L] float32
    tail_logmass: torch.Tensor  # [B, L] float32
    mask: torch.Tensor  # [B, L] bool, True where the teacher scored the position

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]


@dataclass
class SampledBatch(_Batch):
    """Sampled teacher targets (random-sampling KD): per position, S slots of distinct tokens: the teacher's most
    probable ones when the cache keeps a head (p_hat = p), then tokens drawn from the teacher (outside the head), each
    with its estimated probability p_hat (unbiased: its expectation is p, cache_rows.sample_positions) and its exact
    log-prob; empty slots (fewer distinct draws) have -inf in both, and an id that means nothing (a cache's repeats
    the last stored one): a reader tells them by their log-prob (hpd/stages/losses.py `_SampledTeacher`)."""

    ids: torch.Tensor  # [B, L, S] int64
    log_weight: torch.Tensor  # [B, L, S] float32, log p_hat
    logprob: torch.Tensor  # [B, L, S] float32, exact log p at ids
    target_logprob: torch.Tensor  # [B, L] float32
    tail_logmass: torch.Tensor  # [B, L] float32, log of the mass outside the S slots
    mask: torch.Tensor  # [B, L] bool


class CacheMismatchError(RuntimeError):
    pass


def check_tokens(rows: list[ScoredSequence], input_ids: list, cache_id: str = "") -> None:
    """Each scored row against the tokens it is to be joined with (by their CRC)."""
    for i, (row, ids) in enumerate(zip(rows, input_ids)):
        if row.tokens_crc != tokens_crc(ids):
            raise CacheMismatchError(
                f"cache {cache_id}: row for sequence {row.seq_id} was scored on different tokens than "
                f"batch item {i}; the cache does not belong to these sequences"
            )


def grid_batch(
    rows: list[ScoredSequence],
    k: int,
    *,
    input_ids: list | None = None,
    length: int | None = None,
    cache_id: str = "",
    draws: int = 0,
) -> CacheBatch | SampledBatch:
    """Scored rows placed at their token positions in a [B, length] grid (tensors or arrays per row). With the
    batch's `input_ids`, every row's token CRC is checked against them. With `draws`, the rows are sampled
    targets (k slots, `counts` per row; a head's slots have count 0 and a log-prob) and a SampledBatch comes back."""
    if input_ids is not None:
        check_tokens(rows, input_ids, cache_id)
    need = max(r.start + len(r.target_logprob) for r in rows)
    L = length or need
    if L < need:
        raise ValueError(f"length {L} is shorter than the cached positions ({need})")
    B = len(rows)
    out = CacheBatch(
        topk_ids=torch.zeros(B, L, k, dtype=torch.long),
        topk_logprobs=torch.full((B, L, k), -float("inf")),
        target_logprob=torch.zeros(B, L),
        tail_logmass=torch.full((B, L), -float("inf")),
        mask=torch.zeros(B, L, dtype=torch.bool),
    )
    for b, row in enumerate(rows):
        sl = slice(row.start, row.start + len(row.target_logprob))
        out.topk_ids[b, sl] = torch.as_tensor(row.topk_ids)
        out.topk_logprobs[b, sl] = torch.as_tensor(row.topk_logprobs)
        out.target_logprob[b, sl] = torch.as_tensor(row.target_logprob)
        out.tail_logmass[b, sl] = torch.as_tensor(row.tail_logmass)
        out.mask[b, sl] = True
    if not draws:
        return out
    counts, rest = torch.zeros(B, L, k), torch.zeros(B, L)
    for b, row in enumerate(rows):
        sl = slice(row.start, row.start + len(row.target_logprob))
        counts[b, sl] = torch.as_tensor(row.counts).float()
        if row.rest_logmass is not None:
            rest[b, sl] = torch.as_tensor(row.rest_logmass).float()
    # p_hat: count / N of the mass outside the head for drawn slots, p itself for the head's, 0 for empty slots
    head = (counts == 0) & (out.topk_logprobs > -float("inf"))
    log_weight = torch.where(head, out.topk_logprobs, torch.log(counts / draws) + rest[..., None])
    return SampledBatch(
        ids=out.topk_ids,
        log_weight=log_weight,
        logprob=out.topk_logprobs,
        target_logprob=out.target_logprob,
        tail_logmass=out.tail_logmass,
        mask=out.mask,
    )
