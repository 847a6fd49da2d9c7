"""Cache encodings on a teacher's own sequences (the dialogue teacher by default; `--config smollm2` for the real
LLM): size, fidelity and speed for k in {8,16,32,64,128}.

Writes bench/results/cache_formats.json and bench/results/cache_formats.md. Measured:
  - bytes per scored token on disk (real shards written by storage/, zstd level as shipped, plus levels 1/3/19),
  - fidelity against the teacher's full float64 distribution, two ways:
      kl_bucket  KL over the k+1 buckets (top-k entries + one tail bucket): what the encoding loses;
      kl_full    KL over the whole vocabulary with the tail mass spread uniformly over the other tokens:
                 what truncation to k loses on top of it (no encoding can recover the tail's shape);
  - encode and decode throughput (tokens/s, one core), and the reader's time for a training batch as a
    fraction of a student training step: every timing a median over rounds that run the arms in turn after a
    discarded warm-up (bench/timing.py), with its spread.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from bench.provenance import stamp
from bench.timing import alternate, rate
from hpd import open_run
from hpd.stages import batching, hf_models, student_models
from hpd.storage import encodings as enc
from hpd.storage import shards as shards_mod
from hpd.storage.logit_cache import (
    DEFAULT_ENCODING,
    LEARN_POSITIONS,
    CacheRoot,
    LogitCache,
    ScoredSequence,
    cache_key,
    decode_batch,
)
from hpd.storage.sequences import SequenceStore

KS = [8, 16, 32, 64, 128]
SHIPPED_LEVEL = shards_mod.ZSTD_LEVEL
ENCODINGS = [
    "fp16",
    "rank-q8:0.03125",
    "rank-q8:0.0625",
    "rank-q8:0.125",
    "idsort-q8:0.0625",
    "compact:0.0625",
    "compact:0.125",
    "compact:0.25",
]
ANCHORS = {
    "dense bf16, vocab 152k": 297 * 1024,
    "top-64 int32 id + fp16, raw": 384,
    "Megatron-LM top-128 before zstd": 528,
    "DistillKit recommended k=128": "312-344",
    "DistillKit budget k=50": "114-127",
    "small model k=64 int32+fp16 after zstd (DistillKit, side by side)": "152-203",
    "same, 8-bit log-probs": "137-144",
}


def rebuild_kl(full_lp: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, tail: torch.Tensor) -> tuple:
    """(kl_bucket, kl_full) per position, float64. full_lp [P, V]; ids/lps [P, k] decoded; tail [P] exact."""
    P, V = full_lp.shape
    k = ids.shape[1]
    p_top = full_lp.gather(1, ids)  # exact log-probs of the cached ids
    q_top, q_tail = lps.double(), tail.double()
    norm = torch.logsumexp(torch.cat([q_top, q_tail[:, None]], 1), 1, keepdim=True)  # rebuilt mass may miss 1
    q_top, q_tail = q_top - norm, q_tail - norm[:, 0]
    pt = p_top.exp()
    kl_top = (pt * (p_top - q_top)).sum(1)
    p_tail = tail.double()
    finite = torch.isfinite(p_tail)
    kl_bucket = kl_top + torch.where(finite, p_tail.exp() * (p_tail - q_tail), torch.zeros_like(p_tail))
    if k == V:
        return kl_bucket, kl_bucket
    outside = torch.ones_like(full_lp, dtype=torch.bool).scatter(1, ids, False)
    q_each = (q_tail - np.log(V - k))[:, None]
    kl_tail = torch.where(outside, full_lp.exp() * (full_lp - q_each), torch.zeros_like(full_lp)).sum(1)
    return kl_bucket, kl_top + kl_tail


def spread(ends: list[float]) -> str:
    return "-".join(f"{x / 1e6:.2f}" for x in ends) + "M"


def first_ids(rows) -> np.ndarray:
    """The ids of the first LEARN_POSITIONS positions: what a cache learns its VocabOrder from."""
    return np.concatenate([r.topk_ids for r in rows])[:LEARN_POSITIONS].ravel()


def return_freed_memory() -> None:
    """glibc keeps freed blocks of a few MB (this bench's [n, V] temporaries) in its heaps once its dynamic mmap
    threshold has risen: on the real teacher's vocabulary the process grew past the machine's 23 GB and was killed.
    A fixed 1 MB threshold (M_MMAP_THRESHOLD) maps such blocks and returns them when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main():
    return_freed_memory()
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--sequences", type=int, default=1000, help="sequences for sizes and speeds")
    ap.add_argument("--kl-sequences", type=int, default=200, help="of which, sequences for the KL measures")
    ap.add_argument("--config", default="dialogue", help="the run whose teacher and generated sequences are measured")
    ap.add_argument(
        "--out",
        default=None,
        help="results path without suffix (default: results/cache_formats, "
        "or results/cache_formats_<config> for another config)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)  # "one core" throughput, and stable numbers on a noisy machine

    runner = open_run(args.config, [], home=args.home)
    runner.run(until="generate")
    teacher = runner.outputs("teacher")
    store = SequenceStore(Path(runner.outputs("generate").sequences))
    model, tok = hf_models.load_causal_lm(teacher.model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    V = teacher.vocab_size
    n = min(args.sequences, len(store))
    seq_ids, plens, seqs = store.range(0, n)

    kmax = max(KS)
    rows, kl = [], {(k, e): [[], []] for k in KS for e in ENCODINGS}
    entropy, tails = [], {k: [] for k in KS}
    t_score = time.perf_counter()
    torch.set_grad_enabled(False)  # scoring (the student's steps below turn it back on)
    chunk = 16 if V <= 16384 else 4  # [chunk, L, V] float32 log-probs: a large vocabulary needs small chunks
    for i in range(0, n, chunk):
        part = slice(i, i + chunk)
        lp_all, _ = hf_models.log_probs(model, seqs[part], tok.pad_token_id)
        for b, (s, p) in enumerate(zip(seqs[part], plens[part])):
            full = lp_all[b, p - 1 : len(s) - 1].double()  # [n, V]
            entropy.append(-(full.exp() * full).sum(1))
            top_lp, top_ids = torch.topk(full, kmax, dim=1)
            target = full.gather(1, torch.as_tensor(np.asarray(s[p:], np.int64))[:, None])[:, 0]
            rows.append(
                ScoredSequence(
                    seq_id=int(seq_ids[i + b]),
                    input_ids=s,
                    start=int(p) - 1,
                    topk_ids=top_ids.numpy(),
                    topk_logprobs=top_lp.float().numpy(),
                    target_logprob=target.float().numpy(),
                    tail_logmass=torch.logsumexp(full.scatter(1, top_ids, -np.inf), 1).float().numpy(),
                )
            )
            for k in KS if i + b < args.kl_sequences else []:
                tail_k = torch.logsumexp(full.scatter(1, top_ids[:, :k], -np.inf), 1)
                tails[k].append(tail_k.exp())
                order = enc.VocabOrder.learn(top_ids[:, :k].numpy(), V)  # any order: ids are kept exactly
                for e in ENCODINGS:
                    code = enc.get(e)
                    cols = code.encode(top_ids[:, :k].numpy(), top_lp[:, :k].float().numpy(), V, order=order)
                    d_ids, d_lps = code.decode(cols, len(full), k, order=order)
                    a, f = rebuild_kl(full, d_ids, d_lps, tail_k.float())
                    kl[(k, e)][0].append(a)
                    kl[(k, e)][1].append(f)
    t_score = time.perf_counter() - t_score
    tokens = sum(len(r.target_logprob) for r in rows)

    def with_k(k):
        out = []
        for r in rows:
            lp = torch.from_numpy(r.topk_logprobs).double()
            tail = (
                torch.logaddexp(torch.from_numpy(r.tail_logmass).double(), torch.logsumexp(lp[:, k:], 1))
                if k < kmax
                else torch.from_numpy(r.tail_logmass).double()
            )
            out.append(
                ScoredSequence(
                    seq_id=r.seq_id,
                    input_ids=r.input_ids,
                    start=r.start,
                    topk_ids=r.topk_ids[:, :k],
                    topk_logprobs=r.topk_logprobs[:, :k],
                    target_logprob=r.target_logprob,
                    tail_logmass=tail.float().numpy(),
                )
            )
        return out

    results, tmp = [], Path(tempfile.mkdtemp(prefix="hpd-formats-"))

    def write_cache(root: CacheRoot, krows, k: int, code, level: int, teacher: str = "", learn=first_ids):
        key = cache_key(
            teacher=teacher or f"bench-{level}", tokenizer="t", data="d", top_k=k, temperature=1.0, encoding=code.spec
        )
        w = root.writer(
            key,
            shard_size=len(krows),
            num_sequences=len(krows),
            vocab_size=V,
            zstd_level=level,
            learn_order=lambda: learn(krows),
        )
        w.write_rows(0, krows)
        w.finish(1)
        return LogitCache(root.path_for(key))

    def decoded(cache: LogitCache) -> None:
        assert sum(int(d.offsets[-1]) for d in cache.iter_decoded()) == tokens

    speeds = {}
    for k in KS:
        krows = with_k(k)
        shipped = {}
        for e in ENCODINGS:
            code = enc.get(e)
            for level in [1, 3, SHIPPED_LEVEL, 19] if k == 64 else [SHIPPED_LEVEL]:
                cache = write_cache(CacheRoot(tmp / f"z{level}"), krows, k, code, level)
                if level == SHIPPED_LEVEL:
                    shipped[e] = cache
                kb, kf = (torch.cat(x).mean().item() for x in kl[(k, e)])
                results.append(
                    {
                        "k": k,
                        "encoding": e,
                        "zstd_level": level,
                        "bytes_per_token": cache.bytes / tokens,
                        "order_bytes": cache.bytes - cache.manifest["bytes"],
                        "kl_bucket": kb,
                        "kl_full": kf,
                    }
                )
        # Encode (rows to finished shards) and decode (shards to the student's arrays, warm) at the shipped level:
        # every encoding in turn, a warm-up round discarded, 5 rounds (bench/timing.py).
        written = iter(range(10**6))
        arms = {}
        for e, cache in shipped.items():
            for i in range(cache.shards.num_shards):  # open + verify checksums once, outside the timing
                cache.shards.reader(i)
            code = enc.get(e)
            arms[f"encode {e}"] = lambda code=code: write_cache(
                CacheRoot(tmp / "speed"), krows, k, code, SHIPPED_LEVEL, teacher=f"speed-{next(written)}"
            )
            arms[f"decode {e}"] = lambda cache=cache: decoded(cache)
        timed = alternate(arms, log=lambda line: None, prepare=lambda: shutil.rmtree(tmp / "speed", ignore_errors=True))
        for e in ENCODINGS:
            speeds[(k, e)] = {op: rate(timed[f"{op} {e}"]["seconds"], tokens) for op in ("encode", "decode")}
    for row in results:
        if row["zstd_level"] == SHIPPED_LEVEL:
            sp = speeds[(row["k"], row["encoding"])]
            row.update({f"{op}_tokens_per_s": sp[op]["median"] for op in sp})
            row.update({f"{op}_tokens_per_s_range": [sp[op]["min"], sp[op]["max"]] for op in sp})

    # The VocabOrder learned from the first LEARN_POSITIONS positions against one learned from the whole cache
    # (the best any order learned from this data can do), at k=64, the shipped level.
    krows, order_study = with_k(64), {}
    for name, ids_from in (
        ("first positions", first_ids),
        ("whole cache", lambda r: np.concatenate([x.topk_ids for x in r]).ravel()),
    ):
        compact = enc.get("compact")
        c = write_cache(CacheRoot(tmp / "order"), krows, 64, compact, SHIPPED_LEVEL, f"order-{name}", ids_from)
        order_study[name] = {
            "shard_bytes_per_token": c.manifest["bytes"] / tokens,
            "order_bytes": c.bytes - c.manifest["bytes"],
        }

    # Loader time against a student step: random batches of 32 sequences from the k=64 default-encoded cache.
    loader = {}
    torch.set_grad_enabled(True)

    torch.set_num_threads(os.cpu_count())
    key = cache_key(
        teacher=f"bench-{SHIPPED_LEVEL}",
        tokenizer="t",
        data="d",
        top_k=64,
        temperature=1.0,
        encoding=enc.get(DEFAULT_ENCODING).spec,
    )
    cache = LogitCache(CacheRoot(tmp / f"z{SHIPPED_LEVEL}").path_for(key))
    student = student_models.new_gpt2(
        tok, n_positions=min(hf_models.context_length(model), 2048), n_layer=2, n_embd=64, n_head=2
    )
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    loaded = {}

    def load():  # a random batch of 32 sequences from the cache, as the trainer asks for it
        ids = rng.choice(n, 32, replace=False)
        loaded["seqs"] = [seqs[j] for j in ids]
        loaded["cb"] = cache.batch(ids, input_ids=loaded["seqs"], length=max(map(len, loaded["seqs"])))

    def step():  # one training step on the batch just loaded
        x, m = batching.pad_right(loaded["seqs"], tok.pad_token_id)
        cb = loaded["cb"]
        logq = torch.log_softmax(student(input_ids=x, attention_mask=m).logits.float(), -1)
        loss = -(cb.topk_logprobs.exp() * logq.gather(-1, cb.topk_ids))[cb.mask].sum() / cb.mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    timed = alternate({"load": load, "step": step}, rounds=10, log=lambda line: None)
    t_load, t_step = (timed[a]["seconds"] for a in ("load", "step"))
    loader = {
        "batch": 32,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "loader_seconds_per_batch": t_load["median"],
        "student_step_seconds": t_step["median"],
        "loader_fraction_of_step": t_load["median"] / t_step["median"],
        "rounds": len(t_load["runs"]),
        "loader_seconds_range": [t_load["min"], t_load["max"]],
        "student_step_seconds_range": [t_step["min"], t_step["max"]],
    }

    # The container: shards hold one zstd frame per serialised record batch (shipped) against Arrow's own
    # per-buffer IPC compression of the same batches, read and decoded in the same run, interleaved.
    import pyarrow as pa

    torch.set_num_threads(1)
    code = enc.get(DEFAULT_ENCODING)
    framed = cache.shards.reader(0)
    table = framed.read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(
        sink,
        table.schema,
        options=pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=SHIPPED_LEVEL)),
    ) as w:
        w.write_table(table, max_chunksize=cache.rows_per_batch)
    native_buf = sink.getvalue()
    native = pa.ipc.open_file(native_buf)

    def run_native():
        for _ in range(3):
            for i in range(native.num_record_batches):
                decode_batch(native.get_batch(i), code, 64)

    def run_framed():
        for _ in range(3):
            for i in range(framed.num_record_batches):
                decode_batch(framed.get_batch(i), code, 64)

    timed = alternate({"zstd_frames": run_framed, "arrow_ipc_zstd": run_native}, log=lambda line: None)
    rates = {name: rate(t["seconds"], 3 * tokens) for name, t in timed.items()}
    container = {name: r["median"] for name, r in rates.items()}
    container.update({f"{name}_range": [r["min"], r["max"]] for name, r in rates.items()})
    container["arrow_ipc_zstd_bytes_per_token"] = len(native_buf) / tokens
    container["zstd_frames_bytes_per_token"] = cache.manifest["bytes"] / tokens

    import zstandard

    cctx = zstandard.ZstdCompressor(level=SHIPPED_LEVEL)
    column_bytes = {}
    for name in table.column_names:  # where the bytes go: each column compressed on its own
        col = table.column(name).combine_chunks()
        raw = b"".join(b.to_pybytes() for b in col.buffers() if b is not None)
        column_bytes[name] = len(cctx.compress(raw)) / tokens

    summary = {
        "made": stamp(),
        "teacher": teacher.report or {"parameters": parameters},
        "config": args.config,
        "container_decode_tokens_per_s": container,
        "column_bytes_per_token_k64": column_bytes,
        "vocab_size": V,
        "sequences": n,
        "scored_tokens": tokens,
        "kl_sequences": min(args.kl_sequences, n),
        "teacher_entropy_nats": torch.cat(entropy).mean().item(),
        "tail_mass_mean": {k: torch.cat(tails[k]).mean().item() for k in KS},
        "scoring_seconds": t_score,
        "zstd_level": SHIPPED_LEVEL,
        "results": results,
        "loader": loader,
        "anchors_bytes_per_token": ANCHORS,
        "vocab_order_study_k64": order_study,
        "learn_positions": LEARN_POSITIONS,
    }
    out = Path(
        args.out
        or Path(__file__).parent
        / "results"
        / ("cache_formats" if args.config == "dialogue" else f"cache_formats_{args.config}")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    md = [
        f"Teacher of `--config {args.config}` ({parameters / 1e6:.2f}M parameters, vocabulary {V:,}), "
        f"{n:,} sequences, {tokens:,} scored tokens (KL over the first {summary['kl_sequences']}), mean teacher "
        f"entropy {summary['teacher_entropy_nats']:.2f} nats; zstd level {SHIPPED_LEVEL}; throughput on "
        f"one core, the median of 5 rounds that run every encoding of a k in turn after a discarded warm-up.",
        "",
        "| k | encoding | bytes/token | KL bucket (nats) | KL full vocab (nats) | tail mass | decode tok/s "
        "| encode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["zstd_level"] != SHIPPED_LEVEL:
            continue
        md.append(
            f"| {r['k']} | {r['encoding']} | {r['bytes_per_token']:.1f} | {r['kl_bucket']:.5f} | "
            f"{r['kl_full']:.3f} | {summary['tail_mass_mean'][r['k']]:.3f} | "
            f"{r['decode_tokens_per_s'] / 1e6:.2f}M | {r['encode_tokens_per_s'] / 1e6:.2f}M |"
        )
    md += [
        "",
        "zstd level at k=64 (bytes/token):",
        "",
        "| encoding | " + " | ".join(f"level {lv}" for lv in [1, 3, SHIPPED_LEVEL, 19]) + " |",
        "|---|---|---|---|---|",
    ]
    for e in ENCODINGS:
        sizes = {r["zstd_level"]: r["bytes_per_token"] for r in results if r["k"] == 64 and r["encoding"] == e}
        md.append(f"| {e} | " + " | ".join(f"{sizes[lv]:.1f}" for lv in [1, 3, SHIPPED_LEVEL, 19]) + " |")
    md += [
        "",
        f"compact at k=64, the vocabulary order learned from the first {LEARN_POSITIONS:,} positions (shipped) "
        f"against one learned from the whole cache: "
        + "; ".join(
            f"{name} {v['shard_bytes_per_token']:.1f} B/token + {v['order_bytes']:,} B once"
            for name, v in order_study.items()
        )
        + ".",
    ]
    md += [
        "",
        "Anchors from other systems (bytes per token of their formats, as reported for them): "
        + "; ".join(f"{name}: {v if isinstance(v, str) else f'{v:,}'}" for name, v in ANCHORS.items())
        + ".",
    ]
    md += [
        "",
        f"Container, k=64 {DEFAULT_ENCODING}, read + decode on one core, same run: one zstd frame per "
        f"record batch (shipped) {container['zstd_frames'] / 1e6:.2f}M tok/s "
        f"({spread(container['zstd_frames_range'])}) at {container['zstd_frames_bytes_per_token']:.1f} B/token; "
        f"Arrow's per-buffer IPC zstd {container['arrow_ipc_zstd'] / 1e6:.2f}M tok/s "
        f"({spread(container['arrow_ipc_zstd_range'])}) at {container['arrow_ipc_zstd_bytes_per_token']:.1f} "
        "B/token; medians of 5 alternating rounds after a warm-up.",
    ]
    md += [
        "",
        f"Reader: a batch of {loader['batch']} random sequences takes "
        f"{loader['loader_seconds_per_batch'] * 1e3:.1f} ms "
        f"({'-'.join(f'{x * 1e3:.1f}' for x in loader['loader_seconds_range'])}), "
        f"{loader['loader_fraction_of_step']:.1%} of a {loader['student_parameters'] / 1e3:.0f}k-parameter student's "
        f"training step ({loader['student_step_seconds'] * 1e3:.0f} ms, "
        f"{'-'.join(f'{x * 1e3:.0f}' for x in loader['student_step_seconds_range'])}); medians of "
        f"{loader['rounds']} rounds, loading and stepping in turn.",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
