"""Value functions over whole responses, and what their values do to training (value-guided distillation).

A value function maps (prompt ids, response ids) to one number per sequence, in batches:
  - `verifier`: the task's own checker, 1.0 for a right answer and 0.0 for a wrong one (the math task's answer
    check; for prompts that carry HumanEval-style `test` and `entry_point` fields, the unit tests run on the
    response in hpd's sandbox, hpd/stages/sandbox.py, and only where the caller opted in to running code);
  - `reward_model`: a local Hugging Face sequence classifier with one output (AutoModelForSequenceClassification);
  - `teacher`: the teacher's own judgement, its mean (or summed) log-prob of the response, read from the logit
    cache (the exact target log-probs score stored; no teacher pass).
The judge stage stores the values beside the sequences (hpd/storage/value_store.py). `guidance` turns them into what
training uses: which sequences are kept (best-of-N, rejection sampling), a weight per sequence, and a value
advantage for the on-policy losses (hpd/stages/losses.py adds it to the per-token teacher reward).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from hpd.common.errors import HpdError
from hpd.common.settings import ValueSettings


# -- value functions ---------------------------------------------------------------------------------------
class Verifier:
    """1.0 where the task's checker accepts the response, 0.0 where not. `rows` are the prompt source's rows
    (dicts with the prompt and whatever the checker needs); a sequence finds its row by its prompt's tokens.
    Rows with HumanEval-style `test` code are checked by running it, which needs execute_code=True (the caller's
    opt-in: code.execute in a config) or HPD_ALLOW_CODE_EVAL=1."""

    def __init__(
        self,
        tokenizer,
        rows: list[dict],
        prompt_field: str = "prompt",
        task=None,
        timeout: float = 5.0,
        *,
        execute_code: bool = False,
    ):
        from . import sandbox
        from .batching import encode_pair

        self.tokenizer, self.task, self.timeout, self.prompt_field = tokenizer, task, timeout, prompt_field
        self.execute_code = execute_code
        if task is None or not hasattr(task, "is_correct"):
            if not rows or not {"test", "entry_point"} <= set(rows[0]):
                raise HpdError(
                    'value.function="verifier" has nothing to check these prompts with: use a task '
                    'whose answers can be checked (data.builtin="math") or prompts with HumanEval-style '
                    '"test" and "entry_point" fields'
                )
            sandbox.require(
                "the verifier runs the prompts' HumanEval-style test code on the responses",
                execute_code,
                how="execute_code=True (code.execute=true in a config)",
            )
            sandbox.best_layer()  # chosen (and named) once, here, not by the first of the checking threads
        self.rows = {tuple(encode_pair(tokenizer, r[prompt_field], None)[0]): r for r in rows}

    def check(self, response: str, row: dict) -> bool:
        if self.task is not None and hasattr(self.task, "is_correct"):
            return self.task.is_correct(response, row)
        from .metrics import check_humaneval, truncate_completion

        problem = {"task_id": str(row.get("task_id", "prompt")), **row, "prompt": row[self.prompt_field]}
        return check_humaneval(problem, truncate_completion(response), self.timeout, execute_code=self.execute_code)[
            "passed"
        ]

    def __call__(self, prompts: list, responses: list) -> np.ndarray:
        rows = [self.rows.get(tuple(int(t) for t in p)) for p in prompts]
        if any(row is None for row in rows):
            raise HpdError(
                'value.function="verifier": a sequence\'s prompt is not among the prompts it was '
                "generated from; rerun generate"
            )
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        # code runs in a sandboxed process per completion (hpd/stages/sandbox.py): several at once
        workers = 1 if hasattr(self.task, "is_correct") else min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            return np.array(list(pool.map(self.check, texts, rows)), dtype=np.float64)


def check_reward_model(path: str) -> None:
    """A one-line error unless `path` is a local sequence classifier with one output (checked before any stage)."""
    from .hf_models import read_config

    config = read_config(path, "value.reward_model", "an AutoModelForSequenceClassification with one output")
    saved_as = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in saved_as):
        raise HpdError(
            f"value.reward_model={path} holds a {(saved_as or [config.model_type])[0]!r} model, not a "
            f"sequence classifier; give an AutoModelForSequenceClassification directory with one output"
        )
    if config.num_labels != 1:
        raise HpdError(
            f"value.reward_model={path} has {config.num_labels} outputs; a reward model gives one "
            f"number per sequence (num_labels=1)"
        )


class RewardModel:
    """The reward model's one output per sequence. Sequences go in as token ids when the reward model shares the
    teacher's tokenizer; otherwise as text (decoded, then tokenized by the reward model's own tokenizer)."""

    def __init__(self, path: str, tokenizer, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_reward_model(path)
        from .hf_models import to_accelerator

        self.model = to_accelerator(
            AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        )
        self.own = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.same_vocab = self.own.get_vocab() == tokenizer.get_vocab()
        pad = self.model.config.pad_token_id
        if pad is None:  # decoder classifiers find each row's last token by its padding
            pad = self.own.pad_token_id if self.own.pad_token_id is not None else self.own.eos_token_id
            self.model.config.pad_token_id = pad
        self.pad = pad if pad is not None else 0

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list) -> np.ndarray:
        from .batching import pad_right

        if self.same_vocab:
            seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        else:
            seqs = [
                self.own(self.tokenizer.decode(list(p) + list(r), skip_special_tokens=True))["input_ids"]
                for p, r in zip(prompts, responses)
            ]
        out = []
        for lo in range(0, len(seqs), self.batch_size):
            ids, mask = pad_right(seqs[lo : lo + self.batch_size], self.pad)
            out.append(
                self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device))
                .logits[:, 0]
                .double()
                .cpu()
            )
        return torch.cat(out).numpy()


class TeacherValue:
    """The teacher's mean (or summed) log-prob of each response: the cache's exact target log-probs."""

    def __init__(self, cache, reduce: str = "mean"):
        self.cache, self.reduce = cache, reduce

    def of(self, seq_ids) -> np.ndarray:
        lp = [self.cache.rows(int(s)).target_logprob.astype(np.float64) for s in seq_ids]
        return np.array([x.mean() if self.reduce == "mean" else x.sum() for x in lp])


def check_finite(seq_ids, values: np.ndarray, function: str = "") -> None:
    """A one-line error naming the first sequence whose value is NaN or inf: one such value would make every
    weight NaN (exp weighting scales by the maximum) and every advantage of its prompt NaN."""
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        by = f"value.function={function} gave" if function else "the stored values hold"
        raise HpdError(
            f"{by} {values[bad[0]]} for sequence {int(seq_ids[bad[0]])} ({len(bad)} of {len(values)} "
            f"values are not finite); fix the value function (a reward model with NaN weights, a "
            f"verifier that returns no number) and rerun the judge stage"
        )


# -- what values do to training ----------------------------------------------------------------------------
@dataclass
class Guidance:
    """For one set of judged sequences: the rows (seq_ids) training keeps, and per kept row its loss weight
    and its value advantage (value minus the mean value of its prompt's samples)."""

    rows: np.ndarray
    weight: np.ndarray | None
    advantage: np.ndarray | None


def prompt_means(prompt_index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each sequence's prompt's mean value (over every judged sample of that prompt)."""
    groups, inverse = np.unique(prompt_index, return_inverse=True)
    return np.bincount(inverse, values, len(groups))[inverse] / np.bincount(inverse, minlength=len(groups))[inverse]


def select(prompt_index: np.ndarray, values: np.ndarray, how: str, keep: float, threshold: float) -> np.ndarray:
    """Indices of the kept sequences, in order. top: the best ceil(keep x n) of each prompt's n samples (at least
    one; ties go to the earlier sample): best-of-N with keep = 1/N. threshold: value >= threshold (rejection
    sampling; a prompt none of whose samples pass is dropped)."""
    if how == "none":
        return np.arange(len(values))
    if how == "threshold":
        return np.flatnonzero(values >= threshold)
    order = np.lexsort((np.arange(len(values)), -values, prompt_index))  # by prompt, best first, then earlier
    sorted_groups = prompt_index[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    quota = np.repeat(np.maximum(1, np.ceil(keep * sizes - 1e-9)).astype(int), sizes)
    return np.sort(order[rank < quota])


def weights(values: np.ndarray, means: np.ndarray, how: str, tau: float) -> np.ndarray | None:
    """Per-sequence loss weights of the kept sequences. exp: exp(value / tau), scaled to mean 1 (the loss keeps its
    scale); advantage: 1 + (value - prompt mean) / tau, floored at 0 (a sequence better than its prompt's other
    samples counts more, a worse one less, down to not at all; a negative weight would push the student away from
    the teacher's targets on that sequence)."""
    if how == "none":
        return None
    if how == "exp":
        if not len(values):  # a selection that kept none (a round whose samples all fell below the threshold)
            return np.zeros(0)
        w = np.exp((values - values.max()) / tau)
        return w / w.mean()
    return np.maximum(0.0, 1.0 + (values - means) / tau)


def guidance(seq_ids: np.ndarray, prompt_index: np.ndarray, values: np.ndarray, cfg: ValueSettings) -> Guidance:
    """The [value] section's selection, weighting and advantage applied to one judged sequence set (its rows may
    be none: a threshold no sample reached)."""
    check_finite(seq_ids, values)
    means = prompt_means(prompt_index, values)
    kept = select(prompt_index, values, cfg.select, cfg.keep, cfg.threshold)
    w = weights(values[kept], means[kept], cfg.weighting, cfg.tau)
    advantage = (values - means)[kept] * cfg.advantage if cfg.advantage else None
    return Guidance(seq_ids[kept], w, advantage)
