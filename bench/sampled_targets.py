"""Sampled teacher targets against top-k at matched bytes: bytes per token and gradient fidelity.

For the batches and student of bench/hpd_gradient.py, every arm is what a cache would hand the student: the score
stage's own computation for each sequence (top-k: `score_positions`; sampled targets: `sample_positions` with one
seed per sequence, systematic draws, drawn slots only, as `score.encoding = "sampled:N"` stores them; two arms draw
independently instead, to show what systematic draws buy), through the cache's encode and
decode path (`storage.logit_cache.round_trip`). Per arm:
  - bytes per scored token of a real cache of the bench's sequences (CacheRoot writer, zstd as shipped); the
    VocabOrder that compact and sampled store once per cache is reported apart (it does not grow with the cache);
  - the cosine between the gradient (w.r.t. the student's parameters) of fkl, hpd_fkl and hpd from the arm and
    from the teacher's full logits, with the same student samples.

    python -m bench.sampled_targets [--config dialogue|smollm2]

Writes bench/results/sampled_targets[_smollm2].json.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.provenance import stamp
from hpd.stages.cache_rows import sample_positions, score_positions
from hpd.stages.losses import distill_loss
from hpd.storage import encodings as enc
from hpd.storage.logit_cache import CacheRoot, LogitCache, ScoredSequence, cache_key, round_trip

from .hpd_gradient import agreement, arguments, flat_grad, gradient_batches, results_path

ARMS = {
    "top-16 idsort-q8": ("idsort-q8", 16),
    "top-16 compact": ("compact", 16),
    "top-64 idsort-q8": ("idsort-q8", 64),
    "top-64 compact": ("compact", 64),
    **{f"sampled {n}": (f"sampled:{n}", n) for n in (8, 16, 32)},
    **{f"sampled-counts {n}": (f"sampled-counts:{n}", n) for n in (8, 16, 24, 32)},
    "top-8 + sampled 8": ("sampled:8+8", 16),
    # independent draws instead of the score stage's systematic ones: what systematic sampling buys
    "sampled 16 (iid draws)": ("sampled:16", 16),
    "sampled-counts 16 (iid draws)": ("sampled-counts:16", 16),
}
METHODS = ("fkl", "hpd_fkl", "hpd")


def scored_rows(
    t_logits, ids, cache_mask, encoding: str, k: int, batch: int, iid: bool = False
) -> list[ScoredSequence]:
    """What the score stage stores for each sequence of the batch (positions where cache_mask is set); `iid`: the
    draws independent rather than systematic."""
    rows, code = [], enc.get(encoding)
    for b in range(len(ids)):
        pos = cache_mask[b].nonzero()[:, 0]
        t0, t1 = int(pos[0]), int(pos[-1]) + 1
        logits, nxt = t_logits[b, t0:t1].float(), ids[b, t0 + 1 : t1 + 1]
        if code.sampled:
            g = torch.Generator().manual_seed(batch * 10_000 + b)
            d = sample_positions(
                logits, nxt, draws=code.draws, generator=g, fill=False, head=code.head, systematic=not iid
            )
            cols = {
                "topk_ids": d.ids,
                "topk_logprobs": d.logprob,
                "target_logprob": d.target,
                "tail_logmass": d.tail,
                "counts": d.counts,
                **({"rest_logmass": d.rest} if code.head else {}),
            }
        else:
            top_ids, top_lp, target, tail = score_positions(logits, nxt, top_k=k)
            cols = {"topk_ids": top_ids, "topk_logprobs": top_lp, "target_logprob": target, "tail_logmass": tail}
        rows.append(
            ScoredSequence(
                seq_id=batch * 10_000 + b,
                input_ids=ids[b, : t1 + 1].numpy(),
                start=t0,
                **{name: v.numpy() for name, v in cols.items()},
            )
        )
    return rows


def stored_ids(rows: list[ScoredSequence]) -> np.ndarray:
    return np.concatenate([r.topk_ids[r.topk_logprobs > -np.inf] for r in rows])


def cache_bytes(rows: list[ScoredSequence], encoding: str, k: int, vocab: int, learn_from: np.ndarray, tmp: Path):
    """(shard bytes, vocabulary-order bytes) of a real cache holding `rows`."""
    key = cache_key(teacher="bench", tokenizer="t", data="d", top_k=k, temperature=1.0, encoding=encoding)
    root = CacheRoot(tmp)
    for i, r in enumerate(rows):
        r.seq_id = i  # a cache's row i is sequence i
    w = root.writer(
        key, shard_size=len(rows), num_sequences=len(rows), vocab_size=vocab, learn_order=lambda: learn_from
    )
    w.write_rows(0, rows)
    w.finish(1)
    cache = LogitCache(root.path_for(key))
    return cache.manifest["bytes"], cache.bytes - cache.manifest["bytes"]


def main():
    args = arguments(__doc__).parse_args()
    out = results_path(args, "sampled_targets")
    batches = gradient_batches(args)
    student = next(batches)
    cosines: dict[str, dict[str, list[float]]] = {a: {m: [] for m in METHODS} for a in ARMS}
    rows: dict[str, list] = {a: [] for a in ARMS}
    orders: dict[str, enc.VocabOrder] = {}
    drawn: dict[str, list[float]] = {}
    vocab = None
    for n, (ids, mask, labels, t_logits, sample, cache_mask) in enumerate(batches, 1):
        vocab = t_logits.shape[-1]
        views = {}
        for arm, (encoding, k) in ARMS.items():
            scored = scored_rows(t_logits, ids, cache_mask, encoding, k, n, iid="iid" in arm)
            rows[arm] += scored
            if arm not in orders:  # learned from the first batch, as a cache learns it from its first positions
                orders[arm] = enc.VocabOrder.learn(stored_ids(scored), vocab)
            views[arm] = round_trip(scored, encoding, vocab, orders[arm], length=ids.shape[1])
            assert torch.equal(views[arm].mask, cache_mask)
            if enc.get(encoding).sampled:  # ids stored per position
                drawn.setdefault(arm, []).append(
                    float((views[arm].logprob > -np.inf).sum(-1)[cache_mask].float().mean())
                )
        for method in METHODS:
            grads = {}
            for name, teacher in (("full", t_logits), *views.items()):
                student.zero_grad()
                loss, _ = distill_loss(
                    method,
                    student(input_ids=ids, attention_mask=mask).logits,
                    labels,
                    teacher=teacher,
                    sampled_tokens=sample,
                )
                loss.backward()
                grads[name] = flat_grad(student).clone()
            for arm in ARMS:
                cosines[arm][method].append(agreement(grads[arm], grads["full"])[0])
        print(
            f"batch {n}/{args.batches}: fkl " + ", ".join(f"{a} {c['fkl'][-1]:.3f}" for a, c in cosines.items()),
            flush=True,
        )
    tokens = sum(len(r.target_logprob) for r in rows["top-16 compact"])
    arms = {}
    with tempfile.TemporaryDirectory(prefix="hpd-sampled-") as tmp:
        for i, (arm, (encoding, k)) in enumerate(ARMS.items()):
            first = rows[arm][: max(1, len(rows[arm]) // args.batches)]  # the first batch's rows
            shard, order = cache_bytes(rows[arm], encoding, k, vocab, stored_ids(first), Path(tmp) / str(i))
            arms[arm] = {
                "encoding": encoding,
                "bytes_per_token": shard / tokens,
                "order_bytes": order,
                **({"distinct_ids_per_position": float(np.mean(drawn[arm]))} if arm in drawn else {}),
                **{
                    m: {"cosine_mean": float(np.mean(v)), "cosine_min": float(np.min(v))}
                    for m, v in cosines[arm].items()
                },
            }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "made": stamp(),
                "config": args.config,
                "batches": args.batches,
                "tokens": tokens,
                "vocab_size": vocab,
                "arms": arms,
            },
            indent=1,
        )
        + "\n"
    )
    for arm, a in arms.items():
        print(
            f"{arm:<18} {a['bytes_per_token']:6.1f} B/token (+{a['order_bytes']} B once)  "
            + "  ".join(f"{m} {a[m]['cosine_mean']:.4f}" for m in METHODS)
        )


if __name__ == "__main__":
    main()
