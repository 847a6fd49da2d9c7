"""Sampled teacher targets (random-sampling KD): the draws' estimate of p is unbiased, fkl's gradient from them
converges to the full-vocabulary gradient, and every method runs on them (exactly the full loss where the slots
cover the vocabulary). Float64 references; the mean over many seeds against the expectation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_losses import _inputs as _loss_inputs
from test_losses import _variant_samples, ref_hpd_family, ref_loss, ref_token_loss

from hpd.stages.cache_rows import sample_positions, score_batch
from hpd.stages.losses import DISTRIBUTION_METHODS, HPD_FAMILY, METHODS, distill_loss
from hpd.storage import encodings as enc
from hpd.storage.cache_batch import SampledBatch, ScoredSequence
from hpd.storage.logit_cache import round_trip

pytestmark = pytest.mark.unit

B, L, V = 2, 6, 11


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = -100
    return student, teacher, labels


def _sampled(teacher, labels, draws, seed, proposal=1.0) -> SampledBatch:
    """What a sampled-targets cache would hold for the batch (entry t describes token t+1)."""
    nxt = torch.cat([labels[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1).clamp_min(0)
    g = torch.Generator().manual_seed(seed)
    ids, log_w, logp, target, tail, *_ = sample_positions(
        teacher.float().reshape(B * L, V), nxt.reshape(-1), draws=draws, proposal=proposal, generator=g
    )
    mask = torch.cat([labels[:, 1:] != -100, torch.zeros(B, 1, dtype=torch.bool)], 1)
    return SampledBatch(
        ids=ids.reshape(B, L, -1),
        log_weight=log_w.reshape(B, L, -1),
        logprob=logp.reshape(B, L, -1),
        target_logprob=target.reshape(B, L),
        tail_logmass=tail.reshape(B, L),
        mask=mask,
    )


@pytest.mark.parametrize(
    "proposal,head,systematic", [(1.0, 0, True), (1.0, 0, False), (0.5, 0, True), (1.0, 3, True), (1.0, 3, False)]
)
def test_the_estimate_of_p_is_unbiased(proposal, head, systematic):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 2
    p = torch.softmax(logits.double(), -1)
    runs = 4000  # 4000 independent copies of the 4 positions, drawn in one call
    ids, log_w, logp, *_ = sample_positions(
        logits.repeat(runs, 1),
        torch.zeros(4 * runs, dtype=torch.long),
        draws=4,
        proposal=proposal,
        generator=torch.Generator().manual_seed(0),
        head=head,
        systematic=systematic,
    )
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct slots
    assert torch.allclose(logp.double(), p.repeat(runs, 1).log().gather(-1, ids), atol=1e-5)  # exact log p everywhere
    if head:  # the head is the top tokens, exactly
        assert torch.equal(ids[:, :head], p.repeat(runs, 1).topk(head).indices)
        assert torch.equal(log_w[:, :head], logp[:, :head])
    total = torch.zeros(4 * runs, V, dtype=torch.float64).scatter_add_(-1, ids, log_w.double().exp())
    mean = total.view(runs, 4, V).mean(0)
    # standard error of a mean of 4000 draws of at most 1 / (r(v) x 4 draws): 0.02 is several of them
    assert torch.allclose(mean, p, atol=0.02), (mean - p).abs().max()


def test_systematic_draws_estimate_p_with_less_variance_than_independent_ones():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2)) * 2
    runs, spread = 2000, {}
    for systematic in (True, False):
        ids, log_w, *_ = sample_positions(
            logits.repeat(runs, 1),
            torch.zeros(4 * runs, dtype=torch.long),
            draws=8,
            generator=torch.Generator().manual_seed(0),
            systematic=systematic,
        )
        p_hat = torch.zeros(4 * runs, V, dtype=torch.float64).scatter_add_(-1, ids, log_w.double().exp())
        spread[systematic] = p_hat.view(runs, 4, V).var(0).sum()
    assert spread[True] < 0.5 * spread[False], spread


def _grad(method, student, teacher_input, labels, **kw):
    s = student.clone().float().requires_grad_()
    loss, _ = distill_loss(method, s, labels, teacher=teacher_input, **kw)
    loss.backward()
    return s.grad.double(), loss.item()


def test_fkl_gradient_from_sampled_targets_is_unbiased():
    student, teacher, labels = _inputs(2)
    full, _ = _grad("fkl", student, teacher.float(), labels)
    runs = 1500
    mean = sum(_grad("fkl", student, _sampled(teacher, labels, 4, seed), labels)[0] for seed in range(runs)) / runs
    one, _ = _grad("fkl", student, _sampled(teacher, labels, 4, 0), labels)
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))  # noqa: E731
    assert cos(mean, full) > 0.995 and torch.allclose(mean, full, atol=4e-3), (mean - full).abs().max()
    assert cos(one, full) < 0.99  # one draw of 4 is noisy: the agreement is the expectation's


def test_hpd_fkl_forward_part_is_unbiased_when_the_sample_term_is_off():
    """With the student's samples equal to the sequence's tokens, hpd_fkl is f * p(v) on every outcome plus the
    exact expert term: linear in p, so its mean over draws is the full-vocabulary hpd_fkl."""
    student, teacher, labels = _inputs(3)
    samples = labels.clamp_min(0)
    full, _ = _grad("hpd_fkl", student, teacher.float(), labels, sampled_tokens=samples)
    runs = 1500
    mean = (
        sum(
            _grad("hpd_fkl", student, _sampled(teacher, labels, 4, seed), labels, sampled_tokens=samples)[0]
            for seed in range(runs)
        )
        / runs
    )
    assert torch.allclose(mean, full, atol=4e-3), (mean - full).abs().max()


@pytest.mark.parametrize("method", [m for m in DISTRIBUTION_METHODS if m != "fkl"] + ["hpd", "hpd_expect"])
def test_other_methods_see_exact_log_probs_and_equal_the_full_loss_when_the_slots_cover_the_vocabulary(method):
    student, teacher, labels = _inputs(4)
    samples = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(5))
    kw = {"sampled_tokens": samples} if method == "hpd" else {}
    full = _grad(method, student, teacher.float(), labels, **kw)
    covered = _grad(method, student, _sampled(teacher, labels, V, 0), labels, **kw)  # V slots: the whole vocabulary
    assert covered[1] == pytest.approx(full[1], rel=1e-5, abs=1e-6)
    assert torch.allclose(covered[0], full[0], atol=1e-6)
    few = _grad(method, student, _sampled(teacher, labels, 3, 0), labels, **kw)  # 3 slots: finite, and different
    assert math.isfinite(few[1]) and torch.isfinite(few[0]).all()


@pytest.mark.parametrize("method", ["hpd", "hpd_fkl", "fkl", "rkl"])
def test_a_peaked_teacher_whose_slots_hold_nearly_all_its_mass_gives_finite_losses(method):
    """The tail is summed over the tokens outside the slots, never taken as 1 - sum(slots), which rounds to 0 (and
    its log to -inf) when a few slots hold nearly all of a peaked teacher's mass."""
    student, teacher, labels = _inputs(6)
    peaked = teacher * 25
    samples = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(7))
    batch = _sampled(peaked, labels, 4, 0)
    assert torch.isfinite(batch.tail_logmass[batch.mask]).all()
    grad, value = _grad(method, student, batch, labels, sampled_tokens=samples)
    assert math.isfinite(value) and torch.isfinite(grad).all()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(vocab=st.integers(2, 40), data=st.data())
def test_slots_and_tail_hold_the_whole_distribution_for_every_head_draws_and_vocabulary(vocab, data):
    """Whatever the head M, the draws N and the vocabulary V (N > V - M too: slots stay empty), the stored slots are
    distinct tokens with their exact log p, the head is the top M, slots + tail = 1 (within the encoding's bound once
    through a cache), and p_hat stays unbiased."""
    head, draws = data.draw(st.integers(0, vocab - 1), "head"), data.draw(st.integers(1, 64), "draws")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), "seed"))
    logits = torch.randn(4, vocab, generator=g) * 3
    lp = torch.log_softmax(logits.double(), -1)
    runs = 1000
    d = sample_positions(
        logits.repeat(runs, 1), torch.zeros(4 * runs, dtype=torch.long), draws=draws, head=head, generator=g, fill=False
    )
    lp_all, kept = lp.repeat(runs, 1), d.logprob > -math.inf
    assert (torch.zeros(4 * runs, vocab).scatter_add_(-1, d.ids, kept.float()) <= 1).all()  # distinct
    assert torch.equal(d.ids[:, :head], lp_all.topk(head).indices) and kept[:, :head].all()
    assert torch.allclose(d.logprob.double()[kept], lp_all.gather(-1, d.ids)[kept], atol=1e-5)
    total = torch.where(kept, d.logprob.double().exp(), 0).sum(-1) + d.tail.double().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5), total
    assert (d.counts.sum(-1) == draws).all() and (d.counts[:, :head] == 0).all()
    p_hat = torch.zeros(4 * runs, vocab, dtype=torch.float64).scatter_add_(-1, d.ids, d.log_weight.double().exp())
    # systematic draws: each count is within 1 of N r(v), so p_hat's spread is at most 1/2; its mean over 1000 runs
    # is within 0.05 of p by 3 standard errors
    assert torch.allclose(p_hat.view(runs, 4, vocab).mean(0), lp.exp(), atol=0.05)
    code = enc.get(f"sampled:{head}+{draws}" if head else f"sampled:{draws}")
    row = ScoredSequence(
        seq_id=0,
        input_ids=np.arange(5),
        start=0,
        topk_ids=d.ids[:4].numpy(),
        topk_logprobs=d.logprob[:4].numpy(),
        target_logprob=d.target[:4].numpy(),
        tail_logmass=d.tail[:4].numpy(),
        counts=d.counts[:4].numpy(),
        rest_logmass=d.rest[:4].numpy() if head else None,
    )
    order = enc.VocabOrder.learn(d.ids[:4][kept[:4]].numpy(), vocab)
    back = round_trip([row], code.spec, vocab, order)
    for t in range(4):  # the sum of the stored probabilities, against the bound on each
        stored = {int(i): float(v) for i, v in zip(back.ids[0, t], back.logprob[0, t]) if v > -math.inf}
        assert stored.keys() == set(d.ids[t][kept[t]].tolist())
        top1 = max(float(lp[t, i]) for i in stored)
        tail = float(d.tail[t])  # float16 on disk
        slack = (
            sum(math.exp(lp[t, i]) * math.expm1(code.max_error(abs(top1), gap=top1 - float(lp[t, i]))) for i in stored)
            + (math.exp(tail) * math.expm1(-tail * 2**-11) if tail > -math.inf else 0)
            + 1e-5
        )
        assert abs(sum(math.exp(v) for v in stored.values()) + math.exp(back.tail_logmass[0, t]) - 1) <= slack


def test_a_head_as_large_as_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="a head of 11 tokens leaves nothing to draw from a vocabulary of 11"):
        sample_positions(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), draws=4, head=V)


# -- every method on every encoding a cache can hold, through the score stage's rows and a cache's encode/decode --
class _GivenTeacher:
    """A teacher whose logits are given, for score_batch (the score stage's pass)."""

    device = torch.device("cpu")

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits[:, : input_ids.shape[1]])


def _through_a_cache(teacher, labels, encoding):
    """The batch a cache of `encoding` hands the student: the labelled tokens scored by the score stage's own pass
    (score_batch: top-k, or the drawn slots only), encoded as a shard holds them and decoded (round_trip)."""
    code = enc.get(encoding)
    keep = labels != -100  # row 0 starts with a prompt (labels -100), row 1 ends with padding
    seqs = [labels[b].clamp_min(0)[: int(keep[b].nonzero().max()) + 1].numpy() for b in range(len(labels))]
    plens = [max(1, int(keep[b].nonzero().min())) for b in range(len(labels))]  # (no position predicts token 0)
    scored = score_batch(
        _GivenTeacher(teacher.float()),
        seqs,
        plens,
        top_k=min(64, teacher.shape[-1]),
        temperature=1.0,
        pad_id=0,
        draws=code.draws,
        head=code.head,
        seeds=[11, 12],
    )
    rows = [ScoredSequence(seq_id=b, input_ids=seqs[b], **sc) for b, sc in enumerate(scored)]
    order = (
        enc.VocabOrder.learn(np.concatenate([r.topk_ids[r.topk_logprobs > -np.inf] for r in rows]), teacher.shape[-1])
        if code.vocab_ordered
        else None
    )
    return round_trip(rows, encoding, teacher.shape[-1], order, length=labels.shape[1])


def _described(batch, method, vocab):
    """The teacher as the batch describes it to `method`, for the float64 references: (held [B, L, V]: log p of
    each token a slot holds, -inf elsewhere; the tail's log-mass; each next token's log p). fkl from sampled targets
    sees p_hat at the drawn ids and no tail (their unbiased estimate)."""
    sampled = isinstance(batch, SampledBatch)
    ids = batch.ids if sampled else batch.topk_ids
    vals = (batch.log_weight if method == "fkl" else batch.logprob) if sampled else batch.topk_logprobs
    tail = torch.full_like(batch.tail_logmass, -math.inf) if sampled and method == "fkl" else batch.tail_logmass
    kept = vals > -math.inf
    onehot = torch.nn.functional.one_hot(ids, vocab) * kept[..., None]
    assert (onehot.sum(-2) <= 1).all()  # a token is held by one slot at most
    b, t, s = kept.nonzero(as_tuple=True)
    held = torch.full((*ids.shape[:2], vocab), -math.inf, dtype=torch.float64)
    held[b, t, ids[b, t, s]] = vals[b, t, s].double()
    return held, tail.double(), batch.target_logprob.double()


CACHE_ENCODINGS = ["idsort-q8", "fp16", "compact", "sampled:16", "sampled-counts:16", "sampled:4+16", "sampled:32"]


@pytest.mark.parametrize("vocab", [18, 1000])  # 18: the arithmetic task's, fewer tokens than some encodings' slots
@pytest.mark.parametrize("encoding", CACHE_ENCODINGS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_finite_and_the_float64_reference_on_every_encoding_a_cache_holds(method, encoding, vocab):
    """The loss and its gradient are finite and equal the float64 reference over what the cache holds: its slots
    (each token once, however many slots a decoded position repeats it in), the tail as one outcome, the next
    token's stored log p. Sampled caches have empty slots here (fewer distinct draws than slots)."""
    student, teacher, labels = _loss_inputs(20, vocab)
    teacher = teacher * 2  # peaked: many repeated draws, so empty slots
    batch = _through_a_cache(teacher, labels, encoding)
    if enc.get(encoding).sampled:
        assert (batch.logprob[batch.mask] == -math.inf).any()
    samples = _variant_samples(method, labels, 21, vocab)
    s32 = student.float().requires_grad_()
    loss, _ = distill_loss(method, s32, labels, teacher=batch, sampled_tokens=samples)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s32.grad).all()
    if method in ("hpd_fkl", "hpd_fkl_expect") and enc.get(encoding).sampled:
        return  # their forward part sees p_hat and the rest p: no one distribution (its unbiasedness: tested above)
    if HPD_FAMILY.get(method, ("", ""))[1] == "expect" and vocab > 100:
        return  # the reference loops over every token for every token: minutes
    held, tail, target = _described(batch, method, vocab)
    s64 = student.clone().requires_grad_()
    if method in DISTRIBUTION_METHODS:
        ref = ref_loss(method, s64, None, labels, cache=(held, tail))
    elif method in HPD_FAMILY:
        ref = ref_hpd_family(method, s64, None, labels, samples, cache=(held, tail, target))
    else:
        ref = ref_token_loss(method, s64, labels, target)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    assert torch.allclose(s32.grad.double(), s64.grad, atol=2e-6, rtol=1e-4)
