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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

F16_REL_ERROR = 2.0 ** -11


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass(frozen=True)
class Encoding:
    name: str
    step: float = 0.0  # quantisation step (nats) of the q8 encodings

    @property
    def spec(self) -> dict:
        return {"name": self.name, "step": self.step}

    def max_error(self, top1_abs: float = 0.0, logprob_abs: float = 0.0) -> float:
        """Documented bound on |decoded - true| log-prob for an entry within the quantised range."""
        if self.name == "fp16":
            return logprob_abs * F16_REL_ERROR
        return self.step / 2 + top1_abs * F16_REL_ERROR

    # -- encode: ids [P, k], logprobs [P, k] sorted descending along k -> flat column arrays ------------
    def encode(self, ids: np.ndarray, lps: np.ndarray, vocab_size: int) -> dict[str, np.ndarray]:
        P, k = ids.shape
        idt = id_dtype(vocab_size)
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

    # -- decode: flat column arrays -> ids [P, k] int64, logprobs [P, k] float32 (torch) ----------------
    # float16 widening goes through torch (vectorised), integer work through numpy (faster cumsum).
    def decode(self, cols: dict[str, np.ndarray], P: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "fp16":
            return (torch.from_numpy(cols["ids"].reshape(P, k).astype(np.int64)),
                    torch.from_numpy(cols["lp16"].copy()).view(P, k).float())  # copy: Arrow's buffer is read-only
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

    def per_entry_columns(self) -> dict[str, bool]:
        """Column name -> True if it holds k (or k-1) values per position, False if one per position."""
        return {"fp16": {"ids": True, "lp16": True}, "rank-q8": {"ids": True, "top1": False, "q": True},
                "idsort-q8": {"ids": True, "top1": False, "q": True}}[self.name]

    def arrow_types(self, vocab_size: int) -> dict[str, pa.DataType]:
        idt = pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()
        return {"ids": idt, "lp16": pa.float16(), "top1": pa.float16(), "q": pa.uint8()}


ENCODINGS = {"fp16": Encoding("fp16"), "rank-q8": Encoding("rank-q8", 1 / 16),
             "idsort-q8": Encoding("idsort-q8", 1 / 16)}


def get(spec: dict | str) -> Encoding:
    if isinstance(spec, str):
        name, _, step = spec.partition(":")
        if name not in ENCODINGS:
            raise ValueError(f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)} "
                             f"(q8 encodings take a step, e.g. rank-q8:0.0625)")
        return Encoding(name, float(step)) if step else ENCODINGS[name]
    return Encoding(spec["name"], spec.get("step", 0.0))
