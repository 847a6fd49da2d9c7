"""Evaluators on hand-made cases, against straightforward references, and the eval stage end to end."""
import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.errors import HpdError
from stages import evaluators, modeling
from stages.tasks import arithmetic

from conftest import copy_home, make_runner


@pytest.mark.parametrize("response, answer, correct", [
    ("2+7+0+6=15,1+8+4+4=17,1+5+3+9=18|1845", "1845", True),
    ("2+7+0+6=15|1845  \n", "1845", True),        # trailing whitespace
    ("...|1845<eos>3+4=7|99", "1845", True),        # anything after the end-of-sequence token is ignored
    ("...|01845", "1845", True),                   # a leading zero is the same number
    ("...| 1845", "1845", True),                   # a space after the bar
    ("...|1844", "1845", False),
    ("...=18|", "1845", False),                    # never wrote the total
    ("2+7+0+6=15,1+8+4+4=17", "1845", False),      # stopped before the answer
    ("1845", "1845", False),                       # no bar: not an answer in this format
    ("...|1845x", "1845", False),                  # trailing junk makes it unreadable
    ("...|12|1845", "1845", True),                 # the last bar holds the answer
])
def test_math_answer_extraction(response, answer, correct):
    assert arithmetic.is_correct(response, {"answer": answer}) is correct


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _rouge_l_reference(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def test_rouge_l_known_values():
    assert evaluators.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert evaluators.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)  # LCS 2: precision 1/2, recall 1
    assert evaluators.rouge_l("Hello there", "hello there") == pytest.approx(1.0)
    assert evaluators.rouge_l("good morning", "see you later") == 0.0
    rng = random.Random(0)
    words = "a b c d e f".split()
    for _ in range(50):
        pred = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        ref = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        assert evaluators.rouge_l(pred, ref) == pytest.approx(_rouge_l_reference(pred, ref))


def _problem():
    return evaluators.humaneval_problems(1)[0]  # HumanEval/0, has_close_elements


def test_humaneval_canonical_solution_passes():
    p = _problem()
    assert p["task_id"] == "HumanEval/0" and len(evaluators.humaneval_problems()) == 164
    r = evaluators.check_humaneval(p, p["canonical_solution"], timeout=5.0)
    assert r["passed"] and r["result"] == "passed"


def test_humaneval_broken_solution_fails():
    r = evaluators.check_humaneval(_problem(), "    return False\n", timeout=5.0)
    assert not r["passed"] and r["result"].startswith("failed")


def test_humaneval_looping_solution_is_killed_by_the_time_limit():
    r = evaluators.check_humaneval(_problem(), "    while True:\n        pass\n", timeout=1.0)
    assert not r["passed"] and r["result"] == "timed out"


def test_completion_is_cut_where_the_function_ends():
    text = "    return 1\n\ndef helper():\n    pass\n"
    assert evaluators.truncate_completion(text) == "    return 1\n"
    assert evaluators.truncate_completion("    return 2\n") == "    return 2\n"


def test_teacher_forced_nll_and_kl_match_a_float64_reference(tiny_runner, teacher_dir):
    student_dir = tiny_runner.manifest("distill")["outputs"]["student_dir"]
    student, tok = modeling.load_causal_lm(student_dir)
    teacher, _ = modeling.load_causal_lm(teacher_dir)
    rows = evaluators.read_rows(tiny_runner.manifest("data")["outputs"]["heldout"], 6)
    got = evaluators.teacher_forced(student, tok, rows, teacher)
    nll = kl = 0.0
    n = 0
    for r in rows:
        ids, plen = evaluators.encode_example(tok, r["prompt"], r["response"])
        x = torch.tensor([ids])
        q = torch.log_softmax(student(x).logits[0].double(), -1)
        p = torch.log_softmax(teacher(x).logits[0].double(), -1)
        for t in range(plen - 1, len(ids) - 1):
            nll -= q[t, ids[t + 1]].item()
            kl += (p[t].exp() * (p[t] - q[t])).sum().item()
            n += 1
    assert got["response_nll_nats"] == pytest.approx(nll / n, rel=1e-4)
    assert got["kl_to_teacher_nats"] == pytest.approx(kl / n, rel=1e-3) and kl > 0
    assert evaluators.teacher_forced(teacher, tok, rows, teacher)["kl_to_teacher_nats"] == pytest.approx(0, abs=1e-6)


class _MatchTask:
    """Correct when the response equals the row's target (to check the accuracy bookkeeping itself)."""

    @staticmethod
    def is_correct(text, row):
        return text == row["target"]


def test_greedy_accuracy_and_avg_at_k_bookkeeping(tiny_runner, teacher_dir):
    teacher, tok = modeling.load_causal_lm(teacher_dir)
    rows = evaluators.read_rows(tiny_runner.manifest("data")["outputs"]["heldout"], 8)
    greedy = evaluators.generate_texts(teacher, tok, [r["prompt"] for r in rows])
    for i, (r, g) in enumerate(zip(rows, greedy)):
        r["target"] = g[0] if i % 4 else g[0] + "?"  # 6 of 8 targets are the greedy answer
    torch.manual_seed(0)
    report = evaluators.answer_accuracy(teacher, tok, rows, _MatchTask, samples=3, temperature=1e-4)
    assert report == {"accuracy": 0.75, "avg@3": 0.75}  # near-zero temperature samples the greedy answer


def test_eval_stage_reports_student_and_teacher(tiny_home, tmp_path):
    r = make_runner(copy_home(tiny_home, tmp_path / "home"), "eval.examples=12", "eval.samples=2")
    r.run("eval")
    out = r.manifest("eval")["outputs"]
    report = json.loads(Path(out["report_path"]).read_text())
    s, t = report["student"], report["teacher"]
    assert s["examples"] == 12 and {"accuracy", "avg@2", "response_nll_nats", "kl_to_teacher_nats"} <= set(s)
    assert s["kl_to_teacher_nats"] > 0 and "kl_to_teacher_nats" not in t and 0 <= t["accuracy"] <= 1
    bad = make_runner(r.ctx.home, "eval.examples=12", "eval.samples=2", 'eval.heldout="/nonexistent.jsonl"')
    with pytest.raises(HpdError, match="eval.heldout .* does not exist"):
        bad.run("eval")
    assert bad.state("eval")[0] != "done"  # the earlier report is not taken for this config's


def test_compare_runs_methods_by_seeds_from_one_cache_and_writes_the_report(tiny_home, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from conftest import TINY

    home = copy_home(tiny_home, tmp_path / "home")
    sets = [a for o in [*TINY, 'run.name="tiny"', 'compare.methods="sft,hpd->opd"', "compare.seeds=2",
                        "compare.steps=4", "rounds.steps=2", "compare.opd_rounds=1", "compare.curve_every=2",
                        "refresh.prompt_fraction=0.1", "eval.examples=8", "eval.samples=1",
                        "distill.curve_examples=8"] for a in ("--set", o)]
    res = CliRunner().invoke(cli, ["compare", *sets], env={"HPD_HOME": str(home)})
    assert res.exit_code == 0, res.output[-1500:]
    out = home / "compare" / "tiny"
    table = (out / "report.md").read_text()
    assert "| sft | 2 |" in table and "| hpd->opd | 2 |" in table and "| teacher | - |" in table
    assert " ± " in table and (out / "training_curves.png").stat().st_size > 0
    assert (out / "learning_curves.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in results) == [("hpd->opd", 0), ("hpd->opd", 1), ("sft", 0), ("sft", 1)]
    caches = {r["student"]["mixture"]["offline"]["cache"] for r in results}
    assert len(caches) == 1  # one shared cache
    assert all(r["student"]["student_steps"] == 4 for r in results)  # the same budget for every method
    opd = next(r for r in results if r["method"] == "hpd->opd")
    assert opd["student"]["round"] == 1 and opd["student"]["mixture"]["refresh"]["method"] == "opd"
    assert any("curve_accuracy" in e for e in opd["log"])
    # the paired table: hpd->opd minus sft on the same seed, for the KL the results hold
    from pipeline.report import paired_differences

    kl = {(r["method"], r["seed"]): r["eval"]["student"]["kl_to_teacher_nats"] for r in results}
    diffs = paired_differences(results, "kl_to_teacher_nats")["hpd->opd"]
    assert sorted(diffs) == sorted(kl[("hpd->opd", s)] - kl[("sft", s)] for s in (0, 1))
    assert "each method minus sft" in table and "| hpd->opd | " in table.split("each method minus sft")[1]

    res = CliRunner().invoke(cli, ["report", "tiny-hpd-to-opd-s0", *sets], env={"HPD_HOME": str(home)})
    assert res.exit_code == 0, res.output
    run_report = (home / "runs" / "tiny-hpd-to-opd-s0" / "report")
    md = (run_report / "report.md").read_text()
    assert "| student |" in md and (run_report / "loss.png").is_file() and (run_report / "hpd_diagnostics.png").is_file()
    res = CliRunner().invoke(cli, ["report", "nope", *sets], env={"HPD_HOME": str(home)})
    assert res.exit_code == 2 and "no run nope" in res.output


def test_paired_table_counts_seeds_where_a_method_is_better():
    from pipeline.report import paired_table
    from stages.evaluators import METRICS

    def run(method, seed, kl, acc):
        return {"method": method, "seed": seed, "eval": {"student": {"kl_to_teacher_nats": kl, "accuracy": acc}}}

    results = [run("sft", 0, 0.50, 0.10), run("sft", 1, 0.40, 0.20), run("fkl", 1, 0.30, 0.10), run("fkl", 0, 0.45, 0.30)]
    keys = [m for m in METRICS if m[0] in ("accuracy", "kl_to_teacher_nats")]
    row = next(line for line in paired_table(results, keys) if line.startswith("| fkl |"))
    # accuracy: +0.2 (seed 0), -0.1 (seed 1): mean +5.0%, better on 1 of 2; KL: -0.05, -0.10: mean -0.075, 2 of 2
    assert row == "| fkl | +5.0% ± 21.2% (1/2) | -0.075 ± 0.035 (2/2) |"
    assert paired_table(results[:2], keys) == []  # one method: nothing to pair
