"""Causal-LM training on (prompt, response) token sequences with the HF Trainer.

The loss covers response tokens only; prompts are conditioning. Trainer provides the loop, the cosine
schedule, checkpoints every `save_steps` and resumption from the newest one after a crash.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from hpd.common import ranks
from hpd.common.errors import HpdError
from hpd.common.faults import crash_point
from hpd.storage import atomic

from .batching import pad_right


class ResponseCollator:
    """Right-pads a batch and masks prompt and padding positions out of the labels (and passes on the rows'
    value-guided loss weights and advantages, [value], when they have them)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids, mask = pad_right([r["input_ids"] for r in rows], self.pad_id)
        labels = ids.clone()
        labels[mask == 0] = -100
        for i, r in enumerate(rows):
            labels[i, : r["prompt_len"]] = -100
        guidance = {
            k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in ("weight", "advantage") if k in rows[0]
        }
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, **guidance}


class _Checkpoints(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        # No checkpoint after the last step: the model is published right after it, and a run resumed from
        # a checkpoint at max_steps takes one step too many (transformers 5; found by `make soak`).
        if state.global_step >= state.max_steps:
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        crash_point("checkpoint")


class FiniteGradients(TrainerCallback):
    """Stops training at the first optimizer step whose gradient is not finite (NaN or inf anywhere): one more
    step would write it into every weight, and nothing downstream could tell such a model from a trained one.
    `what` names the loss in the error ("the rkl loss")."""

    def __init__(self, what: str, hint: str):
        self.what, self.hint = what, hint

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)  # one pass; NaN if any is
        if not torch.isfinite(norm):
            raise HpdError(
                f"step {state.global_step + 1}: {self.what} gave a non-finite gradient (norm {norm.item()}); "
                f"training stopped and nothing was published; {self.hint}"
            )


def check_finite_loss(loss: torch.Tensor, step: int, what: str, hint: str) -> None:
    """A one-line error for a NaN or inf loss, before its backward pass spreads it into the gradient."""
    if not torch.isfinite(loss.detach()).all():
        raise HpdError(
            f"step {step}: {what} is {loss.detach().float().item()}; training stopped and nothing was published; {hint}"
        )


def non_finite_weights(model) -> list[str]:
    """The names of the model's floating-point tensors that hold a NaN or an inf."""
    return [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


class PeriodicEval(TrainerCallback):
    """Every `every` optimizer steps, `fn(model) -> dict` is measured and appended to the log history with the
    step and the input tokens seen so far: the learning curve. Greedy decoding and teacher-forced scoring
    draw no random numbers, so the curve leaves training bit-for-bit unchanged."""

    def __init__(self, fn, every: int, step_offset: int = 0, token_offset: int = 0):
        self.fn, self.every, self.offset, self.tokens = fn, every, step_offset, token_offset

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            model.eval()
            metrics = self.fn(model)
            model.train()
            release_memory()
            state.log_history.append(
                {
                    "step": state.global_step,
                    "student_step": self.offset + state.global_step,
                    "input_tokens": self.tokens + state.num_input_tokens_seen,
                    **{f"curve_{k}": v for k, v in metrics.items()},
                }
            )


def release_memory() -> None:
    """Give freed memory back to the system: collect cycles, then ask glibc to return its free heap pages (a model
    loaded and dropped between training steps, e.g. the teacher of a learning curve, otherwise stays in this
    process's resident memory and the next one lands on top of it)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / 1e6  # reported in kB


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux)."""
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux: the high-water mark)."""
    return _proc_status_mb("VmHWM")


def job_dir(tmp: Path, key: str) -> Path:
    """The scratch directory of one training job. It survives a crash so the job resumes from its checkpoints,
    but only the same job (same `key`: config, inputs, seed) may resume them: what a job with another key left
    there (a changed config, a smaller model) is removed, never loaded."""
    stamp = tmp / "job.json"
    if tmp.exists() and (not stamp.exists() or atomic.read_json(stamp).get("key") != key):
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    atomic.write_json(stamp, {"key": key})
    return tmp


def latest_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint. The Trainer writes a checkpoint in place, trainer_state.json last, so
    a process killed while saving leaves a directory without it (or with it cut short): such a directory is
    removed, and training resumes from the one before (found by `make soak`); under several ranks, so is
    one that lacks a rank's RNG state (rank 0 writes trainer_state.json without waiting for it). Rank 0
    alone removes, and the others look once it has: two ranks removing one directory at once fail on each
    other's deletions, and a rank that looked before the removal would resume from another step (CI)."""

    rank, size = ranks.world()
    # each rank writes its own RNG state (one process: rng_state.pth, not asked for); a killed rank may not have
    rng_files = [f"rng_state_{r}.pth" for r in range(size)] if size > 1 else []

    def newest(prune: bool) -> str | None:
        ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        while ckpts:
            try:
                atomic.read_json(ckpts[-1] / "trainer_state.json")
                for name in rng_files:
                    (ckpts[-1] / name).stat()
                return str(ckpts[-1])
            except (OSError, ValueError):
                gone = ckpts.pop()
                if prune:
                    shutil.rmtree(gone, ignore_errors=True)
        return None

    if rank == 0:
        newest(prune=True)
    ranks.barrier()
    return newest(prune=False)


def training_arguments(
    output_dir: Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    save_steps: int = 100,
    gradient_accumulation_steps: int = 1,
    bf16: bool = False,
    sequential: bool = False,
    fsdp: str = "",
    deepspeed: str = "",
    gradient_checkpointing: bool = False,
):
    """The one training recipe every model here gets (teacher, students, rounds): AdamW with a cosine schedule
    to 10% of the peak rate, a checkpoint every `save_steps`. `sequential`: read the dataset in its own order
    (a precomputed mixture) instead of shuffling it. Under torchrun the Trainer trains with DDP; `fsdp` /
    `deepspeed` are its own options, passed through."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=warmup_steps,
        weight_decay=0.01,
        adam_beta2=0.95,
        logging_steps=max(1, steps // 20),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        gradient_accumulation_steps=gradient_accumulation_steps,
        bf16=bf16,
        train_sampling_strategy="sequential" if sequential else "random",
        include_num_input_tokens_seen="non_padding",
        **(
            {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
            if gradient_checkpointing
            else {}
        ),
        **({"fsdp": fsdp} if fsdp else {}),
        **({"deepspeed": deepspeed} if deepspeed else {}),
    )


def train(
    trainer,
    log=lambda line: None,
    what: str = "the loss",
    hint: str = "lower the learning rate, or check the training data",
):
    """Run `trainer` to its max_steps, resuming from the newest complete checkpoint in its output directory if
    a crashed attempt left one; `log` hears where a resumed run starts. A non-finite gradient stops it with a
    one-line error naming the step and `what` was trained (the loss), and `hint` says what to do."""
    trainer.add_callback(_Checkpoints())
    trainer.add_callback(FiniteGradients(what, hint))
    resume = latest_checkpoint(trainer.args.output_dir)
    if resume:  # said out loud: a crashed run that silently restarted from step 0 would look the same at the end
        log(f"resuming from {Path(resume).name} of {trainer.args.max_steps} steps")
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def publish_model(model, tokenizer, tmp: Path, final: Path, files: dict) -> None:
    """Save a trained model as a plain HF directory with `files` (name -> JSON) beside it, drop the
    checkpoints under `tmp`, and move it into place atomically. A model with a NaN or inf weight is never
    published, whatever path trained it: every later stage would read it as a finished model."""
    bad = non_finite_weights(model)
    if bad:
        raise HpdError(
            f"the trained model has non-finite weights ({len(bad)} tensors, first {bad[0]}); it was not "
            f"published; lower the learning rate and rerun this stage"
        )
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    for name, obj in files.items():
        atomic.write_json(tmp / "model" / name, obj)
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    atomic.publish_dir(tmp / "model", final)
    shutil.rmtree(tmp, ignore_errors=True)
