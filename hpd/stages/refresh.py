"""refresh: the current student samples responses for a few training prompts (an on-policy refresh).

Each round draws its own random subset of the offline sequences' prompts (refresh.prompt_fraction) and the
previous round's student samples refresh.samples_per_prompt responses for each. The output is a sequence
store of its own, tagged with the round and the student checkpoint it came from; the rescore stage then
scores it into a cache keyed by that origin, so the offline sequences and their cache are never touched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hpd.common.errors import HpdError
from hpd.common.settings import Settings
from hpd.storage.sequences import SequenceStore

from . import hf_models, sampling
from .artifacts import Sequences, StageKind, Student


def choose_prompts(store: SequenceStore, fraction: float, seed: int, round_: int) -> list[list[int]]:
    """The prompt tokens of a random `fraction` of the stored sequences, duplicates dropped, in store order."""
    n = max(1, round(fraction * len(store)))
    picked = np.sort(np.random.default_rng([seed, round_]).choice(len(store), size=n, replace=False))
    prompts, seen = [], set()
    for seq_id in picked:
        ids, plen = store.get(int(seq_id))
        key = ids[:plen].tobytes()
        if key not in seen:
            seen.add(key)
            prompts.append(ids[:plen].tolist())
    return prompts


def run(ctx, settings: Settings, generate: Sequences, student: Student) -> Sequences:
    cfg, round_, seed = settings.refresh, ctx.round, student.seed  # the student's seed: seeds vary its samples too
    store = SequenceStore(Path(generate.sequences))
    prompts = choose_prompts(store, cfg.prompt_fraction, seed, round_)
    model, tokenizer = hf_models.load_causal_lm(student.student_dir)
    model = hf_models.to_accelerator(model)
    room = hf_models.context_length(model) - max(len(p) for p in prompts)
    max_new = cfg.max_new_tokens or room
    if not 0 < max_new <= room:
        raise HpdError(
            f"refresh.max_new_tokens={max_new} does not fit the student's context of "
            f"{hf_models.context_length(model)} after the longest prompt; lower it (0 = fill the context)"
        )
    origin = {"round": round_, "student": student.fingerprint}
    ctx.log(
        f"[{ctx.stage}] student of round {round_ - 1} samples {cfg.samples_per_prompt} responses for "
        f"{len(prompts)} prompts ({cfg.prompt_fraction:.0%} of {len(store)})"
    )
    final = ctx.stage_dir() / "sequences"
    meta = {
        "config": {**dataclasses.asdict(cfg), "round": round_},
        "origin": origin,
        "prompts_from": generate.fingerprint,
        "seed": seed,
    }
    manifest = sampling.sample_to_store(
        ctx,
        model,
        tokenizer,
        prompts,
        final,
        meta,
        samples_per_prompt=cfg.samples_per_prompt,
        prompts_per_shard=cfg.shard_size,
        max_new_tokens=max_new,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=seed * 1009 + round_,
        desc=ctx.stage,
        engine=cfg.engine,
    )
    return Sequences(
        sequences=str(final),
        source=f"round {round_} samples of student {student.fingerprint[:12]}",
        origin=origin,
        count=manifest["rows"],
        tokens=sum(s["tokens"] for s in manifest["shards"]),
        fingerprint=manifest["fingerprint"],
    )


STAGE = StageKind("refresh", run, Sequences, distributed=True)  # ranks share the shards
