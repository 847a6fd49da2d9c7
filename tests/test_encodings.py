"""Every cache encoding round-trips within its documented error (property-based, against float64 truth)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpd.storage import encodings as enc

pytestmark = pytest.mark.unit  # seconds, no pipeline run (make test-unit)


@st.composite
def topk_rows(draw):
    vocab = draw(st.sampled_from([16, 300, 8192, 70000]))
    k = draw(st.integers(2, min(64, vocab)))
    P = draw(st.integers(1, 12))
    scale = draw(st.floats(0.1, 20))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(P, vocab, generator=g, dtype=torch.float64) * scale
    lp = torch.log_softmax(logits, -1)
    vals, ids = torch.topk(lp, k, dim=1)
    return vocab, ids.numpy(), vals.numpy()


@pytest.mark.parametrize("name", ["fp16", "rank-q8", "rank-q8:0.25", "idsort-q8", "idsort-q8:0.01"])
@settings(max_examples=60, deadline=None)
@given(data=topk_rows())
def test_round_trip_within_documented_error(name, data):
    vocab, ids, vals = data
    code = enc.get(name)
    cols = code.encode(ids, vals.astype(np.float32), vocab)
    d_ids, d_lps = code.decode(cols, *ids.shape)
    d_ids, d_lps = d_ids.numpy(), d_lps.numpy().astype(np.float64)
    if name.startswith("idsort"):  # id order: compare as sets keyed by id
        order = np.argsort(ids, axis=1)
        ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
        assert (np.diff(d_ids, axis=1) > 0).all()
    assert (d_ids == ids).all()
    top1 = vals.max(axis=1, keepdims=True)
    bound = (
        np.vectorize(lambda t, v: code.max_error(top1_abs=abs(t), logprob_abs=abs(v)))(
            np.broadcast_to(top1, vals.shape), vals
        )
        + 1e-6
    )
    in_range = (top1 - vals) <= 255 * code.step - code.step if code.step else np.ones_like(vals, bool)
    err = np.abs(d_lps - vals)
    assert (err[in_range] <= bound[in_range]).all(), err[in_range].max()
    # out of range entries are clamped at the range's end: never below it, never above their true value's top-1
    assert (d_lps[~in_range] >= top1.repeat(vals.shape[1], 1)[~in_range] - 255 * code.step - 0.01).all()
    if name.startswith("rank"):  # rank order is kept, so decoded log-probs are non-increasing
        assert (np.diff(d_lps, axis=1) <= 1e-6).all()


def test_encoding_names_and_errors():
    assert enc.get("rank-q8:0.125").step == 0.125
    assert enc.get({"name": "fp16", "step": 0.0}).name == "fp16"
    with pytest.raises(ValueError, match="unknown encoding 'q4'"):
        enc.get("q4")
