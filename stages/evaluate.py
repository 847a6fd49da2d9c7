"""eval: the run's final student (and, for comparison, its teacher) judged on held-out data.

Math-like tasks that can check answers get greedy accuracy and avg@k over sampled answers; tasks with free-form
references get ROUGE-L; with eval.humaneval, code students get HumanEval pass@1, each problem run in its own
time-limited subprocess; every task gets the held-out per-token NLL and the full-vocabulary KL to the teacher.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import HpdError
from storage import atomic
from storage.faults import crash_point
from storage.fingerprint import digest

from . import evaluators, modeling
from .tasks import TASKS

VERSION = 2  # 2: judges the baseline student; parameters in every report


def judge(model, tokenizer, rows: list[dict], cfg: dict, task, teacher=None) -> dict:
    report: dict = {"examples": len(rows), "parameters": sum(p.numel() for p in model.parameters())}
    if task is not None and hasattr(task, "is_correct"):
        report.update(evaluators.answer_accuracy(model, tokenizer, rows, task, samples=cfg["samples"],
                                                 temperature=cfg["temperature"]))
    else:
        report.update(evaluators.rouge_l_report(model, tokenizer, rows, cfg["max_new_tokens"]))
    report.update(evaluators.teacher_forced(model, tokenizer, rows, teacher))
    if cfg["humaneval"]:
        problems = evaluators.humaneval_problems(cfg["humaneval_problems"])
        report.update(evaluators.humaneval_pass_at_1(model, tokenizer, problems, timeout=cfg["timeout"],
                                                     max_new_tokens=cfg["max_new_tokens"] or 384))
    return report


def run(ctx, cfg: dict, inputs: dict) -> dict:
    data, teacher_out, student_out = inputs["data"], inputs["teacher"], inputs["student"]
    heldout = cfg["heldout"] or data.get("heldout")
    if not heldout:
        raise HpdError("eval.heldout is empty and there is no built-in task; set eval.heldout to a JSONL file "
                       "with prompt and response fields")
    if not Path(heldout).is_file():
        raise HpdError(f"eval.heldout {heldout} does not exist; give a JSONL file with prompt and response fields")
    rows = evaluators.read_rows(heldout, cfg["examples"])
    bad = next((i for i, r in enumerate(rows) if not {"prompt", "response"} <= set(r)), None)
    if bad is not None:
        raise HpdError(f"{heldout} row {bad + 1} lacks a prompt or response field; eval needs both")
    task = TASKS.get(data.get("builtin") or "")
    student, tok = modeling.load_causal_lm(student_out["student_dir"])
    teacher, _ = modeling.load_causal_lm(teacher_out["model_dir"])
    ctx.log(f"[eval] {len(rows)} held-out examples from {heldout}")
    reference = teacher if cfg["kl_to_teacher"] else None
    report = {"student": judge(student, tok, rows, cfg, task, teacher=reference),
              "student_dir": student_out["student_dir"], "student_report": student_out.get("report")}
    if "baseline" in inputs:  # the same student trained without the teacher's distribution (distill.baseline)
        baseline, _ = modeling.load_causal_lm(inputs["baseline"]["student_dir"])
        report["baseline"] = judge(baseline, tok, rows, cfg, task, teacher=reference)
        report["baseline_report"] = inputs["baseline"].get("report")
    crash_point("judged")
    if cfg["teacher"]:
        report["teacher"] = judge(teacher, tok, rows, cfg, task)
    path = ctx.stage_dir() / "report.json"
    atomic.write_json(path, report)
    s = report["student"]
    shown = {k: v for k, v in s.items() if k in ("accuracy", f"avg@{cfg['samples']}", "rouge_l",
                                                   "response_nll_nats", "kl_to_teacher_nats", "humaneval_pass@1")}
    ctx.log("[eval] student: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return {"report_path": str(path), "report": report, "fingerprint": digest(report)}


def published(outputs: dict) -> bool:
    return Path(outputs["report_path"]).is_file()
