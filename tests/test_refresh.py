"""On-policy refresh rounds: student samples rescored into caches of their own, mixed into training by share."""

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from hpd.common.errors import HpdError
from hpd.stages.distill import CacheCollator, mixture_loss
from hpd.stages.losses import CachedTargets, distill_loss, response_positions
from hpd.stages.sources import Source, mixture_plan
from hpd.storage.logit_cache import LogitCache, tokens_crc
from hpd.storage.sequences import SequenceStore

from conftest import copy_home, hpd_cli, hpd_process, make_runner

# One round: 25% of the 240 prompts, 2 samples each, in shards of 20 prompts; a quarter of every batch refreshed.
ROUND = [
    "rounds.count=1",
    "rounds.steps=5",
    "rounds.warmup_steps=1",
    "rounds.refresh_share=0.25",
    "refresh.prompt_fraction=0.25",
    "refresh.samples_per_prompt=2",
    "refresh.shard_size=20",
]


@pytest.fixture(scope="module")
def round_home(tiny_home, tmp_path_factory):
    """The tiny run plus one finished refresh round (its offline stages copied from the session's run)."""
    home = copy_home(tiny_home, tmp_path_factory.mktemp("rounds") / "home")
    base = LogitCache(Path(make_runner(home).manifest("score")["outputs"]["cache"]))
    before = {"checksums": [s["checksum"] for s in base.manifest["shards"]], "rows": base.num_sequences}
    make_runner(home, *ROUND).run()
    return home, before


def outputs(runner, stage):
    return runner.manifest(stage)["outputs"]


def test_refresh_cache_is_keyed_by_round_and_student_checkpoint(round_home, tmp_path):
    home, _ = round_home
    r = make_runner(home, *ROUND)
    assert [s for s in r.order if s[-2:] == "-1"] == ["refresh-1", "rescore-1", "distill-1"]
    assert all(r.state(s)[0] == "done" for s in r.order)
    student = outputs(r, "distill")["fingerprint"]
    refresh = outputs(r, "refresh-1")
    cache = LogitCache(Path(outputs(r, "rescore-1")["cache"]))
    assert refresh["origin"] == {"round": 1, "student": student} and cache.key["origin"] == refresh["origin"]
    assert cache.key["data"] == refresh["fingerprint"] != outputs(r, "generate")["fingerprint"]
    assert cache.num_sequences == refresh["count"] == 60 * 2
    base = LogitCache(Path(outputs(r, "score")["cache"]))
    assert "origin" not in base.key and base.dir != cache.dir

    # Another run with the same student and settings shares the refresh cache; another student gets its own.
    same = make_runner(home, *ROUND, run="same")
    same.adopt("tiny", ["data", "teacher", "generate", "score", "distill"])
    same.run("refresh-1"), same.run("rescore-1")
    assert outputs(same, "rescore-1")["cache"] == str(cache.dir)
    other = make_runner(home, *ROUND, "distill.seed=1", run="other")
    other.adopt("tiny", ["data", "teacher", "generate", "score"])
    other.run("distill"), other.run("refresh-1"), other.run("rescore-1")
    assert outputs(other, "refresh-1")["origin"]["student"] != student
    assert outputs(other, "rescore-1")["cache"] != str(cache.dir)


def test_refreshed_sequences_never_enter_the_base_cache(round_home):
    home, before = round_home
    r = make_runner(home, *ROUND)
    base = LogitCache(Path(outputs(r, "score")["cache"]))
    assert [s["checksum"] for s in base.manifest["shards"]] == before["checksums"]
    assert base.num_sequences == before["rows"] == len(SequenceStore(Path(outputs(r, "generate")["sequences"])))
    refreshed = SequenceStore(Path(outputs(r, "refresh-1")["sequences"]))
    base_crcs = {int(c) for d in base.iter_decoded() for c in d.crcs}
    _, plens, seqs = refreshed.range(0, len(refreshed))
    assert not base_crcs & {tokens_crc(s) for s in seqs}
    meta = json.loads((Path(outputs(r, "refresh-1")["sequences"]) / "manifest.json").read_text())
    assert meta["origin"]["round"] == 1
    assert all(len(s) > p for s, p in zip(seqs, plens))  # each has a sampled response after its prompt


def test_mixture_plan_respects_shares_and_reads_each_source_in_passes():
    sizes, shares, batch = [50, 7], [0.9, 0.1], 16
    plan = mixture_plan(sizes, shares, batch, num_batches=40, seed=3)
    assert all(len(b) == batch for b in plan)
    per_batch = [Counter(s for s, _ in b) for b in plan]
    assert {c[1] for c in per_batch} <= {1, 2}  # 1.6 refreshed rows per batch: never more than a row off
    for n in range(1, 41):  # running counts stay within one row of the share
        assert abs(sum(c[1] for c in per_batch[:n]) - 0.1 * batch * n) < 1
    assert sum(c[1] for c in per_batch) == 64 and sum(c[0] for c in per_batch) == 576
    for s, size in enumerate(sizes):
        rows = [i for b in plan for src, i in b if src == s]
        for p in range(len(rows) // size):  # every full pass holds each row exactly once
            assert sorted(rows[p * size : (p + 1) * size]) == list(range(size))
    assert mixture_plan(sizes, shares, batch, 40, seed=3) == plan != mixture_plan(sizes, shares, batch, 40, seed=4)


def test_round_training_reads_the_planned_mixture(round_home):
    home, _ = round_home
    r = make_runner(home, *ROUND)
    out = outputs(r, "distill-1")
    log = json.loads((Path(out["student_dir"]) / "training_log.json").read_text())
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 5  # logged every step at this size
    counts = [(e.get("offline_sequences", 0), e.get("refresh_sequences", 0)) for e in steps]
    assert all(a + b == 16 for a, b in counts)
    assert [b for _, b in counts] == [4] * 5  # a quarter of each batch of 16
    assert out["report"]["round"] == 1 and out["report"]["student_steps"] == 4 + 5
    assert out["report"]["mixture"]["refresh"] == {
        "share": 0.25,
        "method": "hpd",
        "cache": outputs(r, "rescore-1")["cache_id"],
    }


def test_mixture_loss_is_each_sources_loss_weighted_by_its_tokens(round_home):
    home, _ = round_home
    r = make_runner(home, *ROUND)
    caches = [LogitCache(Path(outputs(r, s)["cache"])) for s in ("score", "rescore-1")]
    stores = [SequenceStore(Path(outputs(r, s)["sequences"])) for s in ("generate", "refresh-1")]
    rows = []
    for src, ids in ((0, [3, 8, 11]), (1, [0, 5]), (0, [40])):
        for i in ids:
            seq, plen = stores[src].get(i)
            rows.append({"seq_id": i, "input_ids": seq.tolist(), "prompt_len": plen, "source": src})
    batch = CacheCollator(0, *caches)(rows)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 18, dtype=torch.float64).float()
    cb = batch["teacher"]  # the collator's CacheBatch, rows in batch order whatever their cache
    sources = [
        Source("offline", stores[0], caches[0], "fkl", 0.75),
        Source("refresh", stores[1], caches[1], "opd", 0.25),
    ]
    loss, diag = mixture_loss(
        sources, logits[response_positions(batch["labels"])], batch["labels"], CachedTargets(cb), batch["source"], {}
    )
    parts = []
    for s, src in enumerate(sources):
        m = batch["source"] == s
        parts.append(distill_loss(src.method, logits[m], batch["labels"][m], teacher=cb.select(m)))
    n = [d["tokens"] for _, d in parts]
    assert diag["tokens"] == sum(n) and diag["refresh_sequences"] == 2 and diag["offline_sequences"] == 4
    assert torch.allclose(loss, (parts[0][0] * n[0] + parts[1][0] * n[1]) / sum(n))


def test_on_policy_loss_is_refused_for_offline_sequences(round_home):
    home, _ = round_home
    with pytest.raises(HpdError, match="opd needs on-policy sequences"):
        make_runner(home, *ROUND, 'rounds.offline_method="opd"', run="opd-offline").run()


def test_more_rounds_keep_the_finished_ones_and_status_shows_the_round(round_home, tmp_path):
    home = copy_home(round_home[0], tmp_path / "home")
    r = make_runner(home, *ROUND, "rounds.count=2")
    assert [r.state(s)[0] for s in ("distill-1", "refresh-2", "rescore-2", "distill-2")] == [
        "done",
        "missing",
        "waiting",
        "waiting",
    ]
    res = hpd_cli(home, "status", overrides=[*ROUND, "rounds.count=2"])
    assert res.exit_code == 0 and "round: 1 of 2 refresh rounds finished; next: refresh-2" in res.output
    assert "distill-1 (hpd 75% offline + hpd 25% refresh)" in res.output
    status = json.loads(hpd_cli(home, "status", "--json", overrides=[*ROUND, "rounds.count=2"]).output)
    assert status["rounds"] == {"rounds": 2, "finished": 1, "next": "refresh-2"}


def _kill_and_resume(home, stage, overrides, kill_at):
    proc = hpd_process(home, "run", stage, overrides=overrides, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    r = make_runner(home, *overrides)
    assert r.state(stage)[0] == "interrupted"
    logs = []
    r.ctx.log = logs.append
    r.run(stage)
    assert r.state(stage)[0] == "done"
    return r, logs


def test_interrupted_refresh_and_rescore_resume_to_the_same_output(round_home, tmp_path):
    reference = make_runner(round_home[0], *ROUND)
    home = copy_home(round_home[0], tmp_path / "home")
    for stage in ("refresh-1", "rescore-1", "distill-1"):
        (home / "runs" / "tiny" / stage / "manifest.json").unlink()
    import shutil

    shutil.rmtree(home / "runs" / "tiny" / "refresh-1" / "sequences")
    shutil.rmtree(Path(str(outputs(reference, "rescore-1")["cache"]).replace(str(round_home[0]), str(home))))

    r, _ = _kill_and_resume(home, "refresh-1", ROUND, "shard:2")  # 3 shards of 20 prompts: killed after 2
    assert outputs(r, "refresh-1")["fingerprint"] == outputs(reference, "refresh-1")["fingerprint"]
    r, logs = _kill_and_resume(home, "rescore-1", ROUND, "shard:1")
    assert any("resuming: 1 of 3" in line for line in logs)
    resumed, ref = (LogitCache(Path(outputs(x, "rescore-1")["cache"])) for x in (r, reference))
    assert [s["checksum"] for s in resumed.manifest["shards"]] == [s["checksum"] for s in ref.manifest["shards"]]


def test_sigkilled_round_training_resumes_without_repeating_or_skipping_data(round_home, tmp_path):
    """Killed after its first checkpoint, a round's training resumes there; reading the planned mixture in
    order from that point, it ends with exactly the student of the uninterrupted round."""
    reference = make_runner(round_home[0], *ROUND)
    home = copy_home(round_home[0], tmp_path / "home")
    (home / "runs" / "tiny" / "distill-1" / "manifest.json").unlink()
    import shutil

    shutil.rmtree(home / "runs" / "tiny" / "distill-1" / "student")
    overrides = [*ROUND, "distill.checkpoint_steps=2"]
    make_runner(home, *overrides).run("distill")  # checkpointing changed its config: retrained, same student
    r, logs = _kill_and_resume(home, "distill-1", overrides, "checkpoint:1")
    assert "[distill-1] resuming from checkpoint-2 of 5 steps" in logs
    assert outputs(r, "distill")["fingerprint"] == outputs(reference, "distill")["fingerprint"]
    assert outputs(r, "distill-1")["fingerprint"] == outputs(reference, "distill-1")["fingerprint"]
