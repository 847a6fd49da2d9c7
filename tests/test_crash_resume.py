"""A scoring run killed with SIGKILL resumes from its last published shard and ends with the same cache."""

import shutil
import signal
from pathlib import Path

from hpd.storage import atomic
from hpd.storage.logit_cache import LogitCache
from hpd.storage.shards import JOURNAL

from conftest import copy_home, hpd_process, make_runner


def test_sigkilled_scoring_resumes_to_identical_cache(tiny_home, tiny_runner, tmp_path):
    reference = LogitCache(Path(tiny_runner.manifest("score")["outputs"]["cache"]))
    home = copy_home(tiny_home, tmp_path / "home")
    shutil.rmtree(home / "caches" / reference.id)
    (home / "runs" / "tiny" / "score" / "manifest.json").unlink()

    proc = hpd_process(home, "run", "score", kill_at="shard:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    partial = home / "caches" / f".tmp-{reference.id}"
    journal = atomic.read_json(partial / JOURNAL)
    assert sorted(journal["shards"]) == ["0", "1"]
    assert not (home / "caches" / reference.id).exists()  # nothing a reader could take for finished work
    runner = make_runner(home)
    assert runner.state("score")[0] == "interrupted"

    logs = []
    runner.ctx.log = logs.append
    runner.run("score")
    assert any("resuming: 2 of" in line for line in logs)
    resumed = LogitCache(home / "caches" / reference.id)
    assert [s["checksum"] for s in resumed.manifest["shards"]] == [s["checksum"] for s in reference.manifest["shards"]]
    ids = list(range(reference.manifest["rows"]))
    a, b = reference.batch(ids), resumed.batch(ids)
    for field in ("topk_ids", "topk_logprobs", "target_logprob", "tail_logmass", "mask"):
        assert getattr(a, field).equal(getattr(b, field))
    assert not partial.exists() and runner.state("score")[0] == "done"


def test_sigkilled_teacher_training_resumes_from_its_checkpoint(tmp_path):
    """Killed right after its first checkpoint, teacher training resumes there and ends with the same weights."""
    overrides = ["teacher.steps=8", "teacher.checkpoint_steps=4", "teacher.n_embd=24"]
    reference = make_runner(tmp_path / "ref", *overrides)
    reference.run("data"), reference.run("teacher")

    home = tmp_path / "crashed"
    proc = hpd_process(home, "run", "--until", "teacher", overrides=overrides, kill_at="checkpoint:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = [p for p in (home / "models").iterdir() if p.name.startswith(".tmp-")]
    assert len(partial) == 1 and (partial[0] / "checkpoints" / "checkpoint-4").is_dir()
    assert not [p for p in (home / "models").iterdir() if not p.name.startswith(".")]  # nothing published

    runner = make_runner(home, *overrides)
    assert runner.state("teacher")[0] == "interrupted"
    logs = []
    runner.ctx.log = logs.append
    runner.run("teacher")
    assert "[teacher] resuming from checkpoint-4 of 8 steps" in logs  # not retrained from step 0
    assert (
        runner.manifest("teacher")["outputs"]["fingerprint"] == reference.manifest("teacher")["outputs"]["fingerprint"]
    )
    assert not partial[0].exists()


def test_a_checkpoint_missing_its_trainer_state_or_a_ranks_rng_is_removed_and_the_one_before_resumed(
    tmp_path, monkeypatch
):
    """A process killed mid-save leaves checkpoint-N without trainer_state.json (written last by rank 0) or,
    under several ranks, without the RNG state of a rank killed before it wrote it: resume from the one before."""
    from hpd.stages.training import latest_checkpoint

    def checkpoint(step: int, *files: str) -> Path:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text("{}")
        return d

    two_ranks = ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth")
    checkpoint(3, *two_ranks)
    checkpoint(6, "trainer_state.json", "rng_state_0.pth")  # rank 1's RNG state never written
    checkpoint(9, "rng_state_0.pth", "rng_state_1.pth")  # trainer_state.json never written
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process writes rng_state.pth: rank files are not asked for
    checkpoint(12, "trainer_state.json", "rng_state.pth")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-12")
    monkeypatch.setenv("RANK", "1")  # a rank other than 0 never removes (rank 0 has, before the barrier)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-12").exists()
