"""Sampled targets and compact ids on disk: each encoding round-trips, a sampled cache hands the losses exactly the
draws it was given, the score stage's draws do not depend on batching and resume byte for byte after SIGKILL,
and what cannot be derived or mixed is refused with one line."""

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from hpd.stages.cache_rows import sample_positions
from hpd.storage import encodings as enc
from hpd.storage.cache_batch import SampledBatch
from hpd.storage.catalog import repack, verify
from hpd.storage.logit_cache import VOCAB_ORDER, CacheRoot, LogitCache, ScoredSequence, cache_key
from hpd.storage.merge import merge

from conftest import copy_home, hpd_cli, hpd_process, make_runner


def _draws(P, V, draws, seed, scale=3.0, head=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(P, V, generator=g) * scale
    nxt = torch.randint(0, V, (P,), generator=g)
    return logits, nxt, sample_positions(logits, nxt, draws=draws, generator=g, fill=False, head=head)


@pytest.mark.unit
@pytest.mark.parametrize("vocab", [300, 70000])  # uint16 and uint32 ids: two and four byte planes
def test_sampled_encoding_round_trips_ids_counts_and_log_probs(vocab):
    _, _, d = _draws(40, vocab, 16, 0)
    code = enc.get("sampled:16")
    order = enc.VocabOrder.learn(d.ids[d.counts > 0].numpy(), vocab)
    cols = code.encode(d.ids.numpy(), d.logprob.numpy(), vocab, counts=d.counts.numpy(), order=order)
    assert len(cols["q"]) == int((d.counts > 0).sum())  # only drawn slots are stored
    ids, lps = code.decode(cols, 40, 16, order=order)
    counts = code.decode_counts(cols, 40)
    for p in range(40):  # as sets: the slots come back in the order's numbering
        want = {int(i): (int(c), float(lp)) for i, c, lp in zip(d.ids[p], d.counts[p], d.logprob[p]) if c > 0}
        got = {int(i): (int(c), float(lp)) for i, c, lp in zip(ids[p], counts[p], lps[p]) if c > 0}
        assert want.keys() == got.keys() and all(want[i][0] == got[i][0] for i in want)
        top1 = max(v[1] for v in want.values())
        for i, (_, lp) in want.items():
            assert abs(got[i][1] - lp) <= code.max_error(abs(top1), gap=top1 - lp) + 1e-6
        assert int(counts[p].sum()) == 16 and (lps[p][counts[p] == 0] == -np.inf).all()


@pytest.mark.unit
@pytest.mark.parametrize("vocab", [16, 8192, 70000])
def test_compact_encoding_keeps_ids_exactly_and_log_probs_within_its_bound(vocab):
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(30, vocab, generator=g, dtype=torch.float64) * 4, -1)
    vals, ids = torch.topk(lp, min(12, vocab), dim=1)
    learned = enc.VocabOrder.learn(ids[:10].numpy(), vocab)  # from part of the data, like a cache
    assert (learned.id_of[learned.number] == np.arange(vocab)).all()  # a permutation
    code = enc.get("compact")
    cols = code.encode(ids.numpy(), vals.float().numpy(), vocab, order=learned)
    d_ids, d_lps = code.decode(cols, *ids.shape, order=learned)
    for p in range(30):
        want = dict(zip(ids[p].tolist(), vals[p].tolist()))
        got = dict(zip(d_ids[p].tolist(), d_lps[p].tolist()))
        assert want.keys() == got.keys()
        top1 = max(want.values())
        assert all(abs(got[i] - v) <= code.max_error(abs(top1), gap=top1 - v) + 1e-6 for i, v in want.items())


@pytest.mark.unit
@pytest.mark.parametrize("encoding", ["sampled:32", "sampled-counts:32", "sampled:5+32"])
def test_a_sampled_cache_gives_back_the_draws_as_unbiased_weights(tmp_path, encoding):
    V, rows, head = 500, [], enc.get(encoding).head
    for s in range(5):
        logits, nxt, d = _draws(7 + s, V, 32, s, head=head)
        rows.append(
            ScoredSequence(
                seq_id=s,
                input_ids=np.arange(9 + s),
                start=2,
                topk_ids=d.ids.numpy(),
                topk_logprobs=d.logprob.numpy(),
                target_logprob=d.target.numpy(),
                tail_logmass=d.tail.numpy(),
                counts=d.counts.numpy(),
                rest_logmass=d.rest.numpy() if head else None,
            )
        )
    root = CacheRoot(tmp_path)
    key = cache_key(teacher="t", tokenizer="t", data="d", top_k=32, temperature=1.0, encoding=encoding)
    w = root.writer(
        key,
        shard_size=3,
        num_sequences=5,
        vocab_size=V,
        learn_order=lambda: np.concatenate([r.topk_ids[r.topk_logprobs > -np.inf] for r in rows[:2]]),
    )
    w.write_rows(0, rows[:3])
    w.write_rows(1, rows[3:])
    w.finish(2)
    cache = LogitCache(root.path_for(key))
    assert cache.sampled and cache.k == 32 + head and cache.bytes > cache.manifest["bytes"]  # + the order, once
    batch = cache.batch(range(5), input_ids=[r.input_ids for r in rows])
    assert isinstance(batch, SampledBatch) and batch.ids.shape[-1] == 32 + head
    for b, r in enumerate(rows):
        sl = slice(2, 2 + len(r.target_logprob))
        for f in ("target_logprob", "tail_logmass"):  # float16 in compact and sampled caches
            assert torch.equal(getattr(batch, f)[b, sl], torch.as_tensor(getattr(r, f)).half().float())
        assert batch.mask[b, sl].all() and not batch.mask[b, :2].any()
        for t in range(len(r.target_logprob)):
            drawn = {int(i): int(c) for i, c in zip(r.topk_ids[t], r.counts[t]) if c > 0}
            got = {
                int(i): float(w.exp()) for i, w in zip(batch.ids[b, 2 + t], batch.log_weight[b, 2 + t]) if w > -np.inf
            }
            heads = {int(i): float(lp) for i, lp in zip(r.topk_ids[t][:head], r.topk_logprobs[t][:head])}
            assert got.keys() == drawn.keys() | heads.keys()
            rest = float(np.exp(r.rest_logmass[t])) if head else 1.0  # the mass outside the head (float16 on disk)
            assert all(abs(got[i] / (c / 32 * rest) - 1) < 2e-3 for i, c in drawn.items())  # p_hat = count / N x rest
            assert all(
                abs(np.log(got[i]) - float(batch.logprob[b, 2 + t][batch.ids[b, 2 + t] == i][0])) < 1e-5 for i in heads
            )  # the head: p itself (as stored)
            exact = dict(zip(r.topk_ids[t].tolist(), r.topk_logprobs[t].tolist()))
            logp = {int(i): float(lp) for i, lp in zip(batch.ids[b, 2 + t], batch.logprob[b, 2 + t]) if lp > -np.inf}
            assert logp.keys() == drawn.keys() | heads.keys()
            if encoding.startswith("sampled:"):  # the exact log-probs, companded
                top1 = max(exact[i] for i in logp)
                code = enc.get(encoding)
                assert all(
                    abs(logp[i] - exact[i]) <= code.max_error(abs(top1), gap=top1 - exact[i]) + 1e-6 for i in logp
                )
            else:  # p_hat scaled to the drawn mass: with the tail, a distribution
                total = sum(np.exp(v) for v in logp.values()) + np.exp(float(batch.tail_logmass[b, 2 + t]))
                assert abs(total - 1) < 1e-5
                assert all(
                    abs(np.exp(logp[i]) / (c / 32) - np.exp(logp[min(drawn)]) / (drawn[min(drawn)] / 32)) < 1e-5
                    for i, c in drawn.items()
                )
    (cache.dir / VOCAB_ORDER).write_bytes(b"damaged")
    assert any(VOCAB_ORDER in m for m in verify(cache.dir))


@pytest.mark.unit
def test_an_encoding_this_version_does_not_know_is_named_not_misread(tmp_path):
    with pytest.raises(ValueError, match="unknown encoding 'zigzag'"):
        enc.get({"name": "zigzag", "step": 0.1})
    for bad, says in [
        ("sampled:0", "from 1 to 255"),
        ("sampled:300", "from 1 to 255"),
        ("sampled:x", "whole number"),
        ("sampled:16:0.5", "proposal"),
        ("compact:fine", "number of nats"),
        ("sampled:200+100", "at most 255"),
        ("sampled-counts:8+8", "keeps no exact head"),
    ]:
        with pytest.raises(ValueError, match=says):
            enc.get(bad)


@pytest.fixture()
def home(tiny_home, tmp_path):
    return copy_home(tiny_home, tmp_path / "home")


SAMPLED = 'score.encoding="sampled:8"'


def test_sampled_scoring_resumes_after_sigkill_to_the_bytes_of_an_uninterrupted_build(home, tiny_home, tmp_path):
    proc = hpd_process(home, "run", "score", overrides=[SAMPLED], kill_at="shard:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    runner = make_runner(home, SAMPLED)
    runner.run("score")
    resumed = LogitCache(Path(runner.manifest("score")["outputs"]["cache"]))
    # the reference: built in one go, in other batches (a sequence's draws are its own, whatever its batch)
    ref_home = copy_home(tiny_home, tmp_path / "ref")
    ref = make_runner(ref_home, SAMPLED, "score.batch_size=5")
    ref.run("score")
    reference = LogitCache(Path(ref.manifest("score")["outputs"]["cache"]))
    assert reference.id == resumed.id and resumed.manifest["vocab_order"] == reference.manifest["vocab_order"]
    assert [s["checksum"] for s in resumed.manifest["shards"]] == [s["checksum"] for s in reference.manifest["shards"]]
    # another seed of the same request draws the same (a cache is reproducible), another N draws differently
    other = make_runner(ref_home, 'score.encoding="sampled:9"', run="n9")
    other.run(until="score")
    assert LogitCache(Path(other.manifest("score")["outputs"]["cache"])).id != reference.id


def test_training_from_sampled_targets_and_compact_ids_by_configuration_alone(home):
    for encoding, method in [("sampled:8", "fkl"), ("sampled:8", "hpd"), ("compact", "hpd")]:
        runner = make_runner(
            home, f'score.encoding="{encoding}"', f'distill.method="{method}"', run=f"{encoding.split(':')[0]}-{method}"
        )
        runner.run(until="distill")
        out = runner.manifest("score")["outputs"]
        assert out["encoding"] == encoding.split(":")[0] and out["bytes_per_token"] > 0
        assert runner.state("distill")[0] == "done"
    compact = LogitCache(
        Path(make_runner(home, 'score.encoding="compact"', run="compact-hpd").manifest("score")["outputs"]["cache"])
    )
    plain = LogitCache(Path(make_runner(home).manifest("score")["outputs"]["cache"]))  # idsort-q8, the same teacher
    ids = list(range(plain.num_sequences))
    a, b = compact.batch(ids), plain.batch(ids)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.target_logprob, b.target_logprob.half().float())
    assert torch.equal(a.topk_ids[a.mask].sort(-1).values, b.topk_ids[b.mask].sort(-1).values)  # ids: lossless


def test_what_cannot_be_derived_or_mixed_from_sampled_targets_is_refused(home):
    sampled = make_runner(home, SAMPLED, run="s")
    sampled.run(until="score")
    cache_id = sampled.manifest("score")["outputs"]["cache_id"]
    listed = hpd_cli(home, "cache", "ls").stdout  # named as the user wrote it
    assert any(line.startswith(cache_id) and " sampled:8 " in line for line in listed.splitlines()), listed
    assert enc.get("sampled:4+12").label == "sampled:4+12" and enc.get("compact").label == "compact:0.125"
    for args in [
        (cache_id, "--k", "4"),
        (make_runner(home).manifest("score")["outputs"]["cache_id"], "--k", "4", "--encoding", "sampled:4"),
    ]:
        r = hpd_cli(home, "cache", "repack", *args)
        assert r.exit_code != 0 and "cannot be derived without the teacher" in r.stderr, r.output
    root = CacheRoot(home / "caches")
    cache = root.open(cache_id)
    with pytest.raises(ValueError, match=f"cache {cache_id} holds sampled targets"):
        merge([root.open(make_runner(home).manifest("score")["outputs"]["cache_id"]), cache], [1, 1], root, 4)
    with pytest.raises(ValueError, match="cannot be derived"):
        repack(cache, root, 4)
    for overrides, says in [
        (['score.engine="vllm"'], "vLLM does not return"),
        (['teachers.runs="s"', 'teachers.mode="ensemble"'], "sampled targets do not keep"),
    ]:
        r = hpd_cli(home, "run", "--set", SAMPLED, *[x for o in overrides for x in ("--set", o)])
        assert r.exit_code != 0 and says in r.stderr and "Traceback" not in r.output, r.output


EVAL_BRIEFLY = ("eval.examples=10", "eval.samples=1", "eval.teacher=false")


@pytest.mark.parametrize("method", ["rkl", "akl"])
def test_methods_that_weigh_the_students_mass_train_a_finite_student_from_a_sampled_cache(home, method):
    """Empty slots (fewer distinct draws than slots, nearly every position of 16 draws over the task's 18 tokens) are
    no outcomes: rkl and akl once saw them as tokens with p = 0 and trained a student full of NaN."""
    from safetensors.torch import load_file

    runner = make_runner(
        home, 'score.encoding="sampled:16"', f'distill.method="{method}"', run=f"s16-{method}", *EVAL_BRIEFLY
    )
    runner.run()
    cache = LogitCache(Path(runner.manifest("score")["outputs"]["cache"]))
    batch = cache.batch(range(cache.num_sequences))
    assert (batch.logprob[batch.mask] == -np.inf).any()  # empty slots, as the student reads them
    weights = load_file(Path(runner.manifest("distill")["outputs"]["student_dir"]) / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert np.isfinite(runner.manifest("eval")["outputs"]["report"]["student"]["response_nll_nats"])


def test_a_head_that_leaves_nothing_to_draw_is_refused_before_the_cache_is_written(home):
    before = sorted((home / "caches").iterdir())
    r = hpd_cli(home, "run", overrides=['score.encoding="sampled:18+4"', 'run.name="head18"'])
    assert r.exit_code != 0 and "keeps a head of 18 tokens" in r.stderr and "Traceback" not in r.output, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and sorted((home / "caches").iterdir()) == before
    more = make_runner(home, 'score.encoding="sampled:32"', run="s32")  # more slots than the vocabulary: fine
    more.run(until="score")
    cache = LogitCache(Path(more.manifest("score")["outputs"]["cache"]))
    assert cache.k == 32 and cache.manifest["rows"] > 0
