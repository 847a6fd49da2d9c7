"""The benches' own machinery, on the tiny preset: a stage timed in a process of its own reports its figures
through the public API's observers, and leaves the run's results as an ordinary run would."""

import json
from pathlib import Path

import pytest

from bench.measure import DoesNotFit, Measured, in_own_process
from hpd import open_run


def test_a_stage_measured_in_its_own_process(tmp_path):
    measured = Measured()
    run = open_run("tiny", home=tmp_path, log=lambda s: None, observers=[measured])
    run.run(until="score")
    assert set(measured) == {"score"} and measured["score"]["forward_s"] > 0  # observers hear the build
    with pytest.raises(DoesNotFit) as capped:  # past its memory cap the stage's process is killed: it does not fit
        in_own_process("distill", "tiny", [], tmp_path, memory_cap_mb=64)
    assert capped.value.peak_rss_mb > 64 and run.state("distill")[0] != "done"  # and leaves no finished student
    figures = in_own_process("distill", "tiny", [], tmp_path)
    assert figures["train_seconds"] > 0 and figures["peak_rss_mb"] >= figures["rss_start_mb"] > 0
    assert figures["steps"] == run.cfg.distill.steps and figures["input_tokens"] > 0
    student = run.outputs("distill")  # published like any run's, with no figures in its report
    assert Path(student.student_dir, "hpd-student.json").is_file() and "train_seconds" not in student.report


def test_the_readme_and_docs_are_what_their_results_files_say():
    """Every generated section of README.md and docs/ regenerates byte for byte from bench/results/ (a figure
    typed by hand, or a results file changed without `python -m bench.readme`, fails here)."""
    from bench.readme import main

    assert main(check=True) == 0


def test_a_results_file_names_the_command_that_made_it(monkeypatch):
    """The stamp's command is one a reader can paste: the bench's module path, not its file name."""
    import sys

    from bench.provenance import ROOT, stamp

    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "real_students.py"), "--pair", "X"])
    made = stamp()
    assert made["command"] == "python -m bench.real_students --pair X"
    assert made["machine"]["cores"] >= 1 and made["machine"]["memory_gb"] > 0 and made["commit"]


def test_a_template_naming_a_figure_its_results_lack_fails_the_render():
    """The README's prose lives in bench/templates/; a figure a template names but nothing supplies is an error, not a
    blank in the page (so `python -m bench.readme --check`, above, fails on it)."""
    import jinja2
    import pytest

    from bench import readme

    with pytest.raises(jinja2.UndefinedError):
        readme.render("default-task", r={"stage_seconds": {}}, t={}, c={}, cfg={}, stages="")
    probe = readme._ENV.from_string("{{ a|f('.1%') }} of {{ b }}\n")  # the environment every template renders in
    assert probe.render(a=0.25, b="x") == "25.0% of x\n"
    assert probe.render(a=float("-inf"), b="an unbounded interval's end") == "-\u221e of an unbounded interval's end\n"
    with pytest.raises(jinja2.UndefinedError, match="'b' is undefined"):
        probe.render(a=0.25)


def test_every_template_is_used():
    """No orphan templates: each one in bench/templates/ is rendered by bench/readme.py (a section by its name, the
    shared phrases by their file's) or included by another."""
    import re

    from bench import readme

    code = Path(readme.__file__).read_text()
    texts = "".join(p.read_text() for p in readme.TEMPLATES.glob("*.md"))
    for p in readme.TEMPLATES.glob("*.md"):
        name = p.stem
        assert f'"{name}"' in code or f'"{p.name}"' in code or re.search(rf'include "{re.escape(p.name)}"', texts), name


def test_a_shared_phrase_reports_the_paired_t_interval():
    """The phrases several sections share (bench/templates/phrases.md) print the paired difference with its 95%
    interval, t with n - 1 degrees of freedom, computed here in float64 from the differences themselves."""
    import math
    import statistics

    from bench import readme

    d = [0.31, -0.12, 0.44, 0.08, 0.27]
    mean, sd = statistics.mean(d), statistics.stdev(d)
    half = 2.776445105 * sd / math.sqrt(len(d))  # t(0.975, 4)
    x = readme._interval((mean, sd, len(d), 4))
    assert math.isclose((x["lo"] + x["hi"]) / 2, mean, rel_tol=1e-12)
    assert math.isclose(x["hi"] - x["lo"], 2 * half, rel_tol=1e-3)  # the t table holds 3 decimals
    assert not x["beyond"]  # the interval holds 0
    said = readme.say("paired", x)
    assert said == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (better on 4 of 5 seeds)"
    shifted = readme._interval((mean + 1, sd, len(d), 5))
    assert shifted["beyond"] and readme.say("paired", shifted).endswith("beyond the 95% interval)")


def test_pair_a_reads_the_gap_closed_only_where_the_teacher_is_ahead():
    """Pair A's target is a share of the pass@1 gap between the student before and the teacher: read from the
    results where the teacher is ahead, and said to be unreadable (not a division by zero, nor a share with its sign
    flipped) where it is not."""
    from bench import readme

    def summary(teacher):
        m = lambda he, ret: {
            "humaneval_pass@1": {"mean": he},
            "retention_nll_nats": {"mean": ret},  # noqa: E731
            "response_nll_nats": {"mean": 0.4},
        }
        return {
            "primary": "humaneval_pass@1",
            "methods": {"sft": m(0.70, 4.80), "fkl": m(0.75, 4.83), "hpd_fkl": m(0.85, 4.90)},
            "initial": {"humaneval_pass@1": 0.80, "retention_nll_nats": 4.80},
            "teacher": {"humaneval_pass@1": teacher},
        }

    ahead = readme._pair_targets("A", summary(0.95))
    assert ahead["best"] == "hpd_fkl" and abs(ahead["closed"] - 1 / 3) < 1e-12 and abs(ahead["lost"] - 0.10) < 1e-12
    level = readme._pair_targets("A", summary(0.80))
    assert "closed" not in level and level["no_gap"] == {"teacher": 0.80, "before": 0.80}
    assert "closed" not in readme._pair_targets("A", summary(0.60))


def test_pair_a_takes_every_problems_verdicts_only_once_every_model_is_judged(tmp_path):
    """Pair A's models judged again on all of HumanEval replace the arms' verdicts on fewer problems: every row
    (the student before, the teacher, each arm) at once, so McNemar pairs verdicts on the same problems; with a
    model still unjudged nothing is replaced, and the report says which are judged so far."""
    import json

    from bench.real_students import all_problems, summarise

    def verdicts(passed):
        return {
            "humaneval_pass@1": sum(passed) / len(passed),
            "humaneval_problems": len(passed),
            "humaneval_timed_out": 0,
            "humaneval_passed": passed,
            "seconds": 60.0,
        }

    def arm(method, passed):
        student = {**verdicts(passed), "kl_to_teacher_nats": 0.2}
        student.pop("seconds")
        return {
            "method": method,
            "seed": 0,
            "eval": {"student": student, "initial": verdicts([True, False]), "teacher": verdicts([True, True])},
            "student": {},
            "log": [],
        }

    arms = [arm("sft", [True, False]), arm("fkl", [False, True])]
    path = tmp_path / "humaneval_all.json"
    models = {"before": verdicts([True, False, False, False]), "teacher": verdicts([True, True, True, False])}
    path.write_text(json.dumps({"made": {"commit": "x"}, "batch_tokens": 64, "models": models}))
    assert all_problems(arms, path) == {"complete": False, "judged": ["before", "teacher"]}
    assert arms[0]["eval"]["student"]["humaneval_problems"] == 2  # left as the arm judged it
    models |= {"sft": verdicts([True, False, True, False]), "fkl": verdicts([True, True, True, False])}
    path.write_text(json.dumps({"made": {"commit": "x"}, "batch_tokens": 64, "models": models}))
    assert all_problems(arms, path)["problems"] == 4
    s = summarise(arms, "A")
    assert s["methods"]["fkl"]["humaneval_pass@1"]["mean"] == 0.75 and s["initial"]["humaneval_pass@1"] == 0.25
    assert s["humaneval_paired"]["fkl vs before"]["only_a"] == 2 and s["humaneval_paired"]["fkl vs sft"]["only_a"] == 1
    assert s["humaneval_paired"]["teacher vs before"]["problems"] == 4


def test_a_timing_row_is_labelled_by_its_measured_size_ratio():
    """The cached-vs-online rows carry the ratio the two models' parameters give, never a typed one (the labels once
    said 8.4x and 37x where the parameters gave 8.31 and 36.27)."""
    from bench.cached_vs_online import label

    assert label("dialogue-5m", 5_315_072 / 640_768) == "dialogue 8.3x"
    assert label("dialogue-23m", 23_240_000 / 640_768) == "dialogue 36x"
    assert label("math-small", 804_000 / 81_424) == "math 9.9x" and label("math", 804_000 / 105_344) == "math 7.6x"


def test_a_file_keyed_by_row_is_stamped_by_its_rows_where_they_agree():
    from bench.readme import _rows_made

    made = {"commit": "abc", "date": "2026-12-03"}
    assert _rows_made({"math 7.6x": {"made": made}, "dialogue 36x": {"made": made}}) == made
    assert _rows_made({"math 7.6x": {"made": made}, "dialogue 36x": {}}) == {}  # a row from an older run: unstamped
    assert _rows_made({"rows": [1, 2]}) == {} and _rows_made([]) == {}


def test_a_comparisons_report_takes_the_stamp_its_bench_wrote_beside_it(tmp_path):
    from bench.readme import _beside_made

    made = {"commit": "abc", "date": "2026-12-04"}
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "results.json").write_text("[]")
    assert _beside_made(tmp_path / "pair" / "results.json") == {}  # nothing beside it: unstamped
    (tmp_path / "pair.json").write_text(json.dumps({"made": made, "summary": {}}))
    assert _beside_made(tmp_path / "pair" / "results.json") == made
    assert _beside_made(tmp_path / "pair" / "other.json") == {}  # only a comparison's report


def test_a_results_file_names_the_commit_its_bench_started_from(monkeypatch):
    """A bench that runs for hours stamps the code it loaded, not whatever the checkout holds when it writes."""
    from bench import provenance

    monkeypatch.setattr(provenance, "_git", lambda *args: "a-later-commit")
    assert provenance.stamp()["commit"] == provenance.COMMIT_AT_START != provenance._commit()


def test_the_headline_reads_pair_b_at_the_budget_the_preset_trains_with(tmp_path, monkeypatch):
    """What a user of --config smollm2-half gets: the comparison run at its compare.steps, not another budget's."""
    from bench import readme

    steps = readme._settings("smollm2-half").compare.steps
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    (tmp_path / "real_students_B.json").write_text(json.dumps({"overrides": [f"compare.steps={steps // 5}"]}))
    assert readme._pair_b_stem() == "real_students_B"  # nothing at the preset's budget: the main comparison
    (tmp_path / "real_students_B_plateau.json").write_text(json.dumps({"overrides": [f"compare.steps={steps}"]}))
    readme._SOURCES.clear()
    assert readme._pair_b_stem() == "real_students_B_plateau"
    assert not readme._SOURCES  # choosing a file uses none of its figures: no section lists it as a source


def test_make_bench_real_runs_the_settings_its_committed_results_hold():
    """`make bench-real` measures every real-student figure again: each committed comparison's arm settings are what
    one line of its recipe asks for (same pair, budget and resolved settings), so its arms are the ones it reruns."""
    import shlex

    from bench import readme, real_students

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    recipe = makefile.split("\nbench-real:", 1)[1].split("\n\n", 1)[0]
    bench = "-m bench.real_students"
    lines = [line.split(bench, 1)[1] for line in recipe.splitlines() if bench in line]
    asked = {}
    for line in lines:
        args = real_students.parser().parse_args(shlex.split(line))
        stem = f"real_students_{args.pair}" + (f"_{args.budget}" if args.budget else "")
        r = json.loads((readme.RESULTS / f"{stem}.json").read_text())
        cut = r["cut"]["tried"][r["cut"]["kept"]]["sets"] if "cut" in r else []
        config = real_students.CONFIG[args.pair]
        asked[stem] = readme._settings(config, real_students.arm_overrides(args, cut))
        assert asked[stem] == readme._settings(config, r["overrides"]), stem
    committed = {p.stem for p in readme.RESULTS.glob("real_students_*.json")}
    assert committed - {s for s in committed if s.endswith(("_arithmetic", "_probe"))} == set(asked)
