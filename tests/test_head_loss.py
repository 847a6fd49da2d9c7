"""The student's head and the loss computed together, a chunk of positions at a time (losses.StudentHead): for
every method, every teacher signal (full logits, top-k cache, sampled targets, a teachers' mixture) and value
guidance, the same loss and gradient (hidden states, weight, bias) as the logits path, inputs in float64 (the losses
compute in float32 inside, so the paths agree to float32's rounding)."""

import pytest
import torch
from test_sampled_targets import _through_a_cache

from hpd.stages.losses import METHODS, StudentHead, distill_loss, response_positions
from hpd.storage.cache_batch import CacheBatch
from hpd.storage.merge import mix_positions

pytestmark = pytest.mark.unit

B, L, H, V = 2, 9, 6, 13


def _student(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return hidden, weight, bias, teacher, labels


def _mixture(teacher, labels):
    """Two teachers' top-k caches of the same positions mixed as an ensemble reads them (a CacheBatch)."""
    a, b = (_through_a_cache(t, labels, "fp16") for t in (teacher, teacher.flip(-1)))
    m = a.mask
    ids, lp, tail, target = mix_positions(
        [(x.topk_ids[m], x.topk_logprobs[m], x.tail_logmass[m], x.target_logprob[m]) for x in (a, b)], [0.7, 0.3], V, 8
    )
    out = CacheBatch(
        torch.zeros(B, L, 8, dtype=torch.long),
        torch.full((B, L, 8), -torch.inf),
        torch.zeros(B, L),
        torch.full((B, L), -torch.inf),
        m,
    )
    out.topk_ids[m], out.topk_logprobs[m], out.tail_logmass[m], out.target_logprob[m] = ids, lp, tail, target
    return out


SIGNALS = ["logits", "idsort-q8", "compact", "sampled:6", "sampled:2+6", "mixture"]


# (opd reads the teacher only at the sequence's own tokens, the same from every signal: logits check its path)
CASES = [(m, s) for m in METHODS for s in SIGNALS if m != "opd" or s == "logits"]


@pytest.mark.parametrize("method, signal", CASES)
def test_the_head_and_loss_chunked_together_equal_the_logits_path(method, signal):
    hidden, weight, bias, teacher, labels = _student(3)
    given = {"logits": teacher, "mixture": None}.get(signal)
    if signal == "mixture":
        given = _mixture(teacher, labels)
    elif given is None:
        given = _through_a_cache(teacher, labels, signal)
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    guide = {"sequence_weight": weights}
    if method in ("opd", "hpd", "hpd_fkl", "hpd_nsamp", "hpd_expect", "hpd_fkl_expect"):
        guide["sequence_advantage"] = torch.tensor([0.3, -0.2])
    results = []
    for as_head in (False, True):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        keep = response_positions(labels)
        student = StudentHead(h[keep], w, b) if as_head else torch.nn.functional.linear(h, w, b)
        g = torch.Generator().manual_seed(7)  # the samples HPD draws: the same in both paths, chunk by chunk
        loss, diag = distill_loss(method, student, labels, teacher=given, generator=g, chunk_elements=3 * V, **guide)
        loss.backward()
        results.append((loss.detach(), diag, h.grad, w.grad, b.grad))
    (l0, d0, *g0), (l1, d1, *g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-7), (l0, l1)
    assert d0.keys() == d1.keys() and all(abs(d0[k] - d1[k]) < 1e-6 for k in d0)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert g1[1].abs().sum() > 0  # the head's weight learns


def test_no_gradient_wanted_computes_none():
    hidden, weight, bias, teacher, labels = _student(4)
    keep = response_positions(labels)
    with torch.no_grad():
        loss, _ = distill_loss("fkl", StudentHead(hidden[keep], weight, bias), labels, teacher=teacher)
    full, _ = distill_loss("fkl", torch.nn.functional.linear(hidden, weight, bias), labels, teacher=teacher)
    assert not loss.requires_grad and torch.allclose(loss, full.detach().float(), rtol=1e-6)


def test_a_scaled_loss_scales_every_gradient():
    """A mixture weighs each source's loss by its share of tokens: the head's gradients must follow the scale."""
    hidden, weight, bias, teacher, labels = _student(5)
    keep = response_positions(labels)
    grads = []
    for scale in (1.0, 3.0):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        loss, _ = distill_loss("jsd", StudentHead(h[keep], w, b), labels, teacher=teacher, chunk_elements=2 * V)
        (loss * scale).backward()
        grads.append((h.grad, w.grad, b.grad))
    for one, three in zip(*grads):
        assert torch.allclose(three, 3 * one, rtol=1e-6, atol=0)  # (the scale passes through the float32 loss)


def test_chunks_are_larger_on_a_gpu_and_unchanged_on_a_cpu():
    # a GPU pays per chunk in kernel launches (the 4M-element CPU chunk is 27 positions of a 151,936-token vocabulary)
    from hpd.stages.heads import GPU_CHUNK_ELEMENTS, chunk_elements

    assert chunk_elements(1 << 22, "cpu") == 1 << 22 and chunk_elements(1 << 22, torch.device("cpu")) == 1 << 22
    assert chunk_elements(1 << 22, "cuda") == GPU_CHUNK_ELEMENTS and GPU_CHUNK_ELEMENTS // 151936 > 800
    assert chunk_elements(1 << 30, "cuda:0") == 1 << 30  # never smaller than asked
