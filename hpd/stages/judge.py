"""judge: a value function gives every sequence of a store one number (value-guided distillation, [value]).

The offline sequences (judge) or a round's refreshed samples (judge-r) are judged by the verifier, a reward
model or the teacher's own log-prob of the response (hpd/stages/value_functions.py), shard by shard into a value store
beside them (hpd/storage/value_store.py): a judging run killed midway resumes after its last published shard. The
distill stages read the values and apply value.select / weighting / advantage; those settings are not part of
this stage's key, so trying another selection reuses the values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from hpd.common.settings import GenerateSettings, Settings, ValueSettings
from hpd.storage import value_store as valuestore
from hpd.storage.logit_cache import LogitCache
from hpd.storage.sequences import SequenceStore
from hpd.storage.shard_writer import ShardedWrite

from . import value_functions as fn
from .artifacts import Cache, Sequences, StageKind, TaskData, Teacher, Values
from .prompts import prompt_rows
from .tasks import TASKS

# The [value] keys that act on the values at training time, not on judging (graph: the judge stages' unkeyed).
GUIDANCE_KEYS = tuple(f"value.{k}" for k in ("judge", "select", "keep", "threshold", "weighting", "tau", "advantage"))


def value_function(
    cfg: ValueSettings,
    gen: GenerateSettings,
    data: TaskData,
    teacher: Teacher,
    score: Cache | None,
    execute_code: bool = False,
):
    """(callable(seq_ids, prompts, responses) -> values, identity for the store's key). execute_code: the run's
    opt-in to running the prompts' test code (code.execute), for the verifier on HumanEval-style prompts."""
    from transformers import AutoTokenizer

    name = cfg.function
    if name == "teacher":
        judge = fn.TeacherValue(LogitCache(Path(score.cache)), cfg.teacher_reduce)
        return (lambda ids, p, r: judge.of(ids)), {
            "function": name,
            "cache": score.cache_id,
            "reduce": cfg.teacher_reduce,
        }
    tok = AutoTokenizer.from_pretrained(teacher.model_dir)
    if name == "reward_model":
        from .hf_models import model_fingerprints

        judge = fn.RewardModel(cfg.reward_model, tok, cfg.batch_size)
        return (lambda ids, p, r: judge(p, r)), {"function": name, "model": model_fingerprints(Path(cfg.reward_model))}
    source = gen.prompts or data.train  # the prompts the sequences answer, with what the checker needs
    rows = prompt_rows(source, gen.prompt_field, gen.num_prompts)
    judge = fn.Verifier(
        tok,
        rows,
        gen.prompt_field,
        TASKS.get(data.builtin) if not gen.prompts else None,
        cfg.timeout,
        execute_code=execute_code,
    )
    return (lambda ids, p, r: judge(p, r)), {"function": name, "task": data.builtin, "prompts": str(source)}


def run(
    ctx, settings: Settings, data: TaskData, teacher: Teacher, generate: Sequences, score: Cache | None = None
) -> Values:
    cfg = settings.value
    store = SequenceStore(Path(generate.sequences))
    judge, identity = value_function(cfg, settings.generate, data, teacher, score, ctx.execute_code)
    final = ctx.stage_dir() / "values"
    meta = {"sequences": store.fingerprint, **identity}
    out = ShardedWrite(ctx, lambda rank: valuestore.ValueWriter(final, meta, rank), store.shards.num_shards)
    ctx.log(f"[{ctx.stage}] {cfg.function} judges {len(store)} sequences of {generate.source}")
    for shard in tqdm(list(out.todo()), desc=ctx.stage, disable=store.shards.num_shards < 2 or ctx.rank > 0):
        seq_ids, plens, seqs = store.shard_rows(shard)
        values = judge(seq_ids, [s[:p] for s, p in zip(seqs, plens)], [s[p:] for s, p in zip(seqs, plens)])
        fn.check_finite(seq_ids, np.asarray(values, np.float64), cfg.function)  # before anything is stored
        out.write(shard, valuestore.values_table(seq_ids, store.prompt_index(shard), values))
    manifest = out.finish()
    _, _, values = valuestore.ValueStore(final).arrays()
    return Values(
        values=str(final),
        function=cfg.function,
        count=len(values),
        mean=float(np.mean(values)),
        fingerprint=manifest["fingerprint"],
    )


STAGE = StageKind("judge", run, Values, distributed=True)  # ranks share the shards
