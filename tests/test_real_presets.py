"""The presets of the students-from-real-teachers study (--config smollm2-half, --config qwen-coder, --config
qwen-smollm2) end to end at tiny scale: tiny Llama GGUF files stand in for the real teacher and, for qwen-coder and
qwen-smollm2, for the pretrained student file (for qwen-smollm2 one of another tokenizer).
Only the scale is faked: the presets' own stages, tasks, evaluation rows and opt-ins run."""

import json

import pytest

from conftest import hpd_cli
from tiny_llama import make_llama, make_tokenizer, write_gguf

TINY_SCALE = [
    "data.train_examples=16",
    "data.heldout_examples=6",
    "generate.max_new_tokens=8",
    "generate.batch_size=8",
    "score.batch_size=8",
    "distill.steps=4",
    "distill.batch_size=4",
    "distill.gradient_accumulation_steps=1",
    "distill.warmup_steps=1",
    "distill.checkpoint_steps=2",
    "distill.eval_examples=4",
    "distill.curve_every=2",
    "distill.curve_examples=3",
    "eval.examples=4",
    "eval.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """(a 4-layer teacher, a 2-layer student of the same tokenizer), as GGUF files; a context that holds the chat
    task's HumanEval prompts in this near-byte-level tokenizer."""
    d = tmp_path_factory.mktemp("llamas")
    teacher = write_gguf(make_llama(d / "teacher", context=4096), d / "teacher.gguf")
    student = write_gguf(make_llama(d / "student", n_layer=2, seed=1, context=4096), d / "student.gguf")
    return teacher, student


def _report(home, name):
    return json.loads((home / "runs" / name / "eval" / "report.json").read_text())


def test_smollm2_half_cuts_the_teacher_and_reports_the_cut_student(ggufs, tmp_path):
    teacher, _ = ggufs
    sets = [*TINY_SCALE, f'teacher.path="{teacher}"', "distill.n_layer=2", 'run.name="half"']
    r = hpd_cli(tmp_path, "run", "--config", "smollm2-half", overrides=sets, tiny=False)
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)
    report = _report(tmp_path, "half")
    initial, student, t = report["initial"], report["student"], report["teacher"]
    # the row before distillation is the cut student itself: the same size as the distilled one, half the teacher's
    assert initial["parameters"] == student["parameters"] < t["parameters"]
    assert initial["kl_to_teacher_nats"] > 0 and student["kl_to_teacher_nats"] > 0
    log = json.loads((tmp_path / "runs" / "half" / "distill" / "student" / "training_log.json").read_text())
    curve = [e for e in log if "curve_kl" in e]
    assert [e["student_step"] for e in curve] == [2, 4] and all(e["curve_kl"] > 0 for e in curve)

    # how far the plateau is (bench.real_students --plateau-probe): the same cut and cache trained longer, its curve
    # and plateau test read from its own training log; an earlier probe of the same settings is kept, not rerun
    from bench.real_students import plateau_probe

    probe = plateau_probe(str(tmp_path), sets, 6, kept=[])
    assert probe["steps"] == 6 and probe["method"] == "fkl"
    assert [s for s, _ in probe["curve"]["points"]] == [2, 4, 6]
    assert probe["plateau"]["final"] == probe["curve"]["points"][-1][1] and probe["plateau"]["plateau"] is not None
    assert (tmp_path / "runs" / "half-probe-6" / "distill" / "manifest.json").is_file()
    assert not (tmp_path / "runs" / "half-probe-6" / "eval").exists()  # the curve needs no eval
    other = {**probe, "arm_key": "other"}
    assert plateau_probe(str(tmp_path), sets, 6, kept=[other, probe]) is probe
    assert plateau_probe(str(tmp_path), sets, 6, kept=[other])["arm_key"] == probe["arm_key"]

    # the larger arithmetic set (bench.real_students --arithmetic): questions no model trained or was judged on, the
    # same ones for the teacher, the cut and every arm's student, graded like the eval; kept while its key holds
    from bench.real_students import arithmetic_summary, judge_arithmetic
    from hpd.stages.tasks import chat

    record = {"arm_key": "k", "student": report["student_report"], "eval": report}
    arms = [{**record, "method": "sft", "seed": 0}, {**record, "method": "fkl", "seed": 0, "arm_key": "k2"}]
    judged = judge_arithmetic(str(tmp_path), sets, 5, arms, kept={})
    data = tmp_path / "runs" / "half" / "data" / "chat"
    seen = {json.loads(line)["prompt"] for f in ("train.jsonl", "heldout.jsonl") for line in open(data / f)}
    assert judged["unseen"] == len(chat.arithmetic_questions()) - sum("What is" in q for q in seen)
    assert judged["asked"] == 5 and set(judged["models"]) == {"teacher", "before", "sft s0", "fkl s0"}
    for m in judged["models"].values():
        assert len(m["correct"]) == 5 and m["accuracy"] == sum(m["correct"]) / 5
        assert all(q not in seen for q, _ in m["examples"])
    summary = arithmetic_summary(judged)
    # sft and fkl here are one model: the same replies, so nothing tells them apart
    assert summary["methods"]["fkl"]["vs sft"]["only_a"] == summary["methods"]["fkl"]["vs sft"]["only_b"] == 0
    assert summary["teacher vs before"]["problems"] == 5
    marked = {**judged["models"], "teacher": {**judged["models"]["teacher"], "seconds": -1.0}}
    again = judge_arithmetic(str(tmp_path), sets, 5, arms, kept=marked)
    assert again["models"]["teacher"]["seconds"] == -1.0  # kept, not judged again
    assert judge_arithmetic(str(tmp_path), sets, 4, arms, kept=marked)["models"]["teacher"]["seconds"] >= 0
    with pytest.raises(SystemExit, match="ask for fewer"):
        judge_arithmetic(str(tmp_path), sets, 10_000, arms, kept={})


def test_qwen_coder_needs_the_code_opt_in_then_reports_humaneval_and_retention(ggufs, tmp_path):
    teacher, student = ggufs
    sets = [
        *TINY_SCALE,
        f'teacher.path="{teacher}"',
        f'distill.student_path="{student}"',
        "eval.humaneval_problems=3",
        'run.name="coder"',
    ]
    refused = hpd_cli(tmp_path, "run", "--config", "qwen-coder", overrides=sets, tiny=False)
    assert refused.exit_code == 2 and "HPD_ALLOW_CODE_EVAL=1" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs" / "coder").exists()
    r = hpd_cli(tmp_path, "run", "--config", "qwen-coder", overrides=sets, tiny=False, env={"HPD_ALLOW_CODE_EVAL": "1"})
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)
    report = _report(tmp_path, "coder")
    for row in ("initial", "student", "baseline"):
        m = report[row]
        assert len(m["humaneval_passed"]) == m["humaneval_problems"] == 3, row
        assert m["retention_nll_nats"] > 0 and m["kl_to_teacher_nats"] > 0, row
    # the student before distillation is the student file as given: as large as the distilled one
    assert report["initial"]["parameters"] == report["student"]["parameters"] < report["teacher"]["parameters"]
    # a second run in the same home with the same student file and teacher (another method, as a comparison's arms
    # are): the student before distillation, the teacher and the teacher's reference replies are judged once per home
    judged = {f: f.stat().st_mtime_ns for f in (tmp_path / "judged").glob("*.json")}
    assert len(judged) == 4  # the teacher's replies, the student before, the teacher, the student
    sets2 = [*sets, 'run.name="coder-hpd"', 'distill.method="hpd_fkl"', 'distill.baseline=""']  # not the preset's loss
    r = hpd_cli(
        tmp_path, "run", "--config", "qwen-coder", overrides=sets2, tiny=False, env={"HPD_ALLOW_CODE_EVAL": "1"}
    )
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)
    again = _report(tmp_path, "coder-hpd")
    now = {f: f.stat().st_mtime_ns for f in (tmp_path / "judged").glob("*.json")}
    assert {f: now[f] for f in judged} == judged and len(now) == 5  # none made again; the new student's added
    assert again["initial"] == report["initial"] and again["teacher"] == report["teacher"]
    assert again["student"] != report["student"]


def test_qwen_smollm2_distils_across_tokenizers_from_the_cache(ggufs, tmp_path):
    """The student file has a tokenizer of its own (another byte-level BPE, digits split otherwise): it trains from
    the teacher's cache through the token bridge, and sft (the baseline) on the same replies in its tokens."""
    teacher, _ = ggufs
    d = tmp_path / "other"
    other = make_tokenizer(300, split_digits=True)
    student = write_gguf(make_llama(d / "student", n_layer=2, seed=2, context=4096, tokenizer=other), d / "s.gguf")
    sets = [
        *TINY_SCALE,
        f'teacher.path="{teacher}"',
        f'distill.student_path="{student}"',
        "eval.humaneval_problems=2",
        'run.name="cross"',
    ]
    home = tmp_path / "home"
    r = hpd_cli(home, "run", "--config", "qwen-smollm2", overrides=sets, tiny=False, env={"HPD_ALLOW_CODE_EVAL": "1"})
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)
    report = _report(home, "cross")
    for row in ("initial", "student", "baseline"):
        m = report[row]
        assert len(m["humaneval_passed"]) == 2 and m["response_nll_nats"] > 0, row
        assert "kl_to_teacher_nats" not in m, row  # no per-token KL across vocabularies
    assert report["student_report"]["teacher_target_share"] >= 0.9
    student_log = json.loads((home / "runs" / "cross" / "distill" / "student" / "training_log.json").read_text())
    assert [e["student_step"] for e in student_log if "curve_nll" in e] == [2, 4]
