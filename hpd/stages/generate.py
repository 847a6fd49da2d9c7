"""generate: prompts become token sequences (prompt + response) for the teacher to score.

Responses are either the data set's own (off-policy data, as the paper does for math) or N samples per
prompt from the teacher (SeqKD-style). Sequences are published in shards, so an interrupted teacher
sampling run resumes after its last shard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hpd.common.errors import HpdError
from hpd.common.settings import GenerateSettings, Settings
from hpd.storage import sequences as seqstore
from hpd.storage.fingerprint import file_digest
from hpd.storage.shard_writer import ShardedWrite

from . import batching, hf_models, sampling
from .artifacts import Sequences, StageKind, TaskData, Teacher
from .prompts import read_prompts

VERSION = 2  # 2: sequences in zstd-framed shards


def run(ctx, settings: Settings, data: TaskData, teacher: Teacher) -> Sequences:
    cfg = settings.generate
    source = cfg.prompts or data.train
    from_data = cfg.mode == "dataset"
    prompts, responses = read_prompts(
        source, cfg.prompt_field, cfg.response_field if from_data else None, cfg.num_prompts
    )
    model, tokenizer = hf_models.load_teacher(teacher)
    model = hf_models.to_accelerator(model)
    context = hf_models.context_length(model)
    pairs = [
        batching.encode_pair(tokenizer, p, r)
        for p, r in zip(prompts, responses if from_data else [None] * len(prompts))
    ]
    pairs, max_new, truncated = _fit_context(pairs, context, cfg, source, from_data)
    if truncated:
        ctx.log(
            f'warning: generate.too_long="truncate": {truncated} of {len(pairs)} sequences cut to the '
            f"teacher's context of {context} tokens"
        )

    final = ctx.stage_dir("generate") / "sequences"
    meta = {
        "config": dataclasses.asdict(cfg),
        "teacher": teacher.fingerprint,
        "source": file_digest(source) if Path(source).is_file() else str(source),
        "seed": ctx.seed,
    }
    if from_data:
        manifest = _write_dataset(ctx, final, meta, pairs, cfg.shard_size)
    else:
        manifest = sampling.sample_to_store(
            ctx,
            model,
            tokenizer,
            [p for p, _ in pairs],
            final,
            meta,
            samples_per_prompt=cfg.samples_per_prompt,
            prompts_per_shard=cfg.shard_size,
            max_new_tokens=max_new,
            temperature=cfg.temperature,
            batch_size=cfg.batch_size,
            seed=ctx.seed,
            desc="generate",
            engine=cfg.engine,
            batch_tokens=cfg.batch_tokens,
            sort=cfg.length_sorted,
            static_cache=cfg.static_cache,
        )
    tokens = sum(s["tokens"] for s in manifest["shards"])
    return Sequences(
        sequences=str(final),
        source=str(source),
        count=manifest["rows"],
        tokens=tokens,
        truncated=truncated,
        fingerprint=manifest["fingerprint"],
        prompt_field=cfg.prompt_field,
    )


def _fit_context(pairs: list, context: int, cfg: GenerateSettings, source, from_data: bool) -> tuple[list, int, int]:
    """(pairs, max_new_tokens, number cut) with every sequence inside the teacher's context: refused, or with
    generate.too_long = "truncate" cut (dataset mode: the response's end; teacher mode: fewer new tokens)."""
    truncate, max_new, cut = cfg.too_long == "truncate", cfg.max_new_tokens, 0
    for i, (p, r) in enumerate(pairs):
        n = len(p) + (len(r) if from_data else max_new)
        if n <= context:
            continue
        room = context - len(p)
        if not truncate or room < 1:
            what = "prompt + response" if from_data else "prompt + generate.max_new_tokens"
            fix = (
                "its prompt alone fills the context; shorten or remove it"
                if room < 1
                else 'shorten it, lower generate.max_new_tokens, or set generate.too_long="truncate"'
            )
            raise HpdError(
                f"{source} row {i + 1}: {what} is {n} tokens, longer than the teacher's context of {context}; {fix}"
            )
        cut += 1
        if from_data:
            pairs[i] = (p, r[:room])
        else:
            max_new = room
    return pairs, max_new, cut


def _write_dataset(ctx, final: Path, meta: dict, pairs: list, per_shard: int) -> dict:
    out = ShardedWrite(
        ctx,
        lambda rank: seqstore.SequenceWriter(final, {**meta, "shard_size": per_shard}, rank),
        -(-len(pairs) // per_shard),
    )
    for shard in out.todo():
        lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(pairs))
        out.write(
            shard,
            seqstore.rows_table(
                range(lo, hi),
                range(lo, hi),
                [len(pairs[i][0]) for i in range(lo, hi)],
                [pairs[i][0] + pairs[i][1] for i in range(lo, hi)],
            ),
        )
    return out.finish()


STAGE = StageKind("generate", run, Sequences, version=VERSION, distributed=True)  # ranks share the shards
