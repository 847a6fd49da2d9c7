"""`hpd cache` ls / show / verify / repack / gc, and two writers racing for one cache key."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpd.storage.logit_cache import LogitCache

from conftest import TINY, copy_home, hpd_cli, make_runner


@pytest.fixture()
def home(tiny_home, tmp_path):
    return copy_home(tiny_home, tmp_path / "home")


def test_ls_and_show_json(home, tiny_runner):
    out = tiny_runner.manifest("score")["outputs"]
    r = hpd_cli(home, "cache", "ls", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == out["cache_id"] and row["k"] == out["top_k"] and row["runs"] == ["tiny"]
    assert row["tokens"] == out["tokens"] and row["bytes"] == out["bytes"]
    assert row["bytes_per_token"] == pytest.approx(row["bytes"] / row["tokens"], abs=0.01)
    assert row["sequences"] == 240 and row["encoding"]["name"] == "idsort-q8"
    assert "models/" in row["teacher"] and row["data"].endswith("train.jsonl")
    r = hpd_cli(home, "cache", "show", out["cache_id"][:8], "--json")
    shown = json.loads(r.stdout)
    assert shown["id"] == row["id"] and len(shown["shard_list"]) == shown["shards"] == 5
    assert hpd_cli(home, "cache", "ls").exit_code == 0
    r = hpd_cli(home, "cache", "show", "zzzz")
    assert r.exit_code == 2 and "no cache" in r.stderr


def test_verify_names_each_bad_shard(home, tiny_runner):
    cache_id = tiny_runner.manifest("score")["outputs"]["cache_id"]
    assert hpd_cli(home, "cache", "verify", cache_id).exit_code == 0
    for name in ("shard-00001.arrow", "shard-00003.arrow"):
        p = home / "caches" / cache_id / name
        data = bytearray(p.read_bytes())
        data[len(data) // 3] ^= 0x01  # one flipped bit
        p.write_bytes(bytes(data))
    r = hpd_cli(home, "cache", "verify", cache_id)
    assert r.exit_code == 1
    assert "shard-00001.arrow" in r.stderr and "shard-00003.arrow" in r.stderr and "shard-00000" not in r.stderr


def test_repack_agrees_with_scoring_at_that_k(home):
    # A rank-ordered base: its top-4 is an exact prefix. (An id-ordered cache re-ranks by its quantised
    # values, so where two of them tie at the k boundary it may keep the other one.)
    base = make_runner(home, 'score.encoding="rank-q8"', run="rank")
    base.run()
    cache = LogitCache(Path(base.manifest("score")["outputs"]["cache"]))
    r = hpd_cli(home, "cache", "repack", cache.id, "--k", "4")
    assert r.exit_code == 0, r.output
    rp = LogitCache(home / "caches" / r.stdout.split(":")[0])
    assert rp.k == 4 and rp.key["derived_from"] == cache.id
    scored = make_runner(home, "score.top_k=4", 'score.encoding="rank-q8"', run="k4")
    scored.run()
    direct = LogitCache(Path(scored.manifest("score")["outputs"]["cache"]))
    assert direct.id != rp.id  # a derived cache never passes for a scored one
    ids = list(range(cache.num_sequences))
    a, b = rp.batch(ids), direct.batch(ids)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.topk_ids[a.mask], b.topk_ids[b.mask])
    assert torch.equal(a.target_logprob, b.target_logprob)
    step = cache.encoding.step
    assert (a.topk_logprobs[a.mask] - b.topk_logprobs[b.mask]).abs().max() <= step / 2 + 0.01
    # The tail absorbs the dropped entries, each known to within the quantisation error.
    assert (a.tail_logmass[a.mask] - b.tail_logmass[b.mask]).abs().max() <= step / 2 + 0.01
    again = hpd_cli(home, "cache", "repack", cache.id, "--k", "4")
    assert rp.id in again.stdout  # keyed and shared: the same request reuses it
    bad = hpd_cli(home, "cache", "repack", cache.id, "--k", "99")
    assert bad.exit_code == 2 and "must be between 1" in bad.stderr


def test_gc_removes_temporaries_and_unreferenced_caches(home, tiny_runner):
    keep = tiny_runner.manifest("score")["outputs"]["cache_id"]
    hpd_cli(home, "cache", "repack", keep, "--k", "3")
    (home / "caches" / ".tmp-deadbeef").mkdir()
    r = hpd_cli(home, "cache", "gc", "--dry-run")
    assert r.exit_code == 0 and r.stdout.count("would remove") == 2
    assert (home / "caches" / ".tmp-deadbeef").exists()
    r = hpd_cli(home, "cache", "gc")
    left = sorted(p.name for p in (home / "caches").iterdir() if p.is_dir())
    assert left == [keep], r.output


def test_concurrent_writers_share_one_cache(home, tmp_path):
    """Two runs asking for the same new cache at once: one builds it, the other waits and reuses it."""
    cache_dir = Path(make_runner(home).manifest("score")["outputs"]["cache"])
    shutil.rmtree(cache_dir)
    procs = []
    for run in ("a", "b"):
        args = [sys.executable, "-m", "hpd.pipeline.cli", "run", "--config", TINY, "--set", f'run.name="{run}"']
        procs.append(
            subprocess.Popen(
                args,
                env={**os.environ, "HPD_HOME": str(home)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    ids = {make_runner(home, run=r).manifest("score")["outputs"]["cache_id"] for r in ("a", "b")}
    assert ids == {cache_dir.name}
    assert not [p for p in (home / "caches").iterdir() if p.name.startswith(".tmp-")]
    r = hpd_cli(home, "cache", "verify", cache_dir.name)
    assert r.exit_code == 0
    users = json.loads((cache_dir / "users.json").read_text())
    assert {"a", "b"} <= set(users)


READER = """
import hashlib, sys
from hpd.storage.logit_cache import LogitCache
c = LogitCache(sys.argv[1])
b = c.batch(list(range(c.num_sequences)))
h = hashlib.sha256()
for t in (b.topk_ids, b.topk_logprobs, b.target_logprob, b.tail_logmass, b.mask):
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_two_experiments_read_one_cache_at_once(tiny_runner):
    path = tiny_runner.manifest("score")["outputs"]["cache"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READER, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and len(outs[0][0].strip()) == 64
