"""Stage skip / resume logic, reproducibility and cache keys, through the real stages."""

import json
from pathlib import Path

import pytest

from hpd.common.errors import HpdError
from hpd.storage.logit_cache import LogitCache

from conftest import copy_home, make_runner


def _mtimes(runner):
    return {s: runner.manifest_path(s).stat().st_mtime_ns for s in runner.order}


def test_up_to_date_stages_are_skipped(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    runner = make_runner(home)
    assert all(runner.state(s)[0] == "done" for s in runner.order)
    before = _mtimes(runner)
    runner.run()
    assert _mtimes(runner) == before  # nothing reran


def test_config_change_reruns_only_that_stage_and_downstream(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    runner = make_runner(home, "score.top_k=4")
    assert runner.state("score")[0] == "stale" and "[score] config" in runner.state("score")[1]
    assert runner.state("generate")[0] == "done"
    before = _mtimes(runner)
    runner.run()
    after = _mtimes(runner)
    assert [s for s in runner.order if after[s] != before[s]] == ["score", "distill", "eval"]  # and downstream
    assert runner.manifest("score")["outputs"]["top_k"] == 4

    # A change upstream makes everything downstream stale, through the fingerprints.
    runner = make_runner(home, "score.top_k=4", "generate.num_prompts=120")
    assert runner.state("generate")[0] == "stale"
    assert runner.state("score")[0] == "waiting"
    runner.run()
    assert runner.manifest("generate")["outputs"]["count"] == 120
    assert runner.manifest("score")["outputs"]["sequences"] == 120


def test_single_stage_needs_its_inputs(tmp_path):
    runner = make_runner(tmp_path / "home")
    with pytest.raises(HpdError, match="needs data.*hpd run data"):
        runner.run("teacher")
    runner.run("data")
    assert runner.state("data")[0] == "done" and runner.state("teacher")[0] == "missing"


def test_deleted_output_makes_stage_stale(tiny_home, tmp_path):
    import shutil

    home = copy_home(tiny_home, tmp_path / "home")
    runner = make_runner(home)
    shutil.rmtree(runner.manifest("score")["outputs"]["cache"])
    assert runner.state("score") == ("stale", "published output is missing or changed on disk")
    runner.run()
    assert runner.state("score")[0] == "done"


def test_same_config_same_teacher_data_and_cache(tiny_runner, tmp_path):
    """Every run is seeded: a fresh home with the same config rebuilds byte-identical artefacts."""
    other = make_runner(tmp_path / "home")
    other.run()
    for stage in ("data", "teacher", "generate", "score"):
        assert other.manifest(stage)["outputs"]["fingerprint"] == tiny_runner.manifest(stage)["outputs"]["fingerprint"]
    a = LogitCache(Path(tiny_runner.manifest("score")["outputs"]["cache"]))
    b = LogitCache(Path(other.manifest("score")["outputs"]["cache"]))
    assert [s["checksum"] for s in a.manifest["shards"]] == [s["checksum"] for s in b.manifest["shards"]]


def test_second_experiment_shares_the_cache(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    first = make_runner(home)
    exp2 = make_runner(home, run="exp2")
    exp2.run()
    assert exp2.manifest("score")["outputs"]["cache"] == first.manifest("score")["outputs"]["cache"]
    assert exp2.manifest("teacher")["outputs"]["model_dir"] == first.manifest("teacher")["outputs"]["model_dir"]
    users = json.loads((Path(first.manifest("score")["outputs"]["cache"]) / "users.json").read_text())
    assert sorted(users) == ["exp2", "tiny"] and all(t > 0 for t in users.values())
    assert len(list((home / "caches").iterdir())) - len(list((home / "caches").glob(".*"))) == 1


def test_cache_key_changes_with_teacher_data_and_k(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    base = make_runner(home).manifest("score")["outputs"]["cache_id"]
    ids = {"base": base}
    for name, override in [
        ("k", "score.top_k=3"),
        ("temperature", "score.temperature=2.0"),
        ("data", "generate.num_prompts=150"),
        ("teacher", "teacher.steps=9"),
    ]:
        r = make_runner(home, override, run=name)
        r.run()
        ids[name] = r.manifest("score")["outputs"]["cache_id"]
    assert len(set(ids.values())) == len(ids), ids
    again = make_runner(home, "score.top_k=3", run="k-again")
    again.run()
    assert again.manifest("score")["outputs"]["cache_id"] == ids["k"]


def test_teacher_changed_in_place_is_noticed(tmp_path, tiny_home):
    """A user teacher whose weights change on disk makes the teacher stage (and all after it) stale."""
    import shutil

    from safetensors.torch import load_file, save_file

    home = copy_home(tiny_home, tmp_path / "home")
    user_teacher = tmp_path / "my-teacher"
    shutil.copytree(make_runner(home).manifest("teacher")["outputs"]["model_dir"], user_teacher)
    r = make_runner(home, f'teacher.path="{user_teacher}"', run="user")
    r.run()
    first = r.manifest("score")["outputs"]["cache_id"]
    weights = load_file(user_teacher / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.5
    save_file(weights, user_teacher / "model.safetensors", metadata={"format": "pt"})
    assert r.state("teacher") == ("stale", "published output is missing or changed on disk")
    r.run()
    assert r.manifest("score")["outputs"]["cache_id"] != first


def test_score_tells_observers_where_its_time_went(tmp_path):
    measured = {}
    r = make_runner(tmp_path, observers=[lambda stage, figures: measured.setdefault(stage, figures)])
    r.run(until="score")
    t = measured["score"]
    assert t["forward_s"] > 0 and t["topk_s"] > 0 and t["write_s"] > 0
    # the phases are disjoint parts of the wall time (each figure is rounded to 0.1 ms), and scoring is more
    # than the forward pass
    assert t["wall_s"] + 2e-4 >= t["forward_s"] + t["topk_s"] + t["write_wait_s"]
    assert t["overhead"] > 0 and t["wall_s"] > t["forward_s"]
    assert "timing" not in r.manifest("score")["outputs"]  # figures stay out of the artifact
    r.run(until="score")  # up to date: nothing built, nothing measured again
    assert list(measured) == ["score"]


def test_distill_table_has_the_sft_baseline_from_the_eval_report(tiny_home, tiny_runner):
    """`hpd run` ends with the eval report as a table: distilled student, SFT baseline, teacher."""
    from hpd.pipeline.report import summary_table

    from conftest import hpd_process

    report = tiny_runner.manifest("eval")["outputs"]["report"]
    distilled, baseline = report["student_report"], report["baseline_report"]
    assert baseline["method"] == "sft" and distilled["method"] == "hpd"
    # the same student trained the same way, only without the teacher's distribution
    for key in ("student_steps", "train_sequences", "parameters"):
        assert baseline[key] == distilled[key]
    printed = hpd_process(tiny_home, "status").stdout
    table = printed[printed.index("\nmodel") + 1 :].rstrip("\n")
    rows = {line.split(" | ")[0].strip(): line for line in table.splitlines()}
    assert list(rows) == ["model", "distill (hpd)", "baseline (sft)", "teacher"]
    for name, judged in (("distill (hpd)", "student"), ("baseline (sft)", "baseline"), ("teacher", "teacher")):
        r = report[judged]
        cells = [c.strip() for c in rows[name].split(" | ")]
        assert cells[1:] == [
            f"{r['parameters'] / 1e3:,.0f}k",
            f"{r['accuracy']:.1%}",
            f"{r['avg@4']:.1%}",
            f"{r['response_nll_nats']:.3f}",
            f"{r['kl_to_teacher_nats']:.3f}" if "kl_to_teacher_nats" in r else "-",
        ]
    # the cells follow the report, not a constant
    named = [
        ("distill (hpd)", report["student"]),
        ("baseline (sft)", report["baseline"]),
        ("teacher", report["teacher"]),
    ]
    assert summary_table(named) == table
    named[1] = ("baseline (sft)", {**report["baseline"], "accuracy": 0.4321, "response_nll_nats": 9.876})
    changed = summary_table(named)
    assert changed != table and "43.2%" in changed and "9.876" in changed


def test_baseline_is_optional_and_does_not_retrain_the_student(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    runner = make_runner(home, 'distill.baseline=""')
    assert "baseline" not in runner.order
    assert runner.state("distill")[0] == "done"  # toggling the baseline leaves the student alone
    assert runner.state("eval")[0] == "stale"
    runner = make_runner(home, 'distill.baseline="fkl"', 'distill.method="sft"')
    assert runner.state("baseline")[0] == "stale" and runner.stages["baseline"].inputs[-1] == "score"
    with pytest.raises(HpdError, match="distill.baseline='opd' is unknown; choose an offline method"):
        make_runner(home, 'distill.baseline="opd"')


def test_teacher_dtype_keys_the_cache_and_stays_close(tiny_home, tmp_path):
    """A bf16 teacher pass is a cache of its own (never mixed with the fp32 one), and its log-probs stay within
    bf16 rounding of fp32's."""
    import torch

    from hpd.storage.logit_cache import LogitCache

    home = copy_home(tiny_home, tmp_path / "home")
    fp32_cache = make_runner(home).manifest("score")["outputs"]["cache"]
    bf16 = make_runner(home, 'teacher.dtype="bfloat16"')
    assert bf16.state("teacher")[0] == "stale"
    bf16.run(until="score")
    assert bf16.manifest("teacher")["outputs"]["dtype"] == "bfloat16"
    a, b = LogitCache(Path(fp32_cache)), LogitCache(Path(bf16.manifest("score")["outputs"]["cache"]))
    assert a.id != b.id
    ids = list(range(8))
    ra, rb = a.batch(ids), b.batch(ids)
    m = ra.mask.bool()
    assert torch.equal(m, rb.mask.bool())
    gap = (ra.target_logprob[m] - rb.target_logprob[m]).abs()
    assert 0 < gap.max() < 0.15  # bf16 keeps 8 bits of mantissa: differences, but small ones
    with pytest.raises(
        HpdError, match="teacher.dtype='int8' is unknown; choose one of auto, float32, bfloat16, float16"
    ):
        make_runner(home, 'teacher.dtype="int8"')


def test_token_budget_batching_gives_the_same_cache_and_eval(tiny_home, tmp_path):
    """Sorting by length and packing to a token budget changes how sequences meet the teacher, not what it
    says: the cache scored that way holds the same rows, and eval reports the same figures."""
    import shutil

    import torch

    from hpd.storage.logit_cache import LogitCache

    home = copy_home(tiny_home, tmp_path / "home")
    by_count = make_runner(home)
    reference = LogitCache(Path(make_runner(tiny_home).manifest("score")["outputs"]["cache"]))
    report = by_count.manifest("eval")["outputs"]["report"]["student"]
    shutil.rmtree(by_count.manifest("score")["outputs"]["cache"])  # batching is not in the key: score anew
    packed = make_runner(home, "score.batch_tokens=300", "eval.batch_tokens=300")
    packed.run()
    rescored = LogitCache(Path(packed.manifest("score")["outputs"]["cache"]))
    ids = list(range(reference.num_sequences))
    a, b = rescored.batch(ids), reference.batch(ids)
    for field in ("topk_ids", "topk_logprobs", "target_logprob", "tail_logmass", "mask"):
        assert torch.allclose(getattr(a, field).float(), getattr(b, field).float(), atol=1e-5), field
    again = packed.manifest("eval")["outputs"]["report"]["student"]
    for key in ("response_nll_nats", "kl_to_teacher_nats"):
        assert again[key] == pytest.approx(report[key], rel=1e-5)
