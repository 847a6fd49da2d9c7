"""`hpd compare`: methods x seeds from one shared cache, the report and its paired table."""

import json

from conftest import copy_home, hpd_cli


def test_compare_runs_methods_by_seeds_from_one_cache_and_writes_the_report(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    sets = [
        'compare.methods="sft,hpd->opd"',
        "compare.seeds=2",
        "compare.steps=4",
        "rounds.steps=2",
        "compare.opd_rounds=1",
        "compare.curve_every=2",
        "refresh.prompt_fraction=0.1",
        "eval.examples=8",
        "eval.samples=1",
        "distill.curve_examples=8",
    ]
    res = hpd_cli(home, "compare", overrides=sets)
    assert res.exit_code == 0, res.output[-1500:]
    out = home / "compare" / "tiny"
    table = (out / "report.md").read_text()
    assert "| sft | 2 |" in table and "| hpd->opd | 2 |" in table and "| teacher | - |" in table
    assert " ± " in table and (out / "training_curves.png").stat().st_size > 0
    assert (out / "learning_curves.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    # seed by seed: a comparison stopped midway holds whole seeds, every method of each
    assert [(r["method"], r["seed"]) for r in results] == [("sft", 0), ("hpd->opd", 0), ("sft", 1), ("hpd->opd", 1)]
    caches = {r["student"]["mixture"]["offline"]["cache"] for r in results}
    assert len(caches) == 1  # one shared cache
    assert all(r["student"]["student_steps"] == 4 for r in results)  # the same budget for every method
    opd = next(r for r in results if r["method"] == "hpd->opd")
    assert opd["student"]["round"] == 1 and opd["student"]["mixture"]["refresh"]["method"] == "opd"
    assert any("curve_accuracy" in e for e in opd["log"])
    # the paired table: hpd->opd minus sft on the same seed, for the KL the results hold
    from hpd.pipeline.report import paired_differences

    kl = {(r["method"], r["seed"]): r["eval"]["student"]["kl_to_teacher_nats"] for r in results}
    diffs = paired_differences(results, "kl_to_teacher_nats")["hpd->opd"]
    assert sorted(diffs) == sorted(kl[("hpd->opd", s)] - kl[("sft", s)] for s in (0, 1))
    assert "each method minus sft" in table and "| hpd->opd | " in table.split("each method minus sft")[1]

    res = hpd_cli(home, "report", "tiny-hpd-to-opd-s0", overrides=sets)
    assert res.exit_code == 0, res.output
    run_report = home / "runs" / "tiny-hpd-to-opd-s0" / "report"
    md = (run_report / "report.md").read_text()
    assert (
        "| student |" in md and (run_report / "loss.png").is_file() and (run_report / "hpd_diagnostics.png").is_file()
    )
    res = hpd_cli(home, "report", "nope", overrides=sets)
    assert res.exit_code == 2 and "no run nope" in res.output


def test_paired_table_gives_each_difference_its_95_interval():
    from hpd.pipeline.report import paired_table
    from hpd.stages.metrics import METRICS

    def run(method, seed, kl, acc):
        return {"method": method, "seed": seed, "eval": {"student": {"kl_to_teacher_nats": kl, "accuracy": acc}}}

    results = [
        run("sft", 0, 0.50, 0.10),
        run("sft", 1, 0.40, 0.20),
        run("fkl", 1, 0.30, 0.10),
        run("fkl", 0, 0.45, 0.30),
    ]
    keys = [m for m in METRICS if m[0] in ("accuracy", "kl_to_teacher_nats")]
    row = next(line for line in paired_table(results, keys) if line.startswith("| fkl |"))
    # accuracy: +0.2 (seed 0), -0.1 (seed 1): mean +5.0%, sd 0.2121, half-width t(1) 12.706 x sd / sqrt 2 = 1.906;
    # better on 1 of 2. KL: -0.05, -0.10: mean -0.075, sd 0.0354, half-width 0.318; lower on 2 of 2.
    assert row == "| fkl | +5.0% [-185.6%, +195.6%] (1/2) | -0.075 [-0.393, +0.243] (2/2) |"
    # a third seed (KL -0.06): mean -0.07, sd 0.0265, half-width t(2) 4.303 x sd / sqrt 3 = 0.0657: excludes 0, bold
    more = [*results, run("sft", 2, 0.40, 0.20), run("fkl", 2, 0.34, 0.20)]
    row = next(line for line in paired_table(more, keys) if line.startswith("| fkl |"))
    assert row.endswith("| **-0.070 [-0.136, -0.004]** (3/3) |"), row
    assert paired_table(results[:2], keys) == []  # one method: nothing to pair


def test_the_teacher_is_judged_in_the_first_arm_only_and_never_against_the_config():
    from hpd.pipeline.compare import arm_overrides
    from hpd.pipeline.config import load

    cfg = load("tiny", [])
    assert "eval.teacher=true" in arm_overrides(cfg, 0, "x", first=True)
    assert "eval.teacher=false" in arm_overrides(cfg, 1, "x", first=False)
    off = load("tiny", ["eval.teacher=false"])
    assert "eval.teacher=false" in arm_overrides(off, 0, "x", first=True)  # the user's eval.teacher = false holds
    assert arm_overrides(cfg, 2, "tiny-fkl-s2", first=False)[0] == "distill.seed=2"


def test_compare_runs_each_arm_in_a_process_of_its_own_when_asked(tiny_home, tmp_path, monkeypatch):
    """isolate=True: each arm is `hpd run` in a child process (its memory is given back before the next arm), with
    the same report as an arm run in this process; a failing child is a one-line error."""
    import sys

    import pytest

    from hpd.common.errors import HpdError
    from hpd.pipeline import compare as compare_module
    from hpd.pipeline.stage import Runner

    home = copy_home(tiny_home, tmp_path / "home")
    monkeypatch.setenv("HPD_HOME", str(home))
    sets = ['compare.methods="sft"', "compare.seeds=1", "compare.steps=2", "eval.examples=4", "eval.samples=1"]
    here, run = [], Runner.run
    monkeypatch.setattr(
        Runner, "run", lambda self, *a, **k: (here.append((self.cfg.run.name, a, k)), run(self, *a, **k))
    )
    compare_module.compare("tiny", sets, out=tmp_path / "apart", log=lambda s: None, isolate=True)
    assert [name for name, *_ in here] == ["tiny"]  # only the shared teacher stages ran in this process
    apart = json.loads((tmp_path / "apart" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in apart] == [("sft", 0)] and apart[0]["student"]["student_steps"] == 2
    monkeypatch.setattr(sys, "executable", "/bin/false")  # from here on, any arm's process fails
    logged = []  # an arm finished in this home starts no process: the same report, nothing run
    compare_module.compare("tiny", sets, out=tmp_path / "again", log=logged.append, isolate=True)
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == apart
    assert any("sft seed 0: finished in tiny-sft-s0" in line for line in logged)
    with pytest.raises(HpdError, match=r"an arm's `hpd run` failed \(exit 1\)"):
        compare_module.compare("tiny", [*sets, "compare.steps=3"], out=tmp_path / "bad", isolate=True)


def test_a_comparison_keeps_the_arms_of_its_earlier_report_with_the_same_settings(tiny_home, tmp_path, monkeypatch):
    """keep=True: a comparison grown across machines from its report alone (the first home gone): arms the report
    holds with the same settings are taken from it, not run; an arm whose settings changed runs again."""
    from hpd.pipeline import compare as compare_module
    from hpd.pipeline.stage import Runner

    sets = ['compare.methods="sft,fkl"', "compare.seeds=1", "compare.steps=2", "eval.examples=4", "eval.samples=1"]
    out = tmp_path / "report"
    first = copy_home(tiny_home, tmp_path / "first")
    monkeypatch.setenv("HPD_HOME", str(first))
    compare_module.compare("tiny", ['compare.methods="sft"', *sets[1:]], out=out, log=lambda s: None, keep=True)
    reported = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in reported] == [("sft", 0)] and reported[0]["arm_key"]

    second = copy_home(tiny_home, tmp_path / "second")  # another machine: no run of the first is here
    monkeypatch.setenv("HPD_HOME", str(second))
    ran, run = [], Runner.run
    monkeypatch.setattr(Runner, "run", lambda self, *a, **k: (ran.append(self.cfg.run.name), run(self, *a, **k)))
    logged = []
    compare_module.compare("tiny", sets, out=out, log=logged.append, keep=True)
    assert "tiny-sft-s0" not in ran and "tiny-fkl-s0" in ran  # sft kept from the report, fkl run here
    assert any("sft seed 0: kept from the earlier report" in line for line in logged)
    both = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in both] == [("sft", 0), ("fkl", 0)] and both[0] == reported[0]

    ran.clear()  # the same arms with another budget: nothing of the report stands
    compare_module.compare("tiny", [*sets, "compare.steps=3"], out=out, log=lambda s: None, keep=True)
    assert {"tiny-sft-s0", "tiny-fkl-s0"} <= set(ran)
    assert all(r["student"]["student_steps"] == 3 for r in json.loads((out / "results.json").read_text()))
    # without keep nothing is taken from a report
    ran.clear()
    monkeypatch.setenv("HPD_HOME", str(copy_home(tiny_home, tmp_path / "third")))
    compare_module.compare("tiny", sets, out=out, log=lambda s: None)
    assert {"tiny-sft-s0", "tiny-fkl-s0"} <= set(ran)


def test_keep_needs_the_report_directory(tiny_home, tmp_path):
    res = hpd_cli(copy_home(tiny_home, tmp_path / "home"), "compare", "--keep")
    assert res.exit_code == 2 and "name its directory with --out" in res.output and "Traceback" not in res.output
