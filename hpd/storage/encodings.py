"""How the top-k of each position is laid out in a cache shard. Every encoding works on flat arrays
(all positions of a record batch at once), so decoding is a handful of vectorised numpy operations.

Common to all: the exact next-token log-prob and the tail log-mass are float32 columns, untouched.

  fp16        ids in rank order (uint16, or uint32 past 65,536 tokens), log-probs as float16.
              |error| <= |log p| * 2**-11.
  rank-q8     ids in rank order; the top-1 log-prob as float16, the other k-1 as the gap to the top-1
              quantised to `step` nats and stored as increments between neighbours (uint8; the gaps are
              monotone, so increments are small and zstd shrinks them to a few bits).
              |error| <= step/2 + |top-1| * 2**-11 for gaps up to 255*step; larger gaps (probabilities
              below e**-(255*step) of the top-1) are stored as exactly 255*step.
  idsort-q8   ids sorted ascending and delta-coded (uint16), the gaps to the top-1 quantised as in
              rank-q8 but stored directly (they are no longer monotone). Entries come back in id order,
              not rank order; same error bound as rank-q8.
  compact     ids renumbered by how often the teacher ranks them (a VocabOrder learned from the cache's first
              sequences, stored once per cache), sorted, delta-coded and split into byte planes (one uint8
              column per byte: the high bytes of small deltas are nearly all 0, which zstd stores in a few bits);
              gaps g to the top-1 companded: code = round(A ln(1 + g/G0)), A = G0/step, G0 = 1 nat, so the
              step is `step` near the top-1 and grows with g, where a token's probability (and its share of
              any KL) is small. |error| <= (step/2)(1 + g) + |top-1| * 2**-11 (to first order).
  sampled:N   random-sampling KD: N tokens drawn from the teacher per position (hpd/stages/cache_rows.py:
              systematic draws, or with sampled:M+N the top M kept exactly and N draws for the rest); only the
              distinct drawn ids are stored (a variable number per position, `n`), coded as in compact, each
              with its draw count (uint8, so N <= 255) and its exact log-prob (companded gap to the largest drawn one).
              p_hat = count / N is an unbiased estimate of p (hpd/storage/cache_batch.SampledBatch).
  sampled-counts:N  the same draws without the log-probs: ids and counts only (the random-sampling KD paper's
              layout). Losses linear in p (fkl) are as unbiased as from sampled:N; every other use sees p_hat scaled
              to the drawn mass (the exact tail keeps the rest) in place of the exact log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

F16_REL_ERROR = 2.0**-11


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


G0 = 1.0  # nats: the gap below which compact's quantisation step stays close to `step`
_GAP_TABLES: dict[float, np.ndarray] = {}  # step -> the gap of each of the 256 codes


class VocabOrder:
    """Token ids renumbered by frequency: the ids seen most often in a teacher's stored sets get the smallest
    numbers, so sorted sets have small deltas. `order` lists the seen ids, most frequent first; the unseen ones
    follow in id order. Learned once per cache and stored with it (hpd/storage/logit_cache.py)."""

    def __init__(self, order: np.ndarray, vocab_size: int):
        self.order = np.asarray(order, np.int64)
        self.vocab_size = int(vocab_size)
        rest = np.setdiff1d(np.arange(self.vocab_size), self.order, assume_unique=True)
        self.id_of = np.concatenate([self.order, rest])  # number -> token id
        self.number = np.empty(self.vocab_size, np.int64)
        self.number[self.id_of] = np.arange(self.vocab_size)  # token id -> number

    @classmethod
    def learn(cls, ids: np.ndarray, vocab_size: int) -> VocabOrder:
        """From the ids a cache stores (any shape): by count, ties by id."""
        counts = np.bincount(np.asarray(ids, np.int64).ravel(), minlength=vocab_size)
        seen = np.flatnonzero(counts)
        return cls(seen[np.lexsort((seen, -counts[seen]))], vocab_size)


def _planes(values: np.ndarray, idt) -> dict[str, np.ndarray]:
    """uint16/uint32 values as one uint8 column per byte, least significant first."""
    raw = values.astype(idt).view(np.uint8).reshape(-1, np.dtype(idt).itemsize)
    return {f"ids{b}": np.ascontiguousarray(raw[:, b]) for b in range(raw.shape[1])}


def _unplanes(cols: dict[str, np.ndarray], idt) -> np.ndarray:
    width = np.dtype(idt).itemsize
    raw = np.stack([cols[f"ids{b}"] for b in range(width)], axis=1)
    return np.ascontiguousarray(raw).view(idt).ravel()


@dataclass(frozen=True)
class Encoding:
    name: str
    step: float = 0.0  # quantisation step (nats) of the q8 encodings
    draws: int = 0  # sampled: tokens drawn per position
    head: int = 0  # sampled: the most probable tokens kept exactly, the draws estimating the rest

    @property
    def spec(self) -> dict:
        return {
            "name": self.name,
            "step": self.step,
            **({"draws": self.draws} if self.draws else {}),
            **({"head": self.head} if self.head else {}),
        }

    @property
    def label(self) -> str:
        """How a user writes it in score.encoding (sampled:M+N, compact:STEP, ...)."""
        if self.sampled:
            return f"{self.name}:" + (f"{self.head}+" if self.head else "") + str(self.draws)
        return self.name + (f":{self.step:g}" if self.step else "")

    @property
    def slots(self) -> int:
        """Entries per position at most (sampled: head + draws)."""
        return self.head + self.draws

    @property
    def sampled(self) -> bool:
        return self.name in ("sampled", "sampled-counts")

    @property
    def logprobs(self) -> bool:
        """Stores a log-prob per entry (all but sampled-counts)."""
        return self.name != "sampled-counts"

    @property
    def vocab_ordered(self) -> bool:
        """Needs a VocabOrder to encode and decode."""
        return self.name in ("compact", "sampled", "sampled-counts")

    def max_error(self, top1_abs: float = 0.0, logprob_abs: float = 0.0, gap: float = 0.0) -> float:
        """Documented bound on |decoded - true| log-prob for an entry within the quantised range."""
        if self.name == "fp16":
            return logprob_abs * F16_REL_ERROR
        if self.vocab_ordered:  # half a code in the companded domain, mapped back (exact, not first order)
            a = G0 / self.step
            g = max(gap, 0.0)
            return (G0 + g) * np.expm1(1 / (2 * a)) + top1_abs * F16_REL_ERROR
        return self.step / 2 + top1_abs * F16_REL_ERROR

    def _gap_codes(self, gap: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(G0 / self.step * np.log1p(np.maximum(gap, 0) / G0)), 0, 255).astype(np.uint8)

    def _gaps(self, codes: np.ndarray) -> np.ndarray:
        return (G0 * np.expm1(codes.astype(np.float64) * (self.step / G0))).astype(np.float32)

    # -- encode: ids [P, k], logprobs [P, k] sorted descending along k -> flat column arrays ------------
    def encode(
        self,
        ids: np.ndarray,
        lps: np.ndarray,
        vocab_size: int,
        *,
        counts: np.ndarray | None = None,
        order: VocabOrder | None = None,
    ) -> dict[str, np.ndarray]:
        """`counts` (sampled: draws per slot, 0 = an empty slot) and `order` (compact, sampled) as they need."""
        P, k = ids.shape
        idt = id_dtype(vocab_size)
        if self.vocab_ordered:
            return self._encode_ordered(ids, lps, idt, counts, order)
        if self.name == "fp16":
            return {"ids": ids.astype(idt).ravel(), "lp16": lps.astype(np.float16).ravel()}
        top1 = lps[:, :1].astype(np.float16)
        gap = np.clip(np.rint((top1.astype(np.float32) - lps) / self.step), 0, 255).astype(np.int16)
        if self.name == "rank-q8":
            gap = np.maximum.accumulate(gap, axis=1)  # rounding keeps order; this guards float16's top-1
            inc = np.diff(gap, axis=1).astype(np.uint8)
            return {"ids": ids.astype(idt).ravel(), "top1": top1.ravel(), "q": inc.ravel()}
        if self.name == "idsort-q8":
            order = np.argsort(ids, axis=1, kind="stable")
            sid = np.take_along_axis(ids, order, 1).astype(np.int64)
            delta = np.diff(sid, axis=1, prepend=0).astype(idt)
            q = np.take_along_axis(gap, order, 1).astype(np.uint8)
            return {"ids": delta.ravel(), "top1": top1.ravel(), "q": q.ravel()}
        raise ValueError(f"unknown encoding {self.name!r}")

    def _encode_ordered(self, ids, lps, idt, counts, order: VocabOrder) -> dict[str, np.ndarray]:
        P, k = ids.shape
        # sampled: the head's slots (count 0) and the drawn ones; empty slots have no log-prob
        keep = (counts > 0 if not self.logprobs else np.isfinite(lps)) if self.sampled else np.ones((P, k), bool)
        num = np.where(keep, order.number[ids], np.iinfo(np.int64).max)  # empty slots sort last
        by = np.argsort(num, axis=1, kind="stable")
        num, lps = np.take_along_axis(num, by, 1), np.take_along_axis(lps, by, 1)
        n = keep.sum(1)
        kept = np.arange(k)[None, :] < n[:, None]  # after the sort, the first n of each position
        top1 = np.where(kept, lps, -np.inf).max(1, keepdims=True).astype(np.float16)
        delta = np.diff(np.where(kept, num, 0), axis=1, prepend=0)
        cols = _planes(delta[kept], idt)
        if self.logprobs:
            cols.update(top1=top1.ravel(), q=self._gap_codes(top1.astype(np.float32) - lps)[kept])
        if self.sampled:
            cols["n"] = n.astype(np.uint8)
            cols["count"] = np.take_along_axis(counts, by, 1)[kept].astype(np.uint8)
        return cols

    def _decode_ordered(self, cols, P: int, k: int, order: VocabOrder):
        nbytes = sum(1 for c in cols if c.startswith("ids"))  # the planes say the ids' width
        delta = _unplanes(cols, {2: np.uint16, 4: np.uint32}[nbytes])
        if self.logprobs:
            gaps = self._gap_table()[cols["q"]]  # a lookup per entry, not an expm1
            top1 = cols["top1"].astype(np.float32)
        if not self.sampled:  # k entries per position: plain reshapes
            ids = order.id_of[np.cumsum(delta.reshape(P, k), axis=1, dtype=np.int64)]
            lps = top1[:, None] - gaps.reshape(P, k)
            return torch.from_numpy(ids), torch.from_numpy(lps)
        pos, slot = self._slots(cols["n"])
        grid = np.zeros((P, k), np.int64)
        grid[pos, slot] = delta
        ids = order.id_of[np.cumsum(grid, axis=1)]  # empty slots repeat the last id (log p -inf: no outcome)
        lps = np.full((P, k), -np.inf, np.float32)
        # sampled-counts: log p_hat for now (decode_batch scales it to the drawn mass, knowing the tail)
        lps[pos, slot] = top1[pos] - gaps if self.logprobs else np.log(cols["count"] / np.float32(self.draws))
        return torch.from_numpy(ids), torch.from_numpy(lps)

    @staticmethod
    def _slots(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, slot) of every stored entry of a variable-width layout with n entries per position."""
        n = n.astype(np.int64)
        pos = np.repeat(np.arange(len(n)), n)
        return pos, np.arange(len(pos)) - np.repeat(np.cumsum(n) - n, n)

    def _gap_table(self) -> np.ndarray:
        return _GAP_TABLES.setdefault(self.step, self._gaps(np.arange(256)))

    def decode_counts(self, cols: dict[str, np.ndarray], P: int) -> torch.Tensor:
        """Sampled: the draw count of every slot [P, N] (0 for empty slots), in the order `decode` gives."""
        pos, slot = self._slots(cols["n"])
        counts = np.zeros((P, self.slots), np.int64)
        counts[pos, slot] = cols["count"]
        return torch.from_numpy(counts)

    # -- decode: flat column arrays -> ids [P, k] int64, logprobs [P, k] float32 (torch) ----------------
    # float16 widening goes through torch (vectorised), integer work through numpy (faster cumsum).
    def decode(
        self, cols: dict[str, np.ndarray], P: int, k: int, order: VocabOrder | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.vocab_ordered:
            return self._decode_ordered(cols, P, k, order)
        if self.name == "fp16":
            return (
                torch.from_numpy(cols["ids"].reshape(P, k).astype(np.int64)),
                torch.from_numpy(cols["lp16"].copy()).view(P, k).float(),
            )  # copy: Arrow's buffer is read-only
        top1 = cols["top1"].astype(np.float32).reshape(P, 1)
        if self.name == "rank-q8":
            q = np.zeros((P, k), np.uint16)  # integer cumsum: faster than float, exact up to 255 * 255
            np.cumsum(cols["q"].reshape(P, k - 1), axis=1, dtype=np.uint16, out=q[:, 1:])
            ids = cols["ids"].reshape(P, k).astype(np.int64)
        elif self.name == "idsort-q8":
            q = cols["q"].reshape(P, k)
            ids = np.cumsum(cols["ids"].reshape(P, k), axis=1, dtype=np.int64)
        else:
            raise ValueError(f"unknown encoding {self.name!r}")
        lps = q.astype(np.float32)
        lps *= np.float32(-self.step)
        lps += top1
        return torch.from_numpy(ids), torch.from_numpy(lps)

    def per_entry_columns(self, vocab_size: int = 1 << 16) -> dict[str, bool]:
        """Column name -> True if it holds k (or k-1, or n) values per position, False if one per position."""
        if self.vocab_ordered:
            planes = {f"ids{b}": True for b in range(np.dtype(id_dtype(vocab_size)).itemsize)}
            return {
                **planes,
                **({"top1": False, "q": True} if self.logprobs else {}),
                **({"n": False, "count": True} if self.sampled else {}),
            }
        return {
            "fp16": {"ids": True, "lp16": True},
            "rank-q8": {"ids": True, "top1": False, "q": True},
            "idsort-q8": {"ids": True, "top1": False, "q": True},
        }[self.name]

    def arrow_types(self, vocab_size: int) -> dict[str, pa.DataType]:
        idt = pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()
        planes = {f"ids{b}": pa.uint8() for b in range(4)}
        return {
            "ids": idt,
            "lp16": pa.float16(),
            "top1": pa.float16(),
            "q": pa.uint8(),
            **planes,
            "n": pa.uint8(),
            "count": pa.uint8(),
        }


ENCODINGS = {
    "fp16": Encoding("fp16"),
    "rank-q8": Encoding("rank-q8", 1 / 16),
    "idsort-q8": Encoding("idsort-q8", 1 / 16),
    "compact": Encoding("compact", 1 / 8),
    "sampled": Encoding("sampled", 1 / 8, 16),
    "sampled-counts": Encoding("sampled-counts", 1 / 8, 16),
}
MAX_DRAWS = 255  # draw counts are stored as uint8


def get(spec: dict | str) -> Encoding:
    if isinstance(spec, str):
        name, _, arg = spec.partition(":")
        if name not in ENCODINGS:
            raise ValueError(
                f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)} "
                f"(q8 encodings and compact take a step, e.g. rank-q8:0.0625; sampled takes its "
                f"draws per position, e.g. sampled:32)"
            )
        if name.startswith("sampled"):
            head, _, draws = arg.rpartition("+")
            if head and name == "sampled-counts":
                raise ValueError(
                    f"{spec!r}: sampled-counts stores no log-probs, so it keeps no exact head; use "
                    f"sampled:{arg} (the head and the draws with their log-probs)"
                )
            head = _draws(name, head, what="head tokens", low=0) if head else 0
            draws = _draws(name, draws)
            if head + draws > MAX_DRAWS:
                raise ValueError(f"{spec!r}: head + draws must be at most {MAX_DRAWS} per position")
            return Encoding(name, ENCODINGS[name].step, draws, head)
        try:
            return Encoding(name, float(arg)) if arg else ENCODINGS[name]
        except ValueError:
            raise ValueError(f"{spec!r}: the step after ':' must be a number of nats, e.g. {name}:0.0625") from None
    if spec.get("name") not in ENCODINGS:  # a cache written by a newer version: name it, never misread it
        raise ValueError(
            f"unknown encoding {spec.get('name')!r} (this version reads {', '.join(ENCODINGS)}); "
            f"read the cache with the hpd version that wrote it, or rescore it"
        )
    return Encoding(spec["name"], spec.get("step", 0.0), spec.get("draws", 0), spec.get("head", 0))


def _draws(name: str, arg: str, what: str = "draws per position", low: int = 1) -> int:
    if ":" in arg:
        raise ValueError(
            f"{name}:{arg}: only draws from the teacher's own distribution are stored (a proposal "
            f"p^tau needs its normaliser per position and measured worse: docs/losses.md); use {name}:N"
        )
    try:
        n = int(arg or ENCODINGS[name].draws)
    except ValueError:
        n = -1
    if not low <= n <= MAX_DRAWS:
        raise ValueError(
            f"{name}:{arg}: the {what} must be a whole number from {low} to {MAX_DRAWS} (counts are "
            f"stored in one byte), e.g. {name}:32, or {name}:8+16 for the top 8 and 16 draws from the "
            f"rest"
        )
    return n
