"""eval: the run's final student (and, for comparison, its teacher) judged on held-out data.

Math-like tasks that can check answers get greedy accuracy and avg@k over sampled answers; tasks with free-form
references get ROUGE-L; with eval.humaneval, code students get HumanEval pass@1, each problem run in hpd's
sandbox (hpd/stages/sandbox.py; the run must opt in to running code: code.execute); every task gets the held-out
per-token NLL and the full-vocabulary KL to the teacher.
"""

from __future__ import annotations

import dataclasses

import torch

from hpd.common.errors import HpdError
from hpd.common.faults import crash_point
from hpd.common.settings import EvalSettings, Settings
from hpd.storage import atomic, memo
from hpd.storage.fingerprint import code_digest, digest

from . import hf_models, metrics
from .artifacts import EvalReport, StageKind, Student, TaskData, Teacher
from .tasks import TASKS

VERSION = 3  # 2: the baseline student, parameters; 3: the teacher's replies as references
# Sampled answers (avg@k) are drawn from this seed for every model judged: the same draws for every arm and bench
# (common random numbers: a paired difference then holds no sampling noise of the judge's own), and a judgement that
# depends on nothing but its model, rows and settings, which is what lets fixed models' judgements be remembered.
JUDGE_SEED = 0
# What a remembered judgement was computed by: the code of this module and of the metrics (not their comments).
_JUDGE_CODE = code_digest(__file__, metrics.__file__)[:16]


def judge(
    model,
    tokenizer,
    rows: list[dict],
    cfg: EvalSettings,
    task,
    teacher=None,
    rouge: bool = True,
    execute_code: bool = False,
    retention: list[dict] = (),
) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(JUDGE_SEED)
        return _judge(model, tokenizer, rows, cfg, task, teacher, rouge, execute_code, retention)


def _judge(model, tokenizer, rows, cfg, task, teacher, rouge, execute_code, retention) -> dict:
    report: dict = {"examples": len(rows), "parameters": sum(p.numel() for p in model.parameters())}
    if task is not None and hasattr(task, "is_correct"):
        report.update(
            metrics.answer_accuracy(model, tokenizer, rows, task, samples=cfg.samples, temperature=cfg.temperature)
        )
    else:
        replies = [
            g[0]
            for g in metrics.generate_texts(
                model,
                tokenizer,
                [r["prompt"] for r in rows],
                max_new_tokens=cfg.max_new_tokens,
                batch_tokens=cfg.batch_tokens,
            )
        ]
        if rouge:
            report["rouge_l"] = sum(metrics.rouge_l(g, r["response"]) for g, r in zip(replies, rows)) / len(rows)
        checkable = [(g, r["answer"]) for g, r in zip(replies, rows) if "answer" in r]
        if checkable:  # questions with a known answer (arithmetic): the last number of the reply must be it
            report["accuracy"] = sum(metrics.last_number_is(g, a) for g, a in checkable) / len(checkable)
            report["checked_examples"] = len(checkable)
    report.update(metrics.teacher_forced(model, tokenizer, rows, teacher, batch_tokens=cfg.batch_tokens))
    if retention:  # what it still knows of general replies (the code task's chat exchanges)
        nll = metrics.teacher_forced(model, tokenizer, retention, batch_tokens=cfg.batch_tokens)
        report["retention_nll_nats"] = nll["response_nll_nats"]
    if cfg.humaneval:
        problems = metrics.humaneval_problems(cfg.humaneval_problems)
        report.update(
            metrics.humaneval_pass_at_1(
                model,
                tokenizer,
                problems,
                timeout=cfg.timeout,
                max_new_tokens=cfg.max_new_tokens or 384,
                execute_code=execute_code,
                batch_tokens=cfg.batch_tokens,
            )
        )
    return report


def _heldout_rows(cfg: EvalSettings, data: TaskData) -> tuple[str, list[dict]]:
    heldout = cfg.heldout or data.heldout
    if not heldout:
        raise HpdError(
            "eval.heldout is empty and there is no built-in task; set eval.heldout to a JSONL file "
            "with a prompt field (and a response field, or the teacher's replies are the references)"
        )
    return heldout, metrics.heldout_rows(heldout, cfg.examples)


def _once(ctx, what: dict, make):
    """A judgement of a fixed model (the teacher's reference replies, the given student before distillation, a
    finished student) made once per home: every arm of a comparison, each seed and method, judges the same ones,
    for minutes each (HumanEval, a teacher writing the references). Keyed by everything the judgement reads, the
    judging code included."""
    return memo.remembered(ctx.home / "judged", digest({**what, "code": _JUDGE_CODE}), make)


def run(
    ctx, settings: Settings, data: TaskData, teacher: Teacher, student: Student, baseline: Student | None = None
) -> EvalReport:
    cfg = settings.eval
    heldout, rows = _heldout_rows(cfg, data)
    task = TASKS.get(data.builtin)
    model, tok = hf_models.load_causal_lm(student.student_dir)
    teacher_model, teacher_tok = hf_models.load_teacher(teacher)
    # a student of another tokenizer (token_bridge): judged in its own tokens, the teacher in its; the KL between
    # them is per token and so is left out
    same_tokens = teacher_tok.get_vocab() == tok.get_vocab()
    ctx.log(f"[eval] {len(rows)} held-out examples from {heldout}")
    references = "data" if "response" in rows[0] else "teacher"
    if references == "teacher":  # no reference answers: the teacher's greedy replies are what to match
        prompts = [r["prompt"] for r in rows]
        replies = _once(
            ctx,
            {
                "replies_of": teacher.fingerprint,
                "prompts": prompts,
                "max_new_tokens": cfg.max_new_tokens,
                "batch_tokens": cfg.batch_tokens,
            },
            lambda: [
                g[0]
                for g in metrics.generate_texts(
                    teacher_model,
                    teacher_tok,
                    prompts,
                    max_new_tokens=cfg.max_new_tokens,
                    batch_tokens=cfg.batch_tokens,
                )
            ],
        )
        rows = [{**r, "response": g} for r, g in zip(rows, replies)]
    reference = teacher_model if cfg.kl_to_teacher and same_tokens else None
    retention = metrics.heldout_rows(data.retention, cfg.examples) if data.retention else []
    same = {"teacher": reference, "execute_code": ctx.execute_code, "retention": retention}
    # what a fixed model's judgement reads besides the model (the key it is remembered by)
    fixed = {
        "rows": rows,
        "retention": retention,
        "eval": {**dataclasses.asdict(cfg), "teacher": None},
        "task": data.builtin,
        "kl_to": teacher.fingerprint if reference is not None else None,
        "execute_code": ctx.execute_code,
    }
    report = {
        "references": references,
        # remembered too: an eval run again for another reason (the teacher's row added to a finished arm) does not
        # judge the same student again
        "student": _once(
            ctx,
            {**fixed, "judged": hf_models.model_fingerprints(student.student_dir)},
            lambda: judge(model, tok, rows, cfg, task, **same),
        ),
        "student_dir": student.student_dir,
        "student_report": student.report,
    }
    initial = student.report.get("initial_dir")
    if initial:  # a given student (distill.student_path), as it was before distillation: what distilling changed
        report["initial"] = _once(
            ctx,
            {**fixed, "judged": hf_models.model_fingerprints(initial)},
            lambda: judge(hf_models.load_causal_lm(initial)[0], tok, rows, cfg, task, **same),
        )
    if baseline is not None:  # the same student trained without the teacher's distribution (distill.baseline)
        report["baseline"] = judge(hf_models.load_causal_lm(baseline.student_dir)[0], tok, rows, cfg, task, **same)
        report["baseline_report"] = baseline.report
    crash_point("judged")
    if cfg.teacher:
        # against its own replies the teacher's ROUGE-L is 1 by construction: not reported
        report["teacher"] = _once(
            ctx,
            {**fixed, "judged": teacher.fingerprint, "kl_to": None, "rouge": references == "data"},
            lambda: judge(
                teacher_model, teacher_tok, rows, cfg, task, **{**same, "teacher": None}, rouge=references == "data"
            ),
        )
    path = ctx.stage_dir() / "report.json"
    atomic.write_json(path, report)
    s = report["student"]
    ctx.log("[eval] student: " + ", ".join(f"{k} {s[k]:.4g}" for k, _, _ in metrics.metric_keys(s)))
    return EvalReport(report_path=str(path), report=report, fingerprint=digest(report))


STAGE = StageKind("eval", run, EvalReport, version=VERSION)
