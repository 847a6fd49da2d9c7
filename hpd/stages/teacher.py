"""teacher: use the local HF causal LM the user names, or train the built-in task's teacher once.

The built-in teacher is an ordinary HF model directory (config, safetensors, tokenizer) under the shared
model root, named by a hash of what determines it (its config, the training data and the seed), so every
run asking for the same teacher reuses it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from hpd.common import ranks
from hpd.common.settings import Settings, TeacherSettings
from hpd.storage.fingerprint import digest
from hpd.storage.shards import lock_for

from . import hf_models, student_models
from .artifacts import StageKind, TaskData, Teacher
from .metrics import encode_example, heldout_report
from .tasks import TASKS
from .training import ResponseCollator, publish_model, train, training_arguments

REPORT = "hpd-teacher.json"
# Bump when the built-in training recipe in code changes: the stage reruns and the new teacher gets a new
# directory, so a teacher trained by the old recipe is never reused for the new one.
VERSION = 3


def _outputs(model_dir: Path, report: dict | None, dtype: str) -> Teacher:
    config = hf_models.check_causal_lm(model_dir)
    fps = hf_models.model_fingerprints(model_dir)
    return Teacher(
        model_dir=str(model_dir),
        model_fingerprint=fps["model"],
        tokenizer_fingerprint=fps["tokenizer"],
        vocab_size=int(config.vocab_size),
        report=report,
        dtype=dtype,
        fingerprint=hf_models.teacher_identity(model_dir, dtype),
    )


# teacher.dtype "auto" on a CPU: bfloat16 where the CPU does bf16 arithmetic natively and the model is large enough
# for its matmuls to dominate. bench/bf16_cpu.py (SmolLM2-135M, AVX512-BF16): bf16 scores 1.9x, samples 2.1x and
# trains 1.7x as fast as fp32, and its distribution is a bucket KL of 0.0011 from the fp32 one on average (0.006 at
# the 99th percentile): within the 0.01 a cache encoding may cost. Smaller models keep fp32: there the difference is
# small, and the tiny models of the tests keep their exact caches.
BF16_CPU_MIN_PARAMETERS = 50_000_000


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), as Linux reports it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolved_dtype(setting: str, parameters: int = 0) -> str:
    """teacher.dtype: "auto" is bfloat16 on a GPU (what teachers are served in); on a CPU, bfloat16 for a model of
    at least BF16_CPU_MIN_PARAMETERS where the CPU has native bf16, float32 otherwise."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if parameters >= BF16_CPU_MIN_PARAMETERS and native_bf16_cpu() else "float32"


def run(ctx, cfg: Settings, data: TaskData) -> Teacher:
    t = cfg.teacher
    if t.path:
        path = hf_models.local_model(t.path, ctx.home, "teacher.path")
        model, _ = hf_models.load_causal_lm(path)  # proves it loads before anything downstream relies on it
        return _outputs(path, None, resolved_dtype(t.dtype, sum(p.numel() for p in model.parameters())))
    ident = {"cfg": dataclasses.asdict(t), "data": data.fingerprint, "seed": ctx.seed, "recipe": VERSION}
    name = f"{data.builtin}-teacher-{digest(ident)[:12]}"
    final = ctx.model_root / name
    ctx.model_root.mkdir(parents=True, exist_ok=True)
    with ranks.held_by_rank0(ctx, lock_for(final)):
        if not (final / REPORT).exists():
            _train(ctx, t, data, final)  # every rank: the Trainer's DDP
        else:
            ctx.log(f"[teacher] reusing {final}")
    report = json.loads((final / REPORT).read_text())
    return _outputs(final, report, resolved_dtype(t.dtype, report.get("parameters", 0)))


def _train(ctx, cfg: TeacherSettings, data: TaskData, final: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer

    tmp = final.with_name(f".tmp-{final.name}")
    tmp.mkdir(parents=True, exist_ok=True)  # kept across crashes: Trainer resumes from its checkpoints
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    rows = [json.loads(line) for line in open(data.train)]
    seqs = [encode_example(tokenizer, r["prompt"], r["response"]) for r in rows]
    context = 1 << (max(len(s[0]) for s in seqs) - 1).bit_length()
    torch.manual_seed(ctx.seed)
    model = student_models.new_gpt2(
        tokenizer, n_positions=context, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head
    )
    params = sum(p.numel() for p in model.parameters())
    ctx.log(f"[teacher] training a {params / 1e6:.2f}M-parameter GPT-2 on {len(rows)} traces for {cfg.steps} steps")
    dataset = Dataset.from_dict({"input_ids": [s[0] for s in seqs], "prompt_len": [s[1] for s in seqs]})
    args = training_arguments(
        tmp / "checkpoints",
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        seed=ctx.seed,
        save_steps=cfg.checkpoint_steps,
    )
    train(
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=ResponseCollator(tokenizer.pad_token_id)),
        log=lambda line: ctx.log(f"[teacher] {line}"),
        what="the teacher's cross-entropy",
        hint="lower teacher.learning_rate",
    )
    if ctx.rank > 0:
        return  # rank 0 judges and publishes the teacher
    model.eval()
    report = {
        "parameters": params,
        **heldout_report(model, tokenizer, data.heldout, cfg.eval_examples, TASKS[data.builtin]),
    }
    acc = f"held-out accuracy {report['heldout_accuracy']:.1%}, " if "heldout_accuracy" in report else ""
    ctx.log(
        f"[teacher] {acc}held-out response NLL {report['response_nll_nats']:.3f} nats/token, "
        f"mean response entropy {report['response_entropy_nats']:.3f} nats"
    )
    publish_model(model, tokenizer, tmp, final, {REPORT: report})


STAGE = StageKind("teacher", run, Teacher, version=VERSION, distributed=True)  # distributed: the Trainer's DDP
