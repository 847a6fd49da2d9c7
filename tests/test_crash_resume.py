"""A scoring run killed with SIGKILL resumes from its last published shard and ends with the same cache."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from storage.logit_cache import LogitCache
from storage.shards import JOURNAL
from storage import atomic

from conftest import TINY, copy_home, make_runner


def test_sigkilled_scoring_resumes_to_identical_cache(tiny_home, tiny_runner, tmp_path):
    reference = LogitCache(Path(tiny_runner.manifest("score")["outputs"]["cache"]))
    home = copy_home(tiny_home, tmp_path / "home")
    shutil.rmtree(home / "caches" / reference.id)
    (home / "runs" / "tiny" / "score" / "manifest.json").unlink()

    args = [sys.executable, "-c", "from pipeline.cli import main; main()", "run", "score"]
    for o in TINY + ['run.name="tiny"']:
        args += ["--set", o]
    env = {**os.environ, "HPD_HOME": str(home), "HPD_KILL_AFTER_SHARDS": "2"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
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
