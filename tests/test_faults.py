"""Reliability, the fast part: SIGKILLs in the stages other tests do not kill, every kind of damage to a
published cache or sequence store, and garbage collection racing a reader. The long randomised version is
`make soak` (tests/soak.py)."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpd.storage.logit_cache import LogitCache
from hpd.storage.shards import CorruptShardError

from conftest import copy_home, hpd_cli, hpd_process, make_runner


def _killed(home, stage, kill_at):
    proc = hpd_process(home, "run", stage, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    r = make_runner(home)
    assert r.state(stage)[0] == "interrupted"
    return r


@pytest.fixture()
def home(tiny_home, tmp_path):
    return copy_home(tiny_home, tmp_path / "home")


def test_sigkilled_generate_resumes_to_the_same_sequences(tiny_runner, home):
    reference = tiny_runner.manifest("generate")["outputs"]
    (home / "runs" / "tiny" / "generate" / "manifest.json").unlink()
    shutil.rmtree(home / "runs" / "tiny" / "generate" / "sequences")
    r = _killed(home, "generate", "shard:2")  # 3 shards of 100 prompts: killed after the second
    assert len(json.loads((home / "runs/tiny/generate/.tmp-sequences/journal.json").read_text())["shards"]) == 2
    r.run("generate")
    assert r.manifest("generate")["outputs"]["fingerprint"] == reference["fingerprint"]
    assert r.state("score")[0] == "done"  # same sequences: the cache built on them still stands


def test_sigkilled_eval_reruns_to_the_same_report(tiny_runner, home):
    (home / "runs" / "tiny" / "eval" / "manifest.json").unlink()
    r = _killed(home, "eval", "judged:1")  # the student judged, the teacher not yet
    r.run("eval")
    got, want = (json.loads(Path(x.manifest("eval")["outputs"]["report_path"]).read_text()) for x in (r, tiny_runner))
    assert got["student"] == want["student"] and got["teacher"] == want["teacher"]


def _damage(cache_dir: Path) -> dict[str, str]:
    """A flipped byte, a truncated shard and a deleted shard: what each did, by file name."""
    names = sorted(p.name for p in cache_dir.glob("shard-*.arrow"))
    flipped, cut, gone = (cache_dir / n for n in names[:3])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    gone.unlink()
    return {flipped.name: "flipped", cut.name: "truncated", gone.name: "deleted"}


def test_damaged_shards_are_named_by_verify_and_never_trained_on(tiny_runner, home):
    cache_dir = home / "caches" / tiny_runner.manifest("score")["outputs"]["cache_id"]
    damaged = _damage(cache_dir)
    r = hpd_cli(home, "cache", "verify")
    assert r.exit_code == 1
    assert all(name in r.stderr for name in damaged), r.stderr
    assert r.stderr.count("bad: ") == 3 and "1 of 1 caches damaged" in r.stderr
    cache = LogitCache(cache_dir)
    for i, entry in enumerate(cache.manifest["shards"]):
        if entry["file"] in damaged:
            with pytest.raises(CorruptShardError, match=entry["file"]):
                cache.shards.reader(i)
    before = (home / "runs/tiny/distill/manifest.json").read_bytes()
    r = hpd_cli(home, "run", "distill", "--force")
    assert r.exit_code == 2 and "missing or corrupt" in r.stderr
    assert any(name in r.stderr for name in damaged), r.stderr
    assert (home / "runs/tiny/distill/manifest.json").read_bytes() == before  # nothing new published


@pytest.mark.parametrize("edit", ["value", "invalid json"])
def test_a_hand_edited_manifest_is_refused(tiny_runner, home, edit):
    cache_dir = home / "caches" / tiny_runner.manifest("score")["outputs"]["cache_id"]
    path = cache_dir / "manifest.json"
    if edit == "value":  # e.g. someone "fixing" a count by hand
        m = json.loads(path.read_text())
        m["shards"][0]["rows"] += 1
        path.write_text(json.dumps(m))
    else:
        path.write_text(path.read_text()[:-20])
    with pytest.raises(CorruptShardError, match="manifest.json"):
        LogitCache(cache_dir)
    r = hpd_cli(home, "cache", "verify", cache_dir.name)
    assert r.exit_code == 1 and str(path) in r.stderr
    r = hpd_cli(home, "run", "distill", "--force")
    assert r.exit_code == 2 and str(path) in r.stderr.strip().splitlines()[-1]


def test_damaged_sequences_are_named_before_training(tiny_runner, home):
    shard = sorted((home / "runs/tiny/generate/sequences").glob("shard-*.arrow"))[1]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    r = hpd_cli(home, "run", "distill", "--force")
    assert r.exit_code == 2 and shard.name in r.stderr.strip().splitlines()[-1]


READER = """
import sys, time
from hpd.storage.logit_cache import LogitCache
c = LogitCache(sys.argv[1]).hold()
print("reading", flush=True)
sys.stdin.read()
"""


def test_gc_never_removes_a_cache_that_is_being_read(tiny_runner, home):
    keep = tiny_runner.manifest("score")["outputs"]["cache_id"]
    assert hpd_cli(home, "cache", "repack", keep, "--k", "3").exit_code == 0
    derived = next(
        p for p in (home / "caches").iterdir() if p.is_dir() and p.name not in (keep,) and not p.name.startswith(".")
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(derived)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip() == "reading"
        r = hpd_cli(home, "cache", "gc")
        assert r.exit_code == 0 and derived.exists(), r.output  # unreferenced, but in use
        assert LogitCache(derived).batch([0]).mask.any()  # and whole
    finally:
        reader.kill()  # SIGKILL: no exit handler removes its lease
        reader.wait()
    r = hpd_cli(home, "cache", "gc")
    assert not derived.exists() and f"removed {derived}" in r.output  # a dead reader's lease does not count
    assert (home / "caches" / keep).exists()
