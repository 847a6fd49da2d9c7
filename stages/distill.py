"""distill: train a student from the teacher cache with any method of stages/losses.py; no teacher in memory.

The student is a local HF directory or a fresh GPT-2 with the teacher's tokenizer. Training is the HF
Trainer (checkpoints, resume after a crash with the same data order, logging); a collator joins each token
batch with its cache rows by sequence id, and every row's token CRC is checked against the batch.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import Trainer

from pipeline.errors import HpdError
from storage.fingerprint import digest
from storage.logit_cache import CacheBatch, CacheMismatchError, LogitCache
from storage.sequences import SequenceStore

from . import modeling
from .losses import METHOD_PARAMS, METHODS, distill_loss
from .tasks import TASKS
from .training import ResponseCollator, publish_model, train_causal_lm

CACHE_FIELDS = ("topk_ids", "topk_logprobs", "target_logprob", "tail_logmass", "mask")


class CacheCollator(ResponseCollator):
    """Pads a token batch and attaches the cache rows of the same sequences, looked up by seq_id."""

    def __init__(self, pad_id: int, cache: LogitCache):
        super().__init__(pad_id)
        self.cache = cache

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        try:
            cb = self.cache.batch([r["seq_id"] for r in rows], input_ids=[r["input_ids"] for r in rows],
                                  length=batch["input_ids"].shape[1])
        except (KeyError, CacheMismatchError) as e:
            raise HpdError(f"cache {self.cache.id} does not match the training sequences: {e.args[0]}") from None
        batch.update({f"cache_{f}": getattr(cb, f) for f in CACHE_FIELDS})
        return batch


class DistillTrainer(Trainer):
    def __init__(self, *args, method: str, loss_params: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.loss_params = method, loss_params
        self._diag: list[dict] = []
        self._last_log = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cb = CacheBatch(**{f: inputs.pop(f"cache_{f}") for f in CACHE_FIELDS})
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss, diag = distill_loss(self.method, outputs.logits, labels, teacher=cb, **self.loss_params)
        self._diag.append(diag)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """Adds the mean of the loss diagnostics since the last log line (HPD's sample statistics among them)."""
        if self._diag and "loss" in logs:
            keys = {k for d in self._diag for k in d if k != "tokens"}
            tokens = sum(d["tokens"] for d in self._diag)
            now = time.perf_counter()
            logs = {**logs, **{k: sum(d.get(k, 0.0) for d in self._diag) / len(self._diag) for k in keys},
                    "tokens": tokens, "tokens_per_s": tokens / max(now - self._last_log, 1e-9)}
            self._diag, self._last_log = [], now
        super().log(logs, *args, **kwargs)


def _student(cfg: dict, teacher_dir: str, teacher_tok, seed: int):
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
    context = modeling.context_length(modeling.check_causal_lm(teacher_dir))
    return modeling.new_gpt2(teacher_tok, n_positions=context, n_layer=cfg["n_layer"], n_embd=cfg["n_embd"],
                             n_head=cfg["n_head"])


def run(ctx, cfg: dict, inputs: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    teacher, gen, score, data = inputs["teacher"], inputs["generate"], inputs["score"], inputs["data"]
    if cfg["method"] not in METHODS:
        raise HpdError(f"distill.method={cfg['method']!r} is unknown; choose one of {', '.join(METHODS)}")
    cache = LogitCache(Path(score["cache"]))
    store = SequenceStore(Path(gen["sequences"]))
    if cache.key["data"] != store.fingerprint or cache.num_sequences != len(store):
        raise HpdError(f"cache {cache.id} was scored on other sequences than {gen['sequences']}; rerun score")
    tok = AutoTokenizer.from_pretrained(teacher["model_dir"])
    model = _student(cfg, teacher["model_dir"], tok, ctx.seed)
    seq_ids, plens, seqs = store.range(0, len(store))
    dataset = Dataset.from_dict({"seq_id": seq_ids.tolist(), "prompt_len": plens.tolist(),
                                 "input_ids": [s.tolist() for s in seqs]})
    out = ctx.stage_dir("distill") / "student"
    tmp = out.with_name(".tmp-student")
    tmp.mkdir(parents=True, exist_ok=True)
    params = {k: cfg[k] for k in METHOD_PARAMS.get(cfg["method"], ())}
    ctx.log(f"[distill] {cfg['method']} into a {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k-parameter "
            f"student from cache {cache.id} (k={cache.k}), {cfg['steps']} steps")
    trainer = train_causal_lm(model, tok, dataset, tmp / "checkpoints", steps=cfg["steps"],
                              batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
                              warmup_steps=cfg["warmup_steps"], seed=ctx.seed, save_steps=cfg["checkpoint_steps"],
                              trainer_cls=DistillTrainer, collator=CacheCollator(tok.pad_token_id, cache),
                              gradient_accumulation_steps=cfg["gradient_accumulation_steps"], bf16=cfg["bf16"],
                              method=cfg["method"], loss_params=params)
    model.eval()
    report = {"parameters": sum(p.numel() for p in model.parameters()), "method": cfg["method"]}
    if data.get("builtin"):
        from .teacher import evaluate

        report.update(evaluate(model, tok, data["heldout"], cfg["eval_examples"], TASKS[data["builtin"]]))
    publish_model(model, tok, tmp, out, {"training_log.json": trainer.state.log_history, "hpd-student.json": report})
    return {"student_dir": str(out), "report": report, "teacher_report": teacher.get("report"),
            "fingerprint": digest(modeling.model_fingerprints(out))}


def published(outputs: dict) -> bool:
    return (Path(outputs["student_dir"]) / "hpd-student.json").is_file()


def summary_table(outputs: dict) -> str:
    """Student against teacher on the held-out set, as the end of `make distill` prints it."""
    s, t = outputs["report"], outputs.get("teacher_report") or {}
    rows = [("model", "parameters", "held-out accuracy", "response NLL", "response entropy")]
    for name, r in ((f"student ({s['method']})", s), ("teacher", t)):
        if r:
            acc = f"{r['heldout_accuracy']:.1%}" if "heldout_accuracy" in r else "-"
            rows.append((name, f"{r['parameters'] / 1e3:.0f}k", acc, f"{r['response_nll_nats']:.3f}",
                         f"{r['response_entropy_nats']:.3f}"))
    return "\n".join(" | ".join(f"{c:<18}" for c in row) for row in rows)
