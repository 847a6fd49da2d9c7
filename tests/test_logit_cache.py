"""The cache returns what the teacher produced: checked against a full-vocabulary float64 log-softmax."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hpd.stages import hf_models
from hpd.storage.logit_cache import CacheMismatchError, CacheRoot, LogitCache
from hpd.storage.sequences import SequenceStore
from hpd.storage.shards import CorruptShardError, ShardWriter

from conftest import make_runner


def _reference(model, ids: np.ndarray, temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(np.array(ids)[None], dtype=torch.long)).logits[0].double()
    return torch.log_softmax(logits / temperature, -1)  # [L, V] float64


@pytest.fixture(scope="module")
def scored(tiny_runner, teacher_dir):
    model, _ = hf_models.load_causal_lm(teacher_dir)
    cache = LogitCache(Path(tiny_runner.manifest("score")["outputs"]["cache"]))
    store = SequenceStore(Path(tiny_runner.manifest("generate")["outputs"]["sequences"]))
    return model, cache, store


def test_cache_round_trip_matches_full_vocabulary_reference(scored):
    model, cache, store = scored
    ids_list = [store.get(i)[0] for i in range(0, len(store), 17)]
    seq_ids = list(range(0, len(store), 17))
    batch = cache.batch(seq_ids, input_ids=ids_list)
    k = cache.k
    for b, (sid, ids) in enumerate(zip(seq_ids, ids_list)):
        plen = store.get(sid)[1]
        ref = _reference(model, ids)
        pos = torch.nonzero(batch.mask[b]).squeeze(-1)
        assert pos.tolist() == list(range(plen - 1, len(ids) - 1))  # aligned to the response positions
        for t in pos.tolist():
            top_ref, _ = torch.topk(ref[t], k)
            got_ids = batch.topk_ids[b, t]
            got_lp = batch.topk_logprobs[b, t].double()
            # ids are the true top-k (compare the set of values: ties may order differently)
            assert torch.allclose(ref[t][got_ids].sort().values, top_ref.sort().values, atol=1e-5)
            true = ref[t][got_ids]
            tol = (
                torch.tensor(
                    [
                        cache.encoding.max_error(top1_abs=abs(top_ref[0].item()), logprob_abs=abs(v))
                        for v in true.tolist()
                    ],
                    dtype=torch.float64,
                )
                + 1e-6
            )
            in_range = (top_ref[0] - true) <= 255 * cache.encoding.step if cache.encoding.step else true == true
            assert torch.all(((got_lp - true).abs() <= tol)[in_range])
            nxt = int(ids[t + 1])
            assert abs(batch.target_logprob[b, t].item() - ref[t, nxt].item()) < 1e-5
            outside = torch.ones_like(ref[t], dtype=torch.bool)
            outside[got_ids] = False
            tail_ref = torch.logsumexp(ref[t][outside], 0).item() if outside.any() else -np.inf
            assert batch.tail_logmass[b, t].item() == pytest.approx(tail_ref, rel=1e-4, abs=1e-5)


def test_small_k_keeps_exact_target_outside_the_top_k(tmp_path, tiny_home):
    """With k=2 many next tokens fall outside the top-k; their log-prob must still be exact."""
    from conftest import copy_home

    home = copy_home(tiny_home, tmp_path / "home")
    runner = make_runner(home, "score.top_k=2")
    runner.run("score")
    cache = LogitCache(Path(runner.manifest("score")["outputs"]["cache"]))
    model, _ = hf_models.load_causal_lm(runner.manifest("teacher")["outputs"]["model_dir"])
    store = SequenceStore(Path(runner.manifest("generate")["outputs"]["sequences"]))
    outside = 0
    for sid in range(0, 60, 7):
        ids, _ = store.get(sid)
        ref = _reference(model, ids)
        b = cache.batch([sid])
        for t in torch.nonzero(b.mask[0]).squeeze(-1).tolist():
            nxt = int(ids[t + 1])
            outside += nxt not in b.topk_ids[0, t].tolist()
            assert abs(b.target_logprob[0, t].item() - ref[t, nxt].item()) < 1e-5
            # top-2 mass + tail mass = 1, up to the encoding's documented error
            total = torch.logsumexp(
                torch.cat([b.topk_logprobs[0, t].double(), b.tail_logmass[0, t : t + 1].double()]), 0
            )
            top1 = abs(b.topk_logprobs[0, t, 0].item())
            assert abs(total.item()) <= cache.encoding.max_error(top1_abs=top1, logprob_abs=top1) + 1e-5
    assert outside > 0


def test_reader_rejects_rows_of_other_sequences(scored):
    _, cache, store = scored
    ids = [store.get(3)[0], store.get(4)[0]]
    with pytest.raises(CacheMismatchError, match="different tokens"):
        cache.batch([4, 3], input_ids=ids)


def test_corrupt_shard_is_an_error_naming_the_shard(tmp_path, tiny_runner):
    import shutil

    src = Path(tiny_runner.manifest("score")["outputs"]["cache"])
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    shard = dst / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = LogitCache(dst)
    cache.batch([0])  # shard 0 is intact and readable
    with pytest.raises(CorruptShardError, match="shard-00001.arrow"):
        cache.batch([cache.shard_size + 1])


def test_writer_resumes_only_from_intact_shards_with_same_settings(tmp_path):
    import pyarrow as pa

    t = pa.table({"x": [1, 2, 3]})
    w = ShardWriter(tmp_path / "set", {"a": 1})
    w.write(0, t)
    w.write(1, t)
    (w.tmp_dir / "shard-00001.arrow").write_bytes(b"torn")  # a shard damaged after the journal entry
    w2 = ShardWriter(tmp_path / "set", {"a": 1})
    assert w2.done(0) and not w2.done(1)
    w3 = ShardWriter(tmp_path / "set", {"a": 2})  # other settings: nothing is reused
    assert not w3.done(0)
    w3.write(0, t)
    with pytest.raises(RuntimeError, match="never written"):
        w3.finish(2)
    assert not (tmp_path / "set").exists()
    w3.write(1, t)
    m = w3.finish(2)
    assert m["rows"] == 6 and (tmp_path / "set" / "manifest.json").exists() and not w3.tmp_dir.exists()


def test_cache_root_lists_and_records_users(tiny_runner, tiny_home):
    root = CacheRoot(tiny_home / "caches")
    caches = root.list()
    assert [c.id for c in caches] == [tiny_runner.manifest("score")["outputs"]["cache_id"]]
    assert (caches[0].dir / "users.json").read_text().count("tiny") == 1
