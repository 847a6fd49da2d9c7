"""Several processes, one run (hpd/common/ranks.py): torchrun with 2 CPU processes (gloo).

The teacher-side stages split their shards between the ranks and must publish exactly what one process
publishes; distill under DDP must follow the one-process loss curve at the same global batch, and resume."""

import json
from pathlib import Path

import pytest

from conftest import copy_home, hpd_process, make_runner

SAMPLED = [
    'generate.mode="teacher"',
    "generate.num_prompts=60",
    "generate.shard_size=20",
    "generate.max_new_tokens=40",
    "score.shard_size=25",
    "rounds.count=1",
    "rounds.steps=3",
    "refresh.prompt_fraction=0.5",
    "refresh.samples_per_prompt=2",
    "refresh.shard_size=10",
]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def _shards(directory: str) -> list[str]:
    manifest = json.loads((Path(directory) / "manifest.json").read_text())
    return [s["checksum"] for s in manifest["shards"]]


def _published(home: Path, stage: str) -> list[str]:
    out = make_runner(home, *SAMPLED).manifest(stage)["outputs"]
    return _shards(out["cache"] if "cache" in out else out["sequences"])


def test_generate_score_refresh_rescore_on_two_ranks_publish_what_one_process_does(tiny_home, tmp_path):
    one, two = copy_home(tiny_home, tmp_path / "one"), copy_home(tiny_home, tmp_path / "two")
    _ok(hpd_process(one, "run", "--until", "distill", overrides=SAMPLED))
    _ok(hpd_process(two, "run", "--until", "score", overrides=SAMPLED, ranks=2))
    for stage in ("generate", "score"):  # teacher samples (per-shard seeds) and the cache, shard for shard
        assert _published(two, stage) == _published(one, stage) and len(_published(one, stage)) >= 3
    _ok(hpd_process(two, "run", "distill", overrides=SAMPLED))  # one process: the same student as in `one`
    students = [make_runner(h, *SAMPLED).manifest("distill")["outputs"]["fingerprint"] for h in (one, two)]
    assert students[0] == students[1]
    _ok(hpd_process(one, "run", "--until", "rescore-1", overrides=SAMPLED))
    _ok(hpd_process(two, "run", "--until", "rescore-1", overrides=SAMPLED, ranks=2))
    for stage in ("refresh-1", "rescore-1"):
        assert _published(two, stage) == _published(one, stage) and len(_published(one, stage)) >= 2
    leftovers = [p for p in (two / "runs").rglob("*") if p.name.startswith((".tmp-", "journal"))]
    assert not leftovers + [p for p in (two / "caches").glob(".tmp-*")]


def _losses(home: Path, *overrides) -> list[float]:
    student = make_runner(home, *overrides).manifest("distill")["outputs"]["student_dir"]
    log = json.loads((Path(student) / "training_log.json").read_text())
    return [e["loss"] for e in log if "loss" in e]


DDP = ['distill.method="fkl"', "distill.steps=6", "distill.checkpoint_steps=3"]


def test_ddp_distill_follows_the_one_process_curve_and_resumes(tiny_home, tmp_path):
    one, two, crashed = (copy_home(tiny_home, tmp_path / n) for n in ("one", "two", "crashed"))
    _ok(hpd_process(one, "run", "distill", overrides=[*DDP, "distill.batch_size=16"]))
    _ok(hpd_process(two, "run", "distill", overrides=[*DDP, "distill.batch_size=8"], ranks=2))  # 2 x 8 = 16
    single, ddp = _losses(one, *DDP, "distill.batch_size=16"), _losses(two, *DDP, "distill.batch_size=8")
    assert len(single) == len(ddp) == 6
    assert ddp == pytest.approx(single, rel=1e-4), (single, ddp)  # equal-length rows: exact up to rounding
    print("one process:", single, "\nDDP, 2 ranks:", ddp)
    # SIGKILLed at the first checkpoint (step 3), then rerun: resumes and ends where the unbroken run ends
    killed = hpd_process(
        crashed, "run", "distill", overrides=[*DDP, "distill.batch_size=8"], ranks=2, kill_at="checkpoint:1"
    )
    assert killed.returncode != 0
    assert list((crashed / "runs/tiny").glob("distill/.tmp-student/checkpoints/checkpoint-3"))
    _ok(hpd_process(crashed, "run", "distill", overrides=[*DDP, "distill.batch_size=8"], ranks=2))
    assert _losses(crashed, *DDP, "distill.batch_size=8") == pytest.approx(ddp, rel=1e-5)
