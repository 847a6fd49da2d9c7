"""distill: train a student from teacher caches with any method of hpd/stages/losses.py; no teacher in memory.

Round 0 (the stage "distill") trains a fresh student (or a local HF directory) on the offline cache. Round
r >= 1 ("distill-r", see hpd/pipeline/graph.py) continues from the previous round's student on a mixture: each
batch holds rounds.refresh_share of the round's refreshed (student-sampled, teacher-rescored) sequences and
the rest offline ones, each source with its own loss (on-policy losses such as opd only make sense on the
refreshed ones). Training is the HF Trainer (checkpoints, resume with the same data order, logging); a
collator joins each token batch with its cache rows by (source, sequence id) and checks every row's CRC.

distill.teacher_source = "online" is the way TRL and the HPD reference code work, kept as the baseline the
cache is measured against (bench/cached_vs_online.py): the teacher sits in memory next to the student and
gives full-vocabulary logits for every batch; data, student, schedule and losses are the same. It needs no
score stage (hpd/pipeline/graph.py leaves it out) and trains round 0 only.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from hpd.common.errors import HpdError
from hpd.common.settings import DistillSettings, Settings
from hpd.storage.cache_batch import check_tokens
from hpd.storage.fingerprint import digest
from hpd.storage.logit_cache import CacheBatch, CacheMismatchError, LogitCache
from hpd.storage.sequences import SequenceStore

from . import heads, hf_models, student_models, token_bridge
from .artifacts import StageKind, Student, TaskData, Teacher
from .losses import (
    METHOD_PARAMS,
    ON_POLICY_ONLY,
    REWARD_METHODS,
    CachedTargets,
    SampledTargets,
    StudentHead,
    TeacherLogits,
    distill_loss,
    response_positions,
)
from .losses import teacher_signal as signal_of
from .metrics import answer_accuracy, generate_texts, heldout_report, heldout_rows, teacher_forced
from .prompts import read_prompts
from .sources import Source, StudentPlan, open_sources, training_set
from .tasks import TASKS
from .training import (
    PeriodicEval,
    ResponseCollator,
    check_finite_loss,
    job_dir,
    peak_rss_mb,
    publish_model,
    rss_mb,
    train,
    training_arguments,
)


# -- the teacher signal of a batch: cache rows, or the online teacher's logits ------------------------------
class CacheCollator(ResponseCollator):
    """Pads a token batch and attaches each row's cache entry, looked up by (source, seq_id), as `teacher`."""

    def __init__(self, pad_id: int, *caches: LogitCache):
        super().__init__(pad_id)
        self.caches = caches
        if len({c.sampled for c in caches}) > 1:
            raise HpdError(
                f"the caches of one mixture mix sampled targets and top-k "
                f"({', '.join(c.id for c in caches)}); score them with the same score.encoding"
            )
        if len({c.k for c in caches}) > 1:
            raise HpdError(
                f"the caches of one mixture have different k ({', '.join(str(c.k) for c in caches)}); "
                f"score them with the same score.top_k"
            )

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        source = torch.tensor([r.get("source", 0) for r in rows])
        parts = []
        for s, cache in enumerate(self.caches):
            idx = (source == s).nonzero()[:, 0].tolist()
            if not idx:
                continue
            try:
                parts.append(
                    (
                        idx,
                        cache.batch(
                            [rows[i]["seq_id"] for i in idx],
                            input_ids=[rows[i]["input_ids"] for i in idx],
                            length=batch["input_ids"].shape[1],
                        ),
                    )
                )
            except (KeyError, CacheMismatchError) as e:
                raise HpdError(f"cache {cache.id} does not match the training sequences: {e.args[0]}") from None
        return {**batch, "teacher": CacheBatch.stack(parts, len(rows)), "source": source}


class BridgeCollator(ResponseCollator):
    """Across tokenizers: pads the student's tokens and carries each row's cache entry (looked up by seq_id, checked
    against the teacher's tokens it was scored on) into the student's vocabulary and positions (token_bridge). An
    ensemble's teachers each through their own bridge, then mixed by `weights` (token_bridge.mixed_batch). A
    response token with no teacher target (past the teachers' text) is not trained on."""

    def __init__(self, pad_id: int, caches: list, bridges: list, weights=(1.0,), weighting="fixed", vocab: int = 0):
        super().__init__(pad_id)
        self.caches, self.bridges, self.weights, self.weighting, self.vocab = caches, bridges, weights, weighting, vocab
        self.k = max(c.k for c in caches)  # (a teacher of a small vocabulary may list fewer candidates)

    def _teacher(self, t: int, rows: list[dict], length: int) -> CacheBatch:
        cache, bridge, sfx = self.caches[t], self.bridges[t], f"_{t}" if t else ""
        try:  # the rows the teacher scored, checked against its tokens (the batch holds the student's)
            scored = [cache.rows(r["seq_id"]) for r in rows]
            check_tokens(scored, [r["teacher_ids" + sfx] for r in rows], cache.id)
        except (KeyError, CacheMismatchError) as e:
            raise HpdError(f"cache {cache.id} does not match the training sequences: {e.args[0]}") from None
        aligned = [
            token_bridge.Aligned(
                r["input_ids"], r["prompt_len"], *(np.asarray(r[k + sfx]) for k in ("first", "offset", "last"))
            )
            for r in rows
        ]
        return bridge.batch(
            scored,
            [r["teacher_ids" + sfx] for r in rows],
            [r["teacher_prompt_len" + sfx] for r in rows],
            aligned,
            length,
            cache.k,
        )

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        length = batch["input_ids"].shape[1]
        parts = [self._teacher(t, rows, length) for t in range(len(self.caches))]
        teacher = (
            parts[0]
            if len(parts) == 1
            else token_bridge.mixed_batch(parts, self.weights, self.vocab, self.k, self.weighting)
        )
        batch["labels"][:, 1:][~teacher.mask[:, :-1]] = -100
        return {**batch, "teacher": teacher, "source": torch.zeros(len(rows), dtype=torch.long)}


class OnlineTeacher:
    """distill.teacher_source = "online": the teacher in memory gives full-vocabulary logits for each batch."""

    def __init__(self, model):
        self.model = model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict) -> TeacherLogits:
        if self.model.device != batch["input_ids"].device:
            self.model.to(batch["input_ids"].device)
        return TeacherLogits(self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def from_cache(batch: dict) -> CachedTargets | SampledTargets:
    """The batch's cache rows as the losses' teacher view: top-k (CacheBatch) or sampled targets (SampledBatch)."""
    return signal_of(batch.pop("teacher").to(batch["input_ids"].device))


def no_teacher(batch: dict) -> None:  # sft: no teacher signal at all
    return None


# -- the loss of a batch -----------------------------------------------------------------------------------
def mixture_loss(
    sources: list[Source], logits, labels, teacher, source, loss_params: dict, weight=None, advantage=None
):
    """Each source's loss on its own rows, averaged over all response tokens of the batch (so a token counts
    the same whichever source it came from). Diagnostics are prefixed by source name when there are several.
    `logits`: the student's [N, V] at the response positions (or its StudentHead there); `teacher`: the batch's
    teacher signal; `weight`, `advantage`: per row, from value guidance ([value]), or None."""

    def loss_of(src, lg, lb, t, rows=slice(None)):
        guided = {
            "sequence_weight": None if weight is None else weight[rows],
            "sequence_advantage": None if advantage is None or src.method not in REWARD_METHODS else advantage[rows],
        }
        return distill_loss(src.method, lg, lb, teacher=t, **guided, **loss_params.get(src.method, {}))

    if len(sources) == 1:
        return loss_of(sources[0], logits, labels, teacher)
    parts = []
    position_source = source[:, None].expand_as(labels)[response_positions(labels)]
    for s, src in enumerate(sources):
        rows = source == s
        if rows.any():
            sub = None if teacher is None else teacher.select(rows)
            parts.append((src, int(rows.sum()), *loss_of(src, logits[position_source == s], labels[rows], sub, rows)))
    tokens = sum(d["tokens"] for *_, d in parts)
    loss = sum(part * d["tokens"] for _, _, part, d in parts) / max(tokens, 1)
    diag = {"tokens": tokens}
    for src, n, _, d in parts:
        diag.update({f"{src.name}_sequences": n, **{f"{src.name}_{k}": v for k, v in d.items()}})
    return loss, diag


# What to do about a NaN or inf loss or gradient (hpd/stages/training.py stops training at the first one).
NON_FINITE_HINT = (
    "lower distill.learning_rate (rounds.learning_rate in a round); if it persists, the method and "
    "cache encoding named here are a bug to report"
)


class DistillTrainer(Trainer):
    """The HF Trainer with a distillation loss (like TRL's GKDTrainer: compute_loss, and log for its diagnostics).
    `teacher_signal(batch)` takes the batch's teacher signal out of it (from_cache, OnlineTeacher, no_teacher)."""

    def __init__(self, *args, sources: list[Source], loss_params: dict, teacher_signal, fused_head=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources, self.loss_params, self.teacher_signal = sources, loss_params, teacher_signal
        self.fused_head = fused_head
        # how errors name the loss: "rkl", or per source "offline fkl + refresh opd"
        self.loss_name = " + ".join(f"{s.name} {s.method}" if len(sources) > 1 else s.method for s in sources)
        self._diag: list[dict] = []
        self._last_log = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, source = inputs.pop("labels"), inputs.pop("source", None)
        weight, advantage = inputs.pop("weight", None), inputs.pop("advantage", None)
        teacher = self.teacher_signal(inputs)
        # Student logits only where a loss is taken: the [B, L, V] logits and their gradient were most of a
        # step's memory (response positions are a fraction of a padded batch; prompts take none).
        keep = response_positions(labels)
        if self.fused_head:  # nor even there: the head runs inside the loss, a chunk of positions at a time
            with heads.hidden_at(model, keep) as head:
                outputs = model(**inputs)
            student = StudentHead(outputs.logits, head.weight, head.bias)
        else:
            with heads.head_only_at(model, keep):
                outputs = model(**inputs)
            student = outputs.logits
        loss, diag = mixture_loss(self.sources, student, labels, teacher, source, self.loss_params, weight, advantage)
        check_finite_loss(loss, self.state.global_step + 1, f"the {self.loss_name} loss", NON_FINITE_HINT)
        self._diag.append(diag)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """Adds the mean of the loss diagnostics since the last log line (HPD's sample statistics among them)."""
        if self._diag and "loss" in logs:
            keys = {k for d in self._diag for k in d if k != "tokens"}
            tokens = sum(d["tokens"] for d in self._diag)
            now = time.perf_counter()
            means = {k: float(np.mean([d[k] for d in self._diag if k in d])) for k in keys}
            logs = {**logs, **means, "tokens": tokens, "tokens_per_s": tokens / max(now - self._last_log, 1e-9)}
            self._diag, self._last_log = [], now
        super().log(logs, *args, **kwargs)


# -- the student it starts from ----------------------------------------------------------------------------
# how many of the run's first training sequences the block influence of the teacher's layers is read on
INFLUENCE_SEQUENCES = 16


def _new_student(
    cfg: DistillSettings, teacher: Teacher, teacher_tok, seed: int, home: Path, longest: int = 0, store=None
):
    """(a fresh student or the given one, its tokenizer). `longest`: the longest sequence it must read, when other
    teachers' sequences may be longer than this run's teacher's context (a fresh GPT-2 is made long enough).
    `store`: the training sequences, the first of which the teacher's layers are weighed on (layer_choice =
    "influence")."""
    if cfg.student_path:
        model, tok = hf_models.load_causal_lm(hf_models.local_model(cfg.student_path, home, "distill.student_path"))
        if model.get_output_embeddings().weight.shape[0] < len(tok):
            raise HpdError(
                f"the student's output layer has fewer rows than its tokenizer has tokens "
                f"({len(tok)}); resize its embeddings first"
            )
        return model, tok
    torch.manual_seed(seed)
    if cfg.student_init == "teacher-layers":
        model, _ = hf_models.load_causal_lm(teacher.model_dir)
        influence = None
        if cfg.layer_choice == "influence":
            influence = student_models.block_influence(model, store.range(0, min(len(store), INFLUENCE_SEQUENCES))[2])
        student, kept = student_models.keep_layers(model, cfg.n_layer, influence)
        student.config.hpd_kept_layers = kept  # which of the teacher's layers it was made of, in its config.json
        return student, teacher_tok
    if cfg.student_init == "teacher-shape":
        return student_models.same_shape_fresh(
            hf_models.check_causal_lm(teacher.model_dir), n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head
        ), teacher_tok
    context = hf_models.context_length(hf_models.check_causal_lm(teacher.model_dir))
    if longest > context:
        context = 1 << (longest - 1).bit_length()
    return student_models.new_gpt2(
        teacher_tok, n_positions=context, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head
    ), teacher_tok


def _bridges(plan: StudentPlan, sources: list[Source], model, teacher_tok, student_tok, cache_vocab: int, artifacts):
    """Token bridges when the student reads other tokens than the caches' (another tokenizer, or the same one with
    a head smaller than the teacher's padded one): one per cache, this run's first, then an ensemble's other
    teachers' (kept apart because their tokenizers differ); None when the cache's ids are the student's. Checked
    here, before any training: what a bridge cannot carry."""
    from transformers import AutoTokenizer

    rows = model.get_output_embeddings().weight.shape[0]
    src = sources[0]
    if not src.apart and teacher_tok.get_vocab() == student_tok.get_vocab() and rows >= cache_vocab:
        return None
    what = (
        "the teachers' tokenizers differ"
        if src.apart
        else "the student's tokenizer differs from the teacher's"
        if rows >= cache_vocab
        else f"the student's head has {rows} rows, the teacher's {cache_vocab}"
    )
    if plan.previous or plan.online or len(sources) > 1 or (len(plan.sources[0].caches) > 1 and not src.apart):
        raise HpdError(
            f"{what}: across tokenizers a student trains from offline caches of one set of texts (no refresh "
            f'rounds, routed teachers or distill.teacher_source="online"); distil from one teacher, or several as '
            f'teachers.mode="ensemble", with rounds.count = 0'
        )
    if src.method in ON_POLICY_ONLY:
        raise HpdError(f"{what}: {src.method} needs the student's own samples scored by the teacher in its tokens")
    if src.cache is not None and src.cache.sampled:
        raise HpdError(f'{what}: a sampled cache cannot be carried across tokenizers; score with encoding = "topk"')
    others = [AutoTokenizer.from_pretrained(artifacts[f"teacher@{run}"].model_dir) for run in plan.sources[0].linked][
        : len(src.apart)
    ]
    return [token_bridge.Bridge(t, student_tok) for t in (teacher_tok, *others)]


# The teacher's greedy replies to held-out prompts that have none (chat and code prompts), as learning-curve
# references: at most this many tokens each.
CURVE_REPLY_TOKENS = 128


def _learning_curve(cfg: DistillSettings, data: TaskData, tok, before: dict, teacher: Teacher) -> list:
    """Every distill.curve_every steps: held-out accuracy (a task that checks answers), NLL and KL to the teacher (the
    teacher loaded for the measurement and let go after, so it takes no memory while the student trains)."""
    if not (cfg.curve_every and data.builtin):
        return []
    task, rows = TASKS[data.builtin], heldout_rows(data.heldout, cfg.curve_examples)
    references = []

    def measure(m):
        t, t_tok = hf_models.load_teacher(teacher)
        if not references:  # once: the held-out replies, or the teacher's own where the rows have none
            replies = (
                [None] * len(rows)
                if "response" in rows[0]
                else [
                    g[0]
                    for g in generate_texts(t, t_tok, [r["prompt"] for r in rows], max_new_tokens=CURVE_REPLY_TOKENS)
                ]
            )
            references.extend(r if g is None else {**r, "response": g} for r, g in zip(rows, replies))
        r = answer_accuracy(m, tok, references, task) if hasattr(task, "is_correct") else {}
        same_tokens = t_tok.get_vocab() == tok.get_vocab()  # KL to the teacher is per token: one vocabulary only
        forced = teacher_forced(m, tok, references, t if same_tokens else None)
        return {
            **r,
            "nll": forced["response_nll_nats"],
            **({"kl": forced["kl_to_teacher_nats"]} if same_tokens else {}),
        }

    return [PeriodicEval(measure, cfg.curve_every, before.get("student_steps", 0), before.get("input_tokens", 0))]


# -- the recipe --------------------------------------------------------------------------------------------
def run(ctx, cfg: Settings, plan: StudentPlan, artifacts: dict) -> Student:
    """Train one student as its plan says (pipeline/graph.py): a new (or given) student, or the previous stage's,
    on the plan's sources, opened from `artifacts` (every input stage's artifact, by stage name), then judge it on
    held-out data and publish it."""
    from transformers import AutoTokenizer

    d = cfg.distill
    rss_start = rss_mb()  # before any model is loaded: what training adds is measured from here
    seed = ctx.seed * 7919 + d.seed
    data, teacher = artifacts["data"], artifacts["teacher"]
    previous = artifacts[plan.previous] if plan.previous else None
    tok = AutoTokenizer.from_pretrained(teacher.model_dir)
    sources, dropped = open_sources(plan, artifacts, cfg.value)
    # a new student of routed teachers: their sequences may be longer than this run's (a round's refreshed samples
    # were drawn to fit the student, so they are not read again here)
    others = sources[1:] if previous is None else []
    longest = max((len(x) for s in others for x in s.store.range(0, len(s.store))[2]), default=0)
    model, student_tok = (
        _new_student(d, teacher, tok, seed, ctx.home, longest, sources[0].store)
        if previous is None
        else hf_models.load_causal_lm(previous.student_dir)
    )
    bridges = _bridges(plan, sources, model, tok, student_tok, teacher.vocab_size, artifacts)
    cut = ctx.stage_dir() / "initial"  # a student cut from its teacher, as cut: eval judges it beside the trained one
    if previous is None and d.student_init == "teacher-layers" and not d.student_path and ctx.rank == 0:
        if not (cut / "config.json").is_file():
            publish_model(model, tok, cut.with_name(".tmp-initial"), cut, {})
    if longest > hf_models.context_length(model):
        raise HpdError(
            f"the student's context ({hf_models.context_length(model)} tokens) is shorter than the other "
            f"teachers' longest sequence ({longest}); use a student with a longer context"
        )
    job = digest(
        {
            "cfg": {s: dataclasses.asdict(cfg.section(s)) for s in cfg.sections() if cfg.section(s)},
            "plan": dataclasses.asdict(plan),
            "seed": seed,
            "world": ctx.world_size,
            "inputs": {name: a.fingerprint for name, a in artifacts.items()},
        }
    )
    out = ctx.stage_dir() / "student"
    tmp = job_dir(out.with_name(".tmp-student"), job) if ctx.rank == 0 else out.with_name(".tmp-student")
    ctx.barrier()  # rank 0 has cleared another job's leftovers

    # the teacher signal: cache rows joined to each batch, the teacher online, or none (sft)
    caches = [s.cache for s in sources if s.cache is not None]
    pad_id = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    if bridges is not None and caches:
        collator = BridgeCollator(
            pad_id,
            [caches[0], *sources[0].apart],
            bridges,
            plan.sources[0].weights or (1.0,),
            plan.weighting,
            model.get_output_embeddings().weight.shape[0],
        )
        signal, where = from_cache, "cache" if not sources[0].apart else "caches mixed across tokenizers"
    elif bridges is not None:  # sft across tokenizers: the student's tokens of the teacher's text
        collator, signal, where = ResponseCollator(pad_id), no_teacher, "no teacher"
    elif caches:
        collator, signal, where = CacheCollator(tok.pad_token_id, *caches), from_cache, "cache"
    elif plan.online and any(s.method != "sft" for s in sources):
        collator, signal, where = (
            ResponseCollator(tok.pad_token_id),
            OnlineTeacher(hf_models.load_teacher(teacher)[0]),
            "teacher online",
        )
    else:
        collator, signal, where = ResponseCollator(tok.pad_token_id), no_teacher, "no teacher"
    mix = ", ".join(
        f"{s.share:.0%} {s.name} ({s.method}, {f'cache {s.cache.id}' if s.cache else where}"
        f"{f', {len(s)} of {len(s.store)} kept by value' if s.guided else ''})"
        for s in sources
    )
    for name in dropped:
        ctx.log(
            f"[{ctx.stage}] warning: value.select kept none of the {name} sequences; this round trains on the "
            f"others alone"
        )
    ctx.log(
        f"[{ctx.stage}] a {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k-parameter student, "
        f"{plan.steps} steps on {mix}"
    )

    # Under DDP each rank reads every world_size-th planned batch: a step's global batch is world_size of them.
    planned = plan.steps * d.gradient_accumulation_steps if plan.planned else 0
    dataset = training_set(sources, d.batch_size, planned * ctx.world_size, seed * 1009 + ctx.round)
    if bridges is not None:  # the same texts in the student's tokens, each token placed in the teacher's
        seqs = artifacts[plan.sources[0].sequences]
        prompts = read_prompts(seqs.source, seqs.prompt_field, None)[0]  # prompt_index counts from its first row
        others = [
            (b, SequenceStore(Path(artifacts[f"generate@{run}"].sequences)))
            for b, run in zip(bridges[1:], plan.sources[0].linked)
        ]
        dataset, covered = token_bridge.student_dataset(bridges[0], dataset, sources[0].store, prompts, others)
        ctx.log(f"[{ctx.stage}] across tokenizers: {covered:.1%} of the student's response tokens get a teacher target")
    args = training_arguments(
        tmp / "checkpoints",
        steps=plan.steps,
        batch_size=d.batch_size,
        learning_rate=plan.learning_rate,
        warmup_steps=plan.warmup_steps,
        seed=seed,
        save_steps=d.checkpoint_steps,
        gradient_accumulation_steps=d.gradient_accumulation_steps,
        bf16=d.bf16,
        sequential=planned > 0,
        fsdp=d.fsdp,
        deepspeed=d.deepspeed,
        gradient_checkpointing=d.gradient_checkpointing,
    )
    loss_params = {s.method: {k: getattr(d, k) for k in METHOD_PARAMS.get(s.method, ())} for s in sources}
    before = previous.report if previous is not None else {}
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=_learning_curve(d, data, student_tok, before, teacher) if ctx.rank == 0 else [],
        sources=sources,
        loss_params=loss_params,
        teacher_signal=signal,
        fused_head=d.fused_head and not (d.fsdp or d.deepspeed) and heads.fused_head_works(model),
    )
    train(
        trainer,
        log=lambda line: ctx.log(f"[{ctx.stage}] {line}"),
        what=f"the {trainer.loss_name} loss",
        hint=NON_FINITE_HINT,
    )
    if ctx.rank > 0:
        return None  # rank 0 judges and publishes the student

    model.eval()
    sequences = plan.steps * d.batch_size * d.gradient_accumulation_steps * ctx.world_size
    # a given (or cut) student as it was before any distillation, for eval to judge beside it (through the rounds)
    initial = before.get("initial_dir") or (
        str(hf_models.local_model(d.student_path, ctx.home, "distill.student_path"))
        if d.student_path
        else str(cut)
        if (cut / "config.json").is_file()
        else ""
    )
    report = {
        **({"initial_dir": initial} if initial else {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "method": d.method,
        "round": ctx.round,
        "teacher_source": d.teacher_source,
        "mixture": {
            s.name: {
                "share": s.share,
                "method": s.method,
                "cache": s.cache.id if s.cache else None,
                **(
                    {"mixed_with": [c.id for c in s.apart], "weights": list(plan.sources[0].weights)} if s.apart else {}
                ),
                **({"kept": len(s), "judged": len(s.store)} if s.guided else {}),
            }
            for s in sources
        },
        "student_steps": before.get("student_steps", 0) + plan.steps,
        "train_sequences": before.get("train_sequences", 0) + sequences,
        "input_tokens": before.get("input_tokens", 0) + trainer.state.num_input_tokens_seen,
    }
    ctx.measure(
        train_seconds=trainer.state.log_history[-1].get("train_runtime"),
        rss_start_mb=rss_start,
        peak_rss_mb=peak_rss_mb(),
        input_tokens=trainer.state.num_input_tokens_seen,
        steps=plan.steps,
        parameters=report["parameters"],
    )
    if bridges is not None:
        report["teacher_target_share"] = covered
    if data.builtin:
        report.update(heldout_report(model, student_tok, data.heldout, d.eval_examples, TASKS[data.builtin]))
    publish_model(
        model, student_tok, tmp, out, {"training_log.json": trainer.state.log_history, "hpd-student.json": report}
    )
    return Student(
        student_dir=str(out),
        report=report,
        teacher_report=teacher.report,
        seed=seed,
        fingerprint=digest(hf_models.model_fingerprints(out)),
    )


STAGE = StageKind("distill", run, Student, distributed=True)  # the Trainer's DDP; rank 0 publishes
