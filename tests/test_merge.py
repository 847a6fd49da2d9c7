"""Teacher ensembles (hpd/storage/merge.py): the mixture of several teachers' caches, against a float64 reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpd.storage.logit_cache import CacheRoot, LogitCache
from hpd.storage.merge import MixedCache, merge, mix_positions

from conftest import copy_home, hpd_cli, make_runner

V, N = 12, 40


def _teachers(seed: int, count: int = 2, sharp=(1.0, 1.0)):
    """Random full distributions [N, V] per teacher, float64, and a next token per position."""
    g = torch.Generator().manual_seed(seed)
    logp = [torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2 * s, -1) for s in sharp[:count]]
    return logp, torch.randint(0, V, (N,), generator=g)


def _as_topk(logp: torch.Tensor, target: torch.Tensor, k: int):
    """What a cache stores for these distributions at k (ids sorted by probability)."""
    top, ids = logp.topk(k, -1)
    tail = torch.logsumexp(logp.scatter(-1, ids, -float("inf")), -1)
    return ids, top, tail, logp.gather(-1, target[:, None])[:, 0]


def _reference(logp, weights):
    w = np.asarray(weights, np.float64) / sum(weights)
    return sum(wi * lp.exp() for wi, lp in zip(w, logp))


@pytest.mark.unit
@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (0.2, 0.5, 0.3)])
def test_with_k_equal_vocabulary_the_merge_is_the_exact_mixture(weights):
    logp, target = _teachers(0, len(weights), sharp=(1.0, 0.5, 2.0))
    p = _reference(logp, weights)
    for k in (V, 5):  # the whole merged distribution, and its top 5 with the rest in the tail
        ids, lp, tail, tgt = mix_positions([_as_topk(x, target, V) for x in logp], weights, V, k)
        top, top_ids = p.topk(k, -1)
        assert torch.equal(ids, top_ids)
        assert torch.allclose(lp.double().exp(), top, atol=1e-6)
        assert torch.allclose(tail.double().exp(), 1 - top.sum(-1), atol=1e-6)
        assert torch.allclose(tgt.double().exp(), p.gather(-1, target[:, None])[:, 0], atol=1e-6)


@pytest.mark.unit
def test_with_small_k_the_merge_is_a_distribution_within_the_stated_bound():
    weights, k_in = (2, 1), 4
    logp, target = _teachers(1)
    p = _reference(logp, weights)
    cached = [_as_topk(x, target, k_in) for x in logp]
    ids, lp, tail, tgt = mix_positions(cached, weights, V, k_in)
    merged = lp.double().exp()
    assert torch.allclose(merged.sum(-1) + tail.double().exp(), torch.ones(N, dtype=torch.float64), atol=1e-5)
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for n in range(N):
        for j, v in enumerate(ids[n].tolist()):
            # only teachers that did not list v are estimated; each is off by at most its weighted tail
            bound = sum(w[i] * cached[i][2][n].exp() for i in range(2) if v not in cached[i][0][n].tolist())
            assert abs(merged[n, j] - p[n, v]) <= bound + 1e-6
    assert torch.allclose(tgt.double().exp(), p.gather(-1, target[:, None])[:, 0], atol=1e-6)  # exact


@pytest.mark.unit
def test_confidence_weighting_leans_on_the_surer_teacher():
    logp, target = _teachers(2, sharp=(4.0, 0.2))  # teacher 0 sharp, teacher 1 nearly uniform
    full = [_as_topk(x, target, V) for x in logp]
    _, fixed_lp, _, _ = mix_positions(full, (1, 1), V, V)
    ids, conf_lp, _, _ = mix_positions(full, (1, 1), V, V, weighting="confidence")
    h = torch.stack([-(lp.exp() * lp).sum(-1) for lp in logp])  # float64 entropies
    w = torch.softmax(-h, 0)  # exp(-H_i) renormalised, equal base weights
    expected = (w[:, :, None] * torch.stack([lp.exp() for lp in logp])).sum(0)
    assert torch.allclose(conf_lp.double().exp(), expected.gather(-1, ids), atol=1e-6)
    sharp_top = logp[0].argmax(-1)
    assert (expected.gather(-1, sharp_top[:, None]) > _reference(logp, (1, 1)).gather(-1, sharp_top[:, None])).all()


@pytest.fixture(scope="module")
def two_teachers(tiny_home, tmp_path_factory):
    """A home with two teachers' caches of the same sequences (the second teacher trained longer)."""
    home = copy_home(tiny_home, tmp_path_factory.mktemp("merge") / "home")
    a = make_runner(home)
    b = make_runner(home, "teacher.steps=12", run="b")
    b.run(until="score")
    ca, cb = LogitCache(Path(a.outputs("score").cache)), LogitCache(Path(b.outputs("score").cache))
    assert ca.id != cb.id and ca.key["data"] == cb.key["data"]
    return home, ca, cb


def test_a_published_merge_equals_the_mixture_read_at_load_time(two_teachers):
    home, ca, cb = two_teachers
    root = CacheRoot(home / "caches")
    merged = merge([ca, cb], [3, 1], root, k=8, encoding="fp16")
    assert merged.key["derived_from"] == {"merge": [ca.id, cb.id], "weights": [0.75, 0.25], "weighting": "fixed"}
    assert merge([ca, cb], [3, 1], root, k=8, encoding="fp16").id == merged.id  # found, not redone
    assert merge([ca, cb], [1, 1], root, k=8, encoding="fp16").id != merged.id  # the weights are in the key
    # the key changes with any teacher, weight, k or weighting (and not with how the weights are scaled)
    ids = {
        MixedCache(cs, w, k, weighting=g).id
        for cs, w, k, g in [
            ([ca, cb], [3, 1], 8, "fixed"),
            ([ca, cb], [6, 2], 8, "fixed"),
            ([ca, cb], [1, 3], 8, "fixed"),
            ([ca, cb], [3, 1], 6, "fixed"),
            ([ca, cb], [3, 1], 8, "confidence"),
        ]
    }
    assert len(ids) == 4
    with pytest.raises(ValueError, match=f"cache {ca.id} is named twice"):  # one teacher is no mixture
        MixedCache([ca, ca], [3, 1], 8)
    mixed = MixedCache([ca, cb], [3, 1], k=8)
    seqs = [0, 5, 17]
    a, b = merged.batch(seqs), mixed.batch(seqs)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.topk_ids[a.mask], b.topk_ids[b.mask])
    assert torch.allclose(a.topk_logprobs[a.mask], b.topk_logprobs[b.mask], atol=2e-3)  # fp16 storage
    # k = the vocabulary: the merged cache holds the exact mixture of the two teachers' stored distributions
    one, two = ca.batch(seqs), cb.batch(seqs)
    m, vocab = one.mask, ca.manifest["vocab_size"]
    assert ca.k == cb.k == vocab
    p = 0.75 * torch.zeros(m.sum(), vocab).scatter(
        -1, one.topk_ids[m], one.topk_logprobs[m].exp()
    ) + 0.25 * torch.zeros(m.sum(), vocab).scatter(-1, two.topk_ids[m], two.topk_logprobs[m].exp())
    assert torch.allclose(
        b.target_logprob[m].exp(), 0.75 * one.target_logprob[m].exp() + 0.25 * two.target_logprob[m].exp(), atol=1e-6
    )
    assert torch.allclose(b.topk_logprobs[m].exp(), p.gather(-1, b.topk_ids[m]), atol=1e-5)


def test_merge_killed_mid_write_resumes_to_identical_bytes(two_teachers, tmp_path):
    home, ca, cb = two_teachers
    code = (
        "import sys; from pathlib import Path; from hpd.storage.logit_cache import CacheRoot, LogitCache; "
        "from hpd.storage.merge import merge; r = CacheRoot(Path(sys.argv[1])); "
        "merge([LogitCache(Path(sys.argv[2])), LogitCache(Path(sys.argv[3]))], [1, 2], r, k=6)"
    )
    args = [sys.executable, "-c", code, str(tmp_path / "killed"), str(ca.dir), str(cb.dir)]
    killed = subprocess.run(args, env={**os.environ, "HPD_KILL_AT": "shard:2"}, capture_output=True)
    assert killed.returncode == -9 and not list((tmp_path / "killed").glob("*/manifest.json"))
    subprocess.run(args, check=True, capture_output=True)  # resumes after the 2 published shards
    whole = merge([ca, cb], [1, 2], CacheRoot(tmp_path / "whole"), k=6)
    resumed = next((tmp_path / "killed").glob("*/manifest.json")).parent
    assert resumed.name == whole.id
    for shard in sorted(whole.dir.glob("shard-*.arrow")):
        assert (resumed / shard.name).read_bytes() == shard.read_bytes()


def test_cache_merge_command_and_its_refusals(two_teachers, tmp_path):
    home, ca, cb = two_teachers
    r = hpd_cli(home, "cache", "merge", ca.id, cb.id, "--weights", "1,1", "--k", "8", "--weighting", "confidence")
    assert r.exit_code == 0, r.output
    new_id = r.output.split(":")[0]
    shown = json.loads(hpd_cli(home, "cache", "show", new_id, "--json").output)
    assert shown["derived_from"]["weighting"] == "confidence" and shown["k"] == 8
    before = sorted(p.name for p in (home / "caches").iterdir())
    for args, message in [
        (["--weights", "1,-1"], "must be one non-negative number per cache"),
        (["--weights", "0,0"], "summing to more than 0"),
        (["--weights", "a,b"], "must be numbers separated by commas"),
        (["--k", "999"], "between 1 and the largest k"),
        (["--k", "0"], "between 1 and the largest k"),  # never silently the default
        (["--encoding", "sampled:4"], "encoding sampled:4 holds draws"),
        (["--encoding", "zip"], "unknown encoding 'zip'"),
        (["--k", "1"], "encoding idsort-q8 needs k >= 2"),
        ([cb.id], f"cache {cb.id} is named twice"),
    ]:
        r = hpd_cli(home, "cache", "merge", ca.id, cb.id, *args)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    r = hpd_cli(home, "cache", "merge", ca.id, "nosuchcache")
    assert r.exit_code == 2 and "nosuchcache" in r.output
    assert sorted(p.name for p in (home / "caches").iterdir()) == before  # nothing published, nothing left
    assert "compact[:STEP]" in hpd_cli(home, "cache", "merge", "--help").output


def test_merge_refuses_caches_of_other_sequences_or_tokenizers(two_teachers, tmp_path):
    home, ca, cb = two_teachers
    other = make_runner(home, "generate.num_prompts=120", run="fewer")
    other.run(until="score")
    cc = LogitCache(Path(other.outputs("score").cache))
    with pytest.raises(ValueError, match="scored on different sequences"):
        MixedCache([ca, cc], [1, 1], k=4)
    fake = LogitCache(cb.dir)
    fake.key = {**cb.key, "tokenizer": "another"}
    with pytest.raises(ValueError, match="different tokenizers"):
        MixedCache([ca, fake], [1, 1], k=4)
