"""score: the teacher runs over the sequences once and its distributions go into a shared logit cache.

For each response position the teacher's top-k, the exact log-prob of the sequence's own next token and
the log of the mass outside the top-k are kept (see hpd/storage/logit_cache.py); with score.encoding = "sampled:N",
tokens drawn from the teacher instead (cache_rows.sample_positions), each sequence's draws from a seed of its own
derived from the cache key, so that a resumed or re-batched build writes the same bytes. The cache is keyed by the
teacher's weights, its tokenizer, the sequences' content (and, for refreshed sequences, the round and student
checkpoint that sampled them), k and temperature: a run that asks for the same
ones reuses the cache at once, and any other teacher, data or k gets a cache of its own.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hpd.common import ranks
from hpd.common.errors import HpdError
from hpd.common.settings import ScoreSettings, Settings
from hpd.storage import encodings
from hpd.storage.logit_cache import LEARN_POSITIONS, CacheRoot, LogitCache, ScoredSequence, cache_key, key_id
from hpd.storage.sequences import SequenceStore
from hpd.storage.shard_writer import ShardedWrite

from . import batching, hf_models
from .artifacts import Cache, Sequences, StageKind, Teacher
from .cache_rows import Timer, score_batch  # the teacher pass's math, in torch only

DEFAULT_K = 64


def run(ctx, settings: Settings, teacher: Teacher, generate: Sequences) -> Cache:
    cfg = settings.score
    gen = generate
    encoding = encodings.get(cfg.encoding)  # a known one, with k >= 2 unless fp16 (config.validate)
    # sampled targets keep `draws` slots per position (the distinct drawn ids), whatever top_k says
    k = encoding.head + encoding.draws if encoding.sampled else cfg.top_k or min(DEFAULT_K, teacher.vocab_size)
    temperature = cfg.temperature
    if not encoding.sampled and not 1 <= k <= teacher.vocab_size:
        raise HpdError(
            f"score.top_k={k} must be between 1 and the teacher's vocabulary size ({teacher.vocab_size}); lower it"
        )
    if encoding.head >= teacher.vocab_size:  # (more draws than the rest of the vocabulary are fine: slots stay empty)
        raise HpdError(
            f"score.encoding={encoding.label} keeps a head of {encoding.head} tokens, which leaves nothing "
            f"to draw from the teacher's vocabulary of {teacher.vocab_size}; keep fewer than "
            f"{teacher.vocab_size}, e.g. sampled:{teacher.vocab_size // 4}+{encoding.draws}"
        )
    # Refreshed sequences carry their origin (round, student checkpoint): it is part of their cache's key.
    key = cache_key(
        teacher=teacher.model_fingerprint,
        tokenizer=teacher.tokenizer_fingerprint,
        data=gen.fingerprint,
        top_k=k,
        temperature=temperature,
        encoding=encoding.spec,
        origin=gen.origin,
        engine=cfg.engine,
        dtype=teacher.dtype,
    )
    root = CacheRoot(ctx.cache_root)
    with ranks.held_by_rank0(ctx, root.lock(key)):  # under torchrun the ranks build it together
        cache = root.find(key)
        if cache is not None:
            ctx.log(f"[{ctx.stage}] cache {cache.id} already holds this teacher, data and k: reusing it")
        else:
            cache, timing = _build(ctx, dataclasses.replace(cfg, top_k=k), teacher, gen, root, key)
            ctx.measure(**timing)  # seconds per phase of this build
        if ctx.rank == 0:
            root.record_use(cache, ctx.run_name)
    m = cache.manifest
    return Cache(
        cache=str(cache.dir),
        cache_id=cache.id,
        fingerprint=key_id(key),
        top_k=k,
        encoding=encoding.name,
        sequences=m["rows"],
        tokens=m["tokens"],
        bytes=cache.bytes,
        bytes_per_token=round(cache.bytes / max(m["tokens"], 1), 2),
    )


def _build(ctx, cfg: ScoreSettings, teacher: Teacher, gen: Sequences, root: CacheRoot, key: dict) -> LogitCache:
    store = SequenceStore(Path(gen.sequences))
    if cfg.engine == "vllm":  # vLLM loads the teacher itself: no second copy in this process
        from . import vllm_engine

        llm, model, pad = vllm_engine.load(teacher.model_dir, scoring=True, top_k=cfg.top_k), None, None
    else:
        model, tokenizer = hf_models.load_teacher(teacher)
        model = hf_models.to_accelerator(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    code = encodings.get(key["encoding"])
    draws, head = code.draws, code.head
    seed_base = int(key_id(key), 16) % (1 << 40)  # a sequence's draws depend on the cache and the sequence alone

    def score(batch, batch_plens, batch_ids, timer):
        if model is None:
            with timer("forward"):
                return vllm_engine.score(llm, batch, batch_plens, top_k=cfg.top_k, temperature=cfg.temperature)
        return score_batch(
            model,
            batch,
            batch_plens,
            top_k=cfg.top_k,
            temperature=cfg.temperature,
            pad_id=pad,
            timer=timer,
            draws=draws,
            head=head,
            seeds=[seed_base * 1_000_003 + int(s) for s in batch_ids],
        )

    def learn_order():  # the ids the cache stores for its first positions (only when no order is stored yet)
        ids, positions, start = [], 0, 0
        while positions < LEARN_POSITIONS and start < len(store):  # the first sequences, a shard's worth at a time
            seq_ids, plens, seqs = store.range(start, min(start + cfg.shard_size, len(store)))
            n = (
                int(np.searchsorted(np.cumsum([len(x) - p for x, p in zip(seqs, plens)]), LEARN_POSITIONS - positions))
                + 1
            )
            for part in batching.length_batches([len(x) for x in seqs[:n]], cfg.batch_size, cfg.batch_tokens):
                for sc in score(
                    [seqs[i] for i in part], [int(plens[i]) for i in part], [seq_ids[i] for i in part], Timer()
                ):
                    ids.append(sc["topk_ids"][sc["topk_logprobs"] > -np.inf])  # the stored slots
                    positions += len(sc["target_logprob"])
            start += cfg.shard_size
        return np.concatenate(ids)

    size = cfg.shard_size
    num_shards = -(-len(store) // size)
    out = ShardedWrite(
        ctx,
        lambda rank: root.writer(
            key,
            shard_size=size,
            num_sequences=len(store),
            vocab_size=teacher.vocab_size,
            rank=rank,
            provenance={
                "teacher": teacher.model_dir,
                "sequences": gen.sequences,
                "sequences_source": gen.source,
                "run": ctx.run_name,
                "origin": gen.origin,
            },
            learn_order=learn_order,
        ),
        num_shards,
    )
    if out.resumed:
        ctx.log(f"[{ctx.stage}] resuming: {out.resumed} of {num_shards} shards already published")
    # A shard is encoded, compressed and written by a background thread while the teacher scores the next
    # one (zstd, Arrow and file I/O release the GIL); at most one shard waits, so memory stays bounded.
    timer, pending, t0 = Timer(), None, time.perf_counter()
    with (
        tqdm(
            total=len(store),
            desc=f"teacher scoring ({ctx.stage})",
            unit="seq",
            initial=out.resumed * size,
            disable=ctx.rank > 0,
        ) as bar,
        ThreadPoolExecutor(max_workers=1) as io,
    ):  # the bar closes (ends its line) even on an error
        for shard in out.todo():
            seq_ids, plens, seqs = store.range(shard * size, min((shard + 1) * size, len(store)))
            rows = [None] * len(seqs)  # in the shard's order, whatever order the batches take
            for part in batching.length_batches([len(s) for s in seqs], cfg.batch_size, cfg.batch_tokens):
                batch, batch_plens = [seqs[i] for i in part], [int(plens[i]) for i in part]
                scored = score(batch, batch_plens, [seq_ids[i] for i in part], timer)
                for i, sc in zip(part, scored):
                    rows[i] = ScoredSequence(seq_id=int(seq_ids[i]), input_ids=seqs[i], **sc)
                bar.update(len(scored))
            with timer("write_wait"):
                if pending is not None:
                    pending.result()
            pending = io.submit(_timed_write, out, shard, rows, timer)
        with timer("write_wait"):
            if pending is not None:
                pending.result()
    out.finish()
    wall = time.perf_counter() - t0
    timing = {"wall_s": round(wall, 4), **{f"{k}_s": round(v, 4) for k, v in timer.items()}}
    # everything that is not the teacher's forward pass, as a share of it (the target is <= 10%);
    # computed from the figures as published so that a reader can check it
    forward = timing.get("forward_s", 0.0)
    timing["overhead"] = round((timing["wall_s"] - forward) / max(forward, 1e-9), 4)
    return LogitCache(root.path_for(key)), timing


def _timed_write(out: ShardedWrite, shard: int, rows: list, timer: Timer) -> None:
    with timer("write"):
        out.write(shard, rows)


STAGE = StageKind("score", run, Cache, distributed=True)  # ranks share the shards
