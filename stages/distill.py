"""distill: train a student from teacher caches with any method of stages/losses.py; no teacher in memory.

Round 0 (the stage "distill") trains a fresh student (or a local HF directory) on the offline cache. Round
r >= 1 ("distill-r", see pipeline/graph.py) continues from the previous round's student on a mixture: each
batch holds rounds.refresh_share of the round's refreshed (student-sampled, teacher-rescored) sequences and
the rest offline ones, each source with its own loss (on-policy losses such as opd only make sense on the
refreshed ones). Training is the HF Trainer (checkpoints, resume with the same data order, logging); a
collator joins each token batch with its cache rows by (source, sequence id) and checks every row's CRC.

distill.teacher_source = "online" is the way TRL and the HPD reference code work, kept as the baseline the
cache is measured against (bench/cached_vs_online.py): the teacher sits in memory next to the student and
gives full-vocabulary logits for every batch; data, student, schedule and losses are the same. It needs no
score stage (pipeline/graph.py leaves it out) and trains round 0 only.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from pipeline.errors import HpdError
from storage.fingerprint import digest
from storage.logit_cache import CacheBatch, CacheMismatchError, LogitCache
from storage.sequences import SequenceStore

from . import modeling
from .evaluators import answer_accuracy, heldout_report, read_rows, teacher_forced
from .losses import METHOD_PARAMS, ON_POLICY_ONLY, distill_loss, response_positions
from .tasks import TASKS
from .training import (PeriodicEval, ResponseCollator, job_dir, peak_rss_mb, publish_model, rss_mb,
                       train_causal_lm)

DISTRIBUTED = True  # the Trainer's DDP under torchrun; rank 0 publishes (pipeline/distributed.py)

CACHE_FIELDS = ("topk_ids", "topk_logprobs", "target_logprob", "tail_logmass", "mask")


@dataclass
class Source:
    """One kind of training data: sequences, the teacher cache scored on them, and the loss they get."""
    name: str
    store: SequenceStore
    cache: LogitCache | None  # None: the teacher is online
    method: str
    share: float


def open_source(name: str, generate: dict, score: dict | None, method: str, share: float) -> Source:
    if name == "offline" and method in ON_POLICY_ONLY:
        raise HpdError(f"{method} needs on-policy sequences (the student's own samples), not offline ones; "
                       f"use it for refreshed sequences with rounds.method=\"{method}\" (e.g. --config hpd-opd)")
    store = SequenceStore(Path(generate["sequences"]))
    if score is None:
        return Source(name, store, None, method, share)
    cache = LogitCache(Path(score["cache"])).hold()  # `hpd cache gc` must not remove it while we train
    if cache.key["data"] != store.fingerprint or cache.num_sequences != len(store):
        raise HpdError(f"cache {cache.id} was scored on other sequences than {generate['sequences']}; rerun score")
    return Source(name, store, cache, method, share)


def mixture_plan(sizes: list[int], shares: list[float], batch: int, num_batches: int,
                 seed: int) -> list[list[tuple[int, int]]]:
    """(source, row) pairs filling each batch. Every batch holds each source's share of `batch`, rounded with
    the remainder carried over, so a source's running count never drifts a whole row from its share; each
    source is read in passes (all its rows once, in a fresh random order) before any row repeats."""
    rng = np.random.default_rng(seed)
    shares = np.asarray(shares, float) / sum(shares)
    orders, pos = [np.empty(0, int)] * len(sizes), [0] * len(sizes)
    carry, plan = np.zeros(len(sizes)), []
    for _ in range(num_batches):
        carry += shares * batch
        counts = np.floor(carry).astype(int)
        for s in np.argsort(-(carry - counts), kind="stable")[:batch - counts.sum()]:
            counts[s] += 1
        carry -= counts
        rows = []
        for s, n in enumerate(counts):
            for _ in range(n):
                if pos[s] == len(orders[s]):
                    orders[s], pos[s] = rng.permutation(sizes[s]), 0
                rows.append((s, int(orders[s][pos[s]])))
                pos[s] += 1
        plan.append(rows)
    return plan


class CacheCollator(ResponseCollator):
    """Pads a token batch and attaches each row's cache entry, looked up by (source, seq_id)."""

    def __init__(self, pad_id: int, *caches: LogitCache):
        super().__init__(pad_id)
        self.caches = caches
        if len({c.k for c in caches}) > 1:
            raise HpdError(f"the caches of one mixture have different k ({', '.join(str(c.k) for c in caches)}); "
                           f"score them with the same score.top_k")

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        source = torch.tensor([r.get("source", 0) for r in rows])
        B, L = batch["input_ids"].shape
        full = None
        for s, cache in enumerate(self.caches):
            idx = (source == s).nonzero()[:, 0].tolist()
            if not idx:
                continue
            try:
                cb = cache.batch([rows[i]["seq_id"] for i in idx], input_ids=[rows[i]["input_ids"] for i in idx],
                                 length=L)
            except (KeyError, CacheMismatchError) as e:
                raise HpdError(f"cache {cache.id} does not match the training sequences: {e.args[0]}") from None
            if len(idx) == B:
                full = cb
                break
            if full is None:
                full = CacheBatch(**{f: torch.zeros((B, *getattr(cb, f).shape[1:]), dtype=getattr(cb, f).dtype)
                                     for f in CACHE_FIELDS})
            for f in CACHE_FIELDS:
                getattr(full, f)[idx] = getattr(cb, f)
        batch.update({f"cache_{f}": getattr(full, f) for f in CACHE_FIELDS}, source=source)
        return batch


def mixture_loss(sources: list[Source], logits, labels, teacher, source, loss_params: dict):
    """Each source's loss on its own rows, averaged over all response tokens of the batch (so a token counts
    the same whichever source it came from). Diagnostics are prefixed by source name when there are several.
    `teacher`: the batch's CacheBatch, or the online teacher's logits."""
    def loss_of(src, lg, lb, t):
        return distill_loss(src.method, lg, lb, teacher=t, **loss_params.get(src.method, {}))

    if len(sources) == 1:
        return loss_of(sources[0], logits, labels, teacher)
    parts = []
    for s, src in enumerate(sources):
        rows = source == s
        if rows.any():
            sub = (teacher[rows] if isinstance(teacher, torch.Tensor)
                   else CacheBatch(**{f: getattr(teacher, f)[rows] for f in CACHE_FIELDS}))
            if logits.dim() == 2:  # logits at response positions only: a position belongs to its row's source
                lg = logits[source[:, None].expand_as(labels)[response_positions(labels)] == s]
            else:
                lg = logits[rows]
            parts.append((src, int(rows.sum()), *loss_of(src, lg, labels[rows], sub)))
    tokens = sum(d["tokens"] for *_, d in parts)
    loss = sum(part * d["tokens"] for _, _, part, d in parts) / max(tokens, 1)
    diag = {"tokens": tokens}
    for src, n, _, d in parts:
        diag.update({f"{src.name}_sequences": n, **{f"{src.name}_{k}": v for k, v in d.items()}})
    return loss, diag


class DistillTrainer(Trainer):
    """Trainer whose loss is each source's distillation loss, weighted by its response tokens. With a
    `teacher` model (online mode) the teacher's full-vocabulary logits for the batch replace the cache rows."""

    def __init__(self, *args, sources: list[Source], loss_params: dict, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources, self.loss_params, self.teacher = sources, loss_params, teacher
        self._diag: list[dict] = []
        self._last_log = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, source = inputs.pop("labels"), inputs.pop("source", None)
        if "cache_mask" in inputs:
            teacher = CacheBatch(**{f: inputs.pop(f"cache_{f}") for f in CACHE_FIELDS})
        elif self.teacher is None:
            teacher = None  # sft: no teacher signal at all
        else:
            if self.teacher.device != inputs["input_ids"].device:
                self.teacher.to(inputs["input_ids"].device)
            with torch.no_grad():
                teacher = self.teacher(**inputs).logits
        # Student logits only where a loss is taken: the [B, L, V] logits and their gradient were most of a
        # step's memory (response positions are a fraction of a padded batch; prompts take none).
        keep = {"logits_to_keep": response_positions(labels)} if self._keeps_logits(model) else {}
        outputs = model(**inputs, **keep)
        loss, diag = mixture_loss(self.sources, outputs.logits, labels, teacher, source, self.loss_params)
        self._diag.append(diag)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _keeps_logits(model) -> bool:
        forward = getattr(model, "module", model).forward  # the Trainer may hand over a DDP-wrapped model
        return "logits_to_keep" in inspect.signature(forward).parameters

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


def _fresh_or_given_student(cfg: dict, teacher_dir: str, teacher_tok, seed: int):
    if cfg["student_path"]:
        model, tok = modeling.load_causal_lm(cfg["student_path"])
        if tok.get_vocab() != teacher_tok.get_vocab():
            raise HpdError(f"the student at {cfg['student_path']} uses a different tokenizer than the teacher; "
                           f"distillation from this cache needs the teacher's tokenizer")
        if model.get_output_embeddings().weight.shape[0] < len(teacher_tok):
            raise HpdError(f"the student's output layer has fewer rows than the tokenizer has tokens "
                           f"({len(teacher_tok)}); resize its embeddings first")
        return model
    torch.manual_seed(seed)
    if cfg["student_init"] == "teacher-layers":
        teacher, _ = modeling.load_causal_lm(teacher_dir)
        return modeling.keep_layers(teacher, cfg["n_layer"])[0]
    if cfg["student_init"] == "teacher-shape":
        return modeling.same_shape_fresh(modeling.check_causal_lm(teacher_dir), n_layer=cfg["n_layer"],
                                         n_embd=cfg["n_embd"], n_head=cfg["n_head"])
    context = modeling.context_length(modeling.check_causal_lm(teacher_dir))
    return modeling.new_gpt2(teacher_tok, n_positions=context, n_layer=cfg["n_layer"], n_embd=cfg["n_embd"],
                             n_head=cfg["n_head"])


def _rows(src: Source, s: int, picks=None) -> dict:
    seq_ids, plens, seqs = src.store.range(0, len(src.store))
    picks = range(len(seq_ids)) if picks is None else picks
    return {"seq_id": [int(seq_ids[i]) for i in picks], "prompt_len": [int(plens[i]) for i in picks],
            "input_ids": [seqs[i].tolist() for i in picks], "source": [s] * len(picks)}


def _training_set(sources: list[Source], per_batch: int, num_batches: int, seed: int):
    """Round 0: every offline sequence, shuffled by the Trainer. Rounds: the mixture plan, read in order."""
    from datasets import Dataset

    if len(sources) == 1 and sources[0].share == 1 and num_batches == 0:
        return Dataset.from_dict(_rows(sources[0], 0))
    plan = [p for batch in mixture_plan([len(s.store) for s in sources], [s.share for s in sources], per_batch,
                                        num_batches, seed) for p in batch]
    columns: dict = {"seq_id": [], "prompt_len": [], "input_ids": [], "source": []}
    order = []
    for s, src in enumerate(sources):
        picks = [row for src_i, row in plan if src_i == s]
        for name, values in _rows(src, s, picks).items():
            columns[name] += values
        order += [i for i, (src_i, _) in enumerate(plan) if src_i == s]
    ds = Dataset.from_dict(columns)
    return ds.select(np.argsort(order, kind="stable"))


def _plan(cfg: dict, inputs: dict, tok, seed: int):
    """(sources, student, steps, lr, warmup, planned batches, the previous round's report) for this round."""
    if cfg.get("round", 0) == 0:
        sources = [open_source("offline", inputs["generate"], inputs.get("score"), cfg["method"], 1.0)]
        model = _fresh_or_given_student(cfg, inputs["teacher"]["model_dir"], tok, seed)
        return sources, model, cfg["steps"], cfg["learning_rate"], cfg["warmup_steps"], 0, {}
    rounds, previous = cfg["rounds"], inputs["student"]
    sources = [open_source("offline", inputs["generate"], inputs["score"], rounds["offline_method"] or cfg["method"],
                           1 - rounds["refresh_share"])]
    if "refresh" in inputs:
        sources.append(open_source("refresh", inputs["refresh"], inputs["refresh_score"], rounds["method"],
                                   rounds["refresh_share"]))
    model, _ = modeling.load_causal_lm(previous["student_dir"])
    return ([s for s in sources if s.share > 0], model, rounds["steps"], rounds["learning_rate"],
            rounds["warmup_steps"], rounds["steps"] * cfg["gradient_accumulation_steps"], previous["report"])


def _online_teacher(cfg: dict, teacher: dict):
    if cfg["teacher_source"] == "cache" or cfg["method"] == "sft":  # (graph.py refuses any other source)
        return None
    model, _ = modeling.load_teacher(teacher)
    return model.requires_grad_(False)


def _learning_curve(cfg: dict, data: dict, tok, before: dict) -> list:
    if not (cfg["curve_every"] and data.get("builtin")):
        return []
    rows, task = read_rows(data["heldout"], cfg["curve_examples"]), TASKS[data["builtin"]]

    def measure(m):
        r = answer_accuracy(m, tok, rows, task) if hasattr(task, "is_correct") else {}
        return {**r, "nll": teacher_forced(m, tok, rows)["response_nll_nats"]}
    return [PeriodicEval(measure, cfg["curve_every"], before.get("student_steps", 0), before.get("input_tokens", 0))]


def run(ctx, cfg: dict, inputs: dict) -> dict:
    from transformers import AutoTokenizer

    rss_start = rss_mb()  # before any model is loaded: what training adds is measured from here
    teacher, data = inputs["teacher"], inputs["data"]
    round_, seed = cfg.get("round", 0), ctx.seed * 7919 + cfg["seed"]
    tok = AutoTokenizer.from_pretrained(teacher["model_dir"])
    sources, model, steps, lr, warmup, num_batches, before = _plan(cfg, inputs, tok, seed)
    out = ctx.stage_dir() / "student"
    job = digest({"cfg": cfg, "seed": seed, "world": ctx.world_size,
                  "inputs": {k: v.get("fingerprint") for k, v in inputs.items()}})
    tmp = job_dir(out.with_name(".tmp-student"), job) if ctx.rank == 0 else out.with_name(".tmp-student")
    ctx.barrier()  # rank 0 has cleared another job's leftovers
    params = {s.method: {k: cfg[k] for k in METHOD_PARAMS.get(s.method, ())} for s in sources}
    online = _online_teacher(cfg, teacher)
    where = {s.name: f"cache {s.cache.id}" if s.cache else "teacher online" for s in sources}
    mix = ", ".join(f"{s.share:.0%} {s.name} ({s.method}, {where[s.name]})" for s in sources)
    ctx.log(f"[{ctx.stage}] a {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k-parameter student, "
            f"{steps} steps on {mix}")
    # Under DDP each rank reads every world_size-th planned batch: a step's global batch is world_size of them.
    dataset = _training_set(sources, cfg["batch_size"], num_batches * ctx.world_size, seed * 1009 + round_)
    caches = [s.cache for s in sources if s.cache is not None]
    collator = CacheCollator(tok.pad_token_id, *caches) if caches else ResponseCollator(tok.pad_token_id)
    trainer = train_causal_lm(model, tok, dataset, tmp / "checkpoints", steps=steps,
                              batch_size=cfg["batch_size"], learning_rate=lr, warmup_steps=warmup, seed=seed,
                              save_steps=cfg["checkpoint_steps"], trainer_cls=DistillTrainer, collator=collator,
                              gradient_accumulation_steps=cfg["gradient_accumulation_steps"], bf16=cfg["bf16"],
                              sequential=num_batches > 0,
                              callbacks=_learning_curve(cfg, data, tok, before) if ctx.rank == 0 else [],
                              fsdp=cfg["fsdp"], deepspeed=cfg["deepspeed"], log=lambda line: ctx.log(f"[{ctx.stage}] {line}"),
                              sources=sources, loss_params=params, teacher=online)
    if ctx.rank > 0:
        return {}  # rank 0 judges and publishes the student
    model.eval()
    sequences = steps * cfg["batch_size"] * cfg["gradient_accumulation_steps"] * ctx.world_size
    runtime = trainer.state.log_history[-1].get("train_runtime")
    report = {"parameters": sum(p.numel() for p in model.parameters()), "method": cfg["method"], "round": round_,
              "teacher_source": cfg["teacher_source"],
              "mixture": {s.name: {"share": s.share, "method": s.method, "cache": s.cache.id if s.cache else None}
                          for s in sources},
              "student_steps": before.get("student_steps", 0) + steps,
              "train_sequences": before.get("train_sequences", 0) + sequences,
              "input_tokens": before.get("input_tokens", 0) + trainer.state.num_input_tokens_seen,
              # this process's figures, for the cached-vs-online bench (which runs one stage per process)
              "train_seconds": runtime, "rss_start_mb": rss_start, "peak_rss_mb": peak_rss_mb()}
    if data.get("builtin"):
        report.update(heldout_report(model, tok, data["heldout"], cfg["eval_examples"], TASKS[data["builtin"]]))
    publish_model(model, tok, tmp, out, {"training_log.json": trainer.state.log_history, "hpd-student.json": report})
    return {"student_dir": str(out), "report": report, "teacher_report": teacher.get("report"), "seed": seed,
            "fingerprint": digest(modeling.model_fingerprints(out))}


def published(outputs: dict) -> bool:
    return (Path(outputs["student_dir"]) / "hpd-student.json").is_file()
