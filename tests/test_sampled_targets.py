"""Sampled teacher targets (random-sampling KD): the draws' estimate of p is unbiased, fkl's gradient from them
converges to the full-vocabulary gradient, and every method runs on them (exactly the full loss where the slots
cover the vocabulary). Float64 references; the mean over many seeds against the expectation."""
import math

import pytest
import torch

from hpd.stages.losses import DISTRIBUTION_METHODS, distill_loss
from hpd.stages.scoring import sample_positions
from hpd.storage.cache_batch import SampledBatch

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
    ids, log_w, logp, target, tail, *_ = sample_positions(teacher.float().reshape(B * L, V), nxt.reshape(-1), draws=draws,
                                                proposal=proposal, generator=g)
    mask = torch.cat([labels[:, 1:] != -100, torch.zeros(B, 1, dtype=torch.bool)], 1)
    return SampledBatch(ids=ids.reshape(B, L, -1), log_weight=log_w.reshape(B, L, -1), logprob=logp.reshape(B, L, -1),
                        target_logprob=target.reshape(B, L), tail_logmass=tail.reshape(B, L), mask=mask)


@pytest.mark.parametrize("proposal,head,systematic", [(1.0, 0, True), (1.0, 0, False), (0.5, 0, True), (1.0, 3, True),
                                                      (1.0, 3, False)])
def test_the_estimate_of_p_is_unbiased(proposal, head, systematic):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 2
    p = torch.softmax(logits.double(), -1)
    runs = 4000  # 4000 independent copies of the 4 positions, drawn in one call
    ids, log_w, logp, *_ = sample_positions(logits.repeat(runs, 1), torch.zeros(4 * runs, dtype=torch.long), draws=4,
                                            proposal=proposal, generator=torch.Generator().manual_seed(0), head=head,
                                            systematic=systematic)
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
        ids, log_w, *_ = sample_positions(logits.repeat(runs, 1), torch.zeros(4 * runs, dtype=torch.long), draws=8,
                                          generator=torch.Generator().manual_seed(0), systematic=systematic)
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
    mean = sum(_grad("hpd_fkl", student, _sampled(teacher, labels, 4, seed), labels, sampled_tokens=samples)[0]
               for seed in range(runs)) / runs
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
