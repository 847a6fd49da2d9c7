"""Several teachers ([teachers]): other runs' caches routed into one student, or mixed into ensemble targets."""

import json
import math
from pathlib import Path

import pytest

from hpd.common.errors import HpdError
from hpd.storage.logit_cache import LogitCache
from hpd.storage.merge import MixedCache

from conftest import copy_home, hpd_cli, make_runner

STEPS = ["distill.steps=6", 'distill.baseline=""', "distill.curve_every=0"]


@pytest.fixture(scope="module")
def with_second_teacher(tiny_home, tmp_path_factory):
    """The tiny run and a run "b" whose teacher trained longer, on the same data (so the same sequences)."""
    home = copy_home(tiny_home, tmp_path_factory.mktemp("teachers") / "home")
    make_runner(home, "teacher.steps=12", run="b").run(until="score")
    return home


def _log(run) -> list[dict]:
    return json.loads((Path(run.outputs("distill").student_dir) / "training_log.json").read_text())


def test_routing_fills_each_batch_by_the_teachers_weights(with_second_teacher):
    home = with_second_teacher
    r = make_runner(home, *STEPS, 'teachers.runs="b:1"', "teachers.weight=3", run="route")
    assert {"generate@b", "score@b"} <= set(r.stages["distill"].inputs)
    r.run()
    steps = [e for e in _log(r) if "loss" in e]
    batch = r.cfg.distill.batch_size  # 16: 12 of this run's sequences and 4 of run b's, in every batch
    assert steps and all(e["offline_sequences"] == batch * 3 / 4 and e["b_sequences"] == batch / 4 for e in steps)
    mixture = r.outputs("distill").report["mixture"]
    b_cache = make_runner(home, "teacher.steps=12", run="b").outputs("score").cache_id
    assert mixture["b"] == {"share": 0.25, "method": "hpd", "cache": b_cache} and mixture["offline"]["share"] == 0.75


def test_ensemble_trains_on_the_teachers_mixture(with_second_teacher):
    home = with_second_teacher
    r = make_runner(
        home, *STEPS, 'teachers.runs="b"', 'teachers.mode="ensemble"', 'distill.method="fkl"', run="ensemble"
    )
    r.run()
    a = LogitCache(Path(r.outputs("score").cache))
    b = LogitCache(Path(make_runner(home, "teacher.steps=12", run="b").outputs("score").cache))
    assert r.outputs("distill").report["mixture"]["offline"]["cache"] == MixedCache([a, b], [1, 1], a.k).id
    losses = [e["loss"] for e in _log(r) if "loss" in e]
    plain = make_runner(home, *STEPS, 'distill.method="fkl"', run="plain")
    plain.run()
    assert len(losses) == 6 and losses != [e["loss"] for e in _log(plain) if "loss" in e]  # other targets


def test_a_missing_teacher_run_is_said_before_anything_runs(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    r = hpd_cli(home, "run", overrides=['teachers.runs="nosuch:2"', 'run.name="lonely"'])
    assert r.exit_code == 2 and "needs generate@nosuch" in r.output and "build run nosuch" in r.output
    assert not (home / "runs" / "lonely").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ('teachers.runs="b:-1"', "must be a run name, optionally with :WEIGHT"),
        ('teachers.runs="b,b"', "names run 'b' twice"),
        ('teachers.runs="tiny"', "or this run itself"),
        ('teachers.mode="vote"', "teachers.mode='vote' is unknown"),
        ('teachers.weighting="loud"', "teachers.weighting='loud' is unknown"),
    ],
)
def test_bad_teacher_settings_are_one_line_errors(tmp_path, setting, message):
    r = hpd_cli(tmp_path, "run", overrides=[setting])
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "runs").exists()


def test_online_teacher_and_zero_weights_are_refused():
    with pytest.raises(HpdError, match="several teachers train from their caches"):
        make_runner(Path("/nonexistent"), 'teachers.runs="b"', 'distill.teacher_source="online"')
    with pytest.raises(HpdError, match="sum to 0"):
        make_runner(Path("/nonexistent"), 'teachers.runs="b:0"', "teachers.weight=0")


def test_ensemble_of_other_sequences_is_refused_before_any_stage(with_second_teacher):
    home = with_second_teacher
    make_runner(home, "teacher.steps=12", "generate.num_prompts=120", run="c").run(until="score")
    r = make_runner(home, *STEPS, 'teachers.runs="c"', 'teachers.mode="ensemble"', run="mismatch")
    with pytest.raises(HpdError, match=r"run c scored other sequences than this run would \(generate.num_prompts"):
        r.run()
    assert not list((home / "runs" / "mismatch").glob("*/attempt.json"))  # no stage started, none "interrupted"
    assert not list((home / "runs" / "mismatch").glob("*/manifest.json"))
    # once this run has its own sequences, they are compared exactly (here: 120 against run b's 240)
    make_runner(home, *STEPS, "generate.num_prompts=120", run="own").run(until="generate")
    r = make_runner(
        home, *STEPS, "generate.num_prompts=120", 'teachers.runs="b"', 'teachers.mode="ensemble"', run="own"
    )
    with pytest.raises(HpdError, match="run b scored other sequences than this run's;"):
        r.run()
    assert not (home / "runs" / "own" / "score" / "manifest.json").exists()


def test_teachers_runs_that_form_a_loop_are_one_line_errors(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    for name, other in (("x", "y"), ("y", "x")):  # each names the other: saved configs, as finished runs leave
        (home / "runs" / name).mkdir(parents=True)
        (home / "runs" / name / "config.toml").write_text(f'[run]\nname = "{name}"\n[teachers]\nruns = "{other}"\n')
    for run in ("x", "y"):
        r = hpd_cli(home, "status", overrides=[f'run.name="{run}"', f'teachers.runs="{"y" if run == "x" else "x"}"'])
        loop = "x -> y -> x" if run == "x" else "y -> x -> y"
        assert r.exit_code == 2 and f"teachers.runs forms a loop ({loop})" in r.output, r.output
        assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_a_specialist_with_longer_problems_gets_a_student_long_enough(with_second_teacher):
    home = with_second_teacher
    long = make_runner(home, "data.digits=5", "data.operands=4", run="long")
    long.run(until="score")
    r = make_runner(home, *STEPS, 'teachers.runs="long"', run="specialists")
    r.run()
    from hpd.stages import hf_models
    from hpd.storage.sequences import SequenceStore

    store = SequenceStore(Path(long.outputs("generate").sequences))
    longest = max(len(x) for x in store.range(0, len(store))[2])
    own = hf_models.context_length(hf_models.check_causal_lm(r.outputs("teacher").model_dir))
    student = hf_models.check_causal_lm(r.outputs("distill").student_dir)
    assert longest > own and hf_models.context_length(student) >= longest


def test_teachers_with_other_tokenizers_are_refused_before_any_teacher_pass(with_second_teacher):
    home = with_second_teacher
    # a dialogue teacher: its own byte-level BPE tokenizer, not the math task's characters
    make_runner(home, 'data.builtin="dialogue"', "data.vocab_size=300", run="talk").run(until="score")
    r = hpd_cli(home, "run", overrides=['teachers.runs="talk"', 'run.name="mixed-tokenizers"'])
    assert r.exit_code == 2 and "run talk's teacher uses another tokenizer" in r.output, r.output
    assert not (home / "runs" / "mixed-tokenizers" / "generate" / "manifest.json").exists()


def test_an_ensembles_rounds_rescore_with_every_teacher(with_second_teacher):
    home = with_second_teacher
    r = make_runner(
        home,
        *STEPS,
        'teachers.runs="b"',
        'teachers.mode="ensemble"',
        'distill.method="fkl"',
        "rounds.count=1",
        "rounds.steps=4",
        "refresh.prompt_fraction=0.1",
        'rounds.method="fkl"',
        run="ensemble-rounds",
    )
    assert r.stages["rescore-1-b"].inputs == ("teacher@b", "refresh-1")
    r.run()
    own, theirs = (LogitCache(Path(r.outputs(s).cache)) for s in ("rescore-1", "rescore-1-b"))
    b_teacher = make_runner(home, "teacher.steps=12", run="b").outputs("teacher")
    assert theirs.key["teacher"] == b_teacher.model_fingerprint and own.key["data"] == theirs.key["data"]
    mixture = r.outputs("distill-1").report["mixture"]
    assert mixture["refresh"]["cache"] == MixedCache([own, theirs], [0.5, 0.5], own.k).id
    assert mixture["offline"]["cache"].startswith("mix-")


def test_an_ensemble_of_teachers_with_other_tokenizers_trains_a_given_student(tiny_home, tmp_path):
    """Across tokenizers, several teachers: the tiny run's character-level teacher and a byte-level BPE teacher
    score the same texts (generate.mode = "dataset", the same [data]), each in its own tokens; a given student of
    the BPE tokenizer trains on their mixture, each cache carried into its vocabulary by its own bridge, neither
    cache rescored. With refresh rounds, or routed, the same teachers are refused before any teacher pass."""
    from transformers import AutoTokenizer

    from hpd.stages import student_models

    from tiny_llama import make_tokenizer

    home = copy_home(tiny_home, tmp_path / "home")
    bpe = tmp_path / "bpe"
    tok = make_tokenizer(320, corpus=[f"{a} plus {b} is {a + b}" for a in range(30) for b in range(9)])
    student_models.new_gpt2(tok, n_positions=128, n_layer=1, n_embd=16, n_head=2).save_pretrained(bpe)
    tok.save_pretrained(bpe)
    other = make_runner(home, f'teacher.path="{bpe}"', run="bpe")
    other.run(until="score")
    tiny = make_runner(home)
    assert AutoTokenizer.from_pretrained(tiny.outputs("teacher").model_dir).get_vocab() != tok.get_vocab()
    caches = sorted(p.name for p in (home / "caches").iterdir())
    sets = [*STEPS, 'teachers.runs="bpe"', 'teachers.mode="ensemble"', 'distill.method="fkl"']
    r = make_runner(home, *sets, f'distill.student_path="{bpe}"', run="mixed-tokenizers")
    assert {"teacher@bpe", "generate@bpe", "score@bpe"} <= set(r.stages["distill"].inputs)
    r.run(until="distill")
    assert sorted(p.name for p in (home / "caches").iterdir()) == caches  # both caches reused, none rescored
    report = r.outputs("distill").report
    assert report["teacher_target_share"] >= 0.9
    mixture = report["mixture"]["offline"]
    assert mixture["cache"] == tiny.outputs("score").cache_id and mixture["mixed_with"] == [
        other.outputs("score").cache_id
    ]
    losses = [e["loss"] for e in _log(r) if "loss" in e]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    for extra, message in (
        ("rounds.count=1", "without rounds"),
        ('teachers.mode="route"', "mix only as teachers.mode"),
    ):
        with pytest.raises(HpdError, match=message):
            make_runner(home, *sets, f'distill.student_path="{bpe}"', extra, run="refused").run()
        assert not any((home / "runs" / "refused" / s / "manifest.json").exists() for s in ("generate", "distill"))
