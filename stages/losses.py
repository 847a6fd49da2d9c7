"""Every distillation objective as a weight on the student's log-likelihood (the paper's unified view).

    L = - sum over outcomes a of  w(a) * log q(a),     w detached (a constant for the gradient)

An "outcome" is a token (sft, seqkd, hpd, opd) or, for the distribution methods, every outcome the teacher
describes: the whole vocabulary when the teacher is given as logits, or the cached top-k plus one tail
bucket (all other tokens together) when it is a cache batch. With k = vocabulary size both are the same.
For a divergence D(p, q) the weight is w(v) = -q(v) * dD/dq(v): its weighted log-likelihood has exactly D's
gradient (constants drop out because sum_v q(v) * grad log q(v) = 0). Each method below is that one formula.
The value returned is the divergence itself (or, for the token methods, the surrogate the paper defines);
its gradient is the weighted log-likelihood's. Adding a method is adding a weight function.

Conventions: `student_logits` [B, L, V]; `labels` [B, L] as in Hugging Face (the input ids, -100 where no
loss is taken); logits at t predict labels at t+1. Teacher logits are aligned like the student's; a cache
batch (storage.logit_cache.CacheBatch) is aligned the same way (entry t describes token t+1). JSD follows
TRL's GKD: m = beta p + (1 - beta) q, loss = beta KL(p||m) + (1 - beta) KL(q||m), beta = 0 is forward KL and
beta = 1 reverse KL. All arithmetic is fp32, mixtures via logsumexp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG_INF = -float("inf")


@dataclass
class Outcomes:
    """The teacher's and the student's log-probs over the same outcomes, per response position [N, S]."""
    logp: torch.Tensor   # teacher, detached
    logq: torch.Tensor   # student, with grad


def _xlog(p_log: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """exp(p_log) * value, with 0 wherever p is 0 (so -inf * 0 never becomes nan)."""
    return torch.where(p_log == NEG_INF, torch.zeros_like(value), p_log.exp() * value)


def _kl(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    return _xlog(a_log, a_log - b_log).sum(-1)


def _mix(a_log: torch.Tensor, b_log: torch.Tensor, wa: float) -> torch.Tensor:
    """log(wa * a + (1 - wa) * b)."""
    if wa <= 0:
        return b_log
    if wa >= 1:
        return a_log
    return torch.logaddexp(a_log + math.log(wa), b_log + math.log1p(-wa))


# -- distribution methods: (value per position, weights per outcome) ---------------------------------------
def _fkl(o, q):
    return _kl(o.logp, q), o.logp.exp()


def _rkl(o, q):
    return _kl(q, o.logp), _xlog(q, o.logp - q)


def _jsd(o, q, beta=0.5):
    if beta <= 0:
        return _fkl(o, q)
    if beta >= 1:
        return _rkl(o, q)
    m = _mix(o.logp, q, beta)
    value = beta * _kl(o.logp, m) + (1 - beta) * _kl(q, m)
    return value, (1 - beta) * _xlog(q, m - q)


def _skl(o, q, alpha=0.1):
    m = _mix(o.logp, q, alpha)
    return _kl(o.logp, m), (1 - alpha) * (o.logp + q - m).exp()


def _srkl(o, q, alpha=0.1):
    m = _mix(o.logp, q, 1 - alpha)
    return _kl(q, m), -_xlog(q, (q - m) - alpha * (q - m).exp())


def _tvd(o, q):
    diff = o.logp.exp() - q.exp()
    return 0.5 * diff.abs().sum(-1), 0.5 * q.exp() * diff.sign()


def _akl(o, q, mu=0.5):
    p = o.logp.exp()
    order = p.argsort(-1, descending=True)
    cum = p.gather(-1, order).cumsum(-1)
    head_sorted = (cum - p.gather(-1, order)) < mu  # smallest prefix whose mass reaches mu
    head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
    gap = (p - q.exp()).abs()
    g_h, g_t = (gap * head).sum(-1), (gap * ~head).sum(-1)
    a_h = (g_h / (g_h + g_t).clamp_min(1e-12))[:, None]
    (v_f, w_f), (v_r, w_r) = _fkl(o, q), _rkl(o, q)
    return a_h[:, 0] * v_f + (1 - a_h[:, 0]) * v_r, a_h * w_f + (1 - a_h) * w_r


DISTRIBUTION_METHODS = {"fkl": _fkl, "rkl": _rkl, "jsd": _jsd, "skl": _skl, "srkl": _srkl, "tvd": _tvd,
                        "akl": _akl}
METHOD_PARAMS = {"jsd": ("beta",), "skl": ("alpha",), "srkl": ("alpha",), "akl": ("mu",)}  # what each accepts
TOKEN_METHODS = ("sft", "seqkd", "hpd", "opd")
METHODS = (*TOKEN_METHODS, *DISTRIBUTION_METHODS)


# -- teacher views: what each kind of teacher input can tell about a position ------------------------------
class _FullTeacher:
    def __init__(self, logits: torch.Tensor, sel: torch.Tensor, temperature: float):
        self.logp = torch.log_softmax(logits[:, :-1][sel].float() / temperature, -1).detach()

    def token(self, tokens: torch.Tensor, logq: torch.Tensor):
        return self.logp.gather(-1, tokens[:, None])[:, 0], torch.ones_like(tokens, dtype=torch.bool)

    def outcomes(self, logq: torch.Tensor) -> Outcomes:
        return Outcomes(self.logp, logq)


class _CachedTeacher:
    def __init__(self, cache, sel: torch.Tensor):
        if not bool(cache.mask[:, :-1][sel].all()):
            raise ValueError("the cache batch has no teacher entry for some labelled positions: cache rows and "
                             "token batch are misaligned (join them by sequence id)")
        self.ids = cache.topk_ids[:, :-1][sel]
        self.top = cache.topk_logprobs[:, :-1][sel].float()
        self.tail = cache.tail_logmass[:, :-1][sel].float()
        self.target = cache.target_logprob[:, :-1][sel].float()

    def _student_tail(self, logq: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logq.scatter(-1, self.ids, NEG_INF), -1)

    def token(self, tokens: torch.Tensor, logq: torch.Tensor):
        """log p(token): cached when in the top-k; otherwise the tail mass shared out in proportion to the
        student's own distribution over the tokens outside the top-k: p(a) ~ T * q(a) / Q_out."""
        hit = self.ids == tokens[:, None]
        inside = hit.any(-1)
        cached = torch.where(hit, self.top, torch.full_like(self.top, NEG_INF)).amax(-1)
        q_tok = logq.detach().gather(-1, tokens[:, None])[:, 0]
        estimate = self.tail + q_tok - self._student_tail(logq.detach())
        return torch.where(inside, cached, estimate), inside

    def outcomes(self, logq: torch.Tensor) -> Outcomes:
        top_q = logq.gather(-1, self.ids)
        if self.ids.shape[-1] == logq.shape[-1]:  # k = vocabulary: there is no tail bucket
            return Outcomes(self.top, top_q)
        logp = torch.cat([self.top, self.tail[:, None]], -1)
        return Outcomes(logp, torch.cat([top_q, self._student_tail(logq)[:, None]], -1))


def _teacher_view(teacher, sel, temperature):
    if isinstance(teacher, torch.Tensor):
        return _FullTeacher(teacher, sel, temperature)
    return _CachedTeacher(teacher, sel)


def hpd_weights(logp_star, logq_star, logp_samp, logq_samp, same):
    """Paper Eq. 11-14: the expert-token weight w* and the sampled-token weight w (both detached)."""
    k1 = logq_star.exp() * (logp_star - logq_star)
    k1s = logq_samp.exp() * (logp_samp - logq_samp)
    w = torch.where(~same & (k1s < 0), k1s, torch.zeros_like(k1s))
    w_star = torch.where((k1 > 0) & (k1s < 0), 2 * logp_star.exp() + k1,
                         torch.where(k1 < 0, k1, logp_star.exp() + k1))
    return w_star, w, k1, k1s


def distill_loss(method: str, student_logits: torch.Tensor, labels: torch.Tensor, teacher=None,
                 sampled_tokens: torch.Tensor | None = None, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None, **params):
    """(scalar loss, diagnostics). `teacher`: teacher logits [B, L, V] or a CacheBatch; unused by sft.

    `sampled_tokens` [B, L] fixes HPD's per-position student sample (aligned with `labels`, i.e. the token
    sampled for label position t+1 sits at index t+1); without it one token is drawn from the student in fp32.
    Params: beta (jsd, default 0.5), alpha (skl / srkl, default 0.1), mu (akl, default 0.5).
    """
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")
    y = labels[:, 1:]
    sel = y != -100
    n = int(sel.sum())
    if n == 0:
        return student_logits.sum() * 0.0, {"tokens": 0}
    logq = torch.log_softmax(student_logits[:, :-1][sel].float(), -1)  # [N, V]
    target = y[sel]
    logq_star = logq.gather(-1, target[:, None])[:, 0]
    diag: dict = {"tokens": n}
    if method == "sft":
        loss = -logq_star.mean()
        return loss, {**diag, "nll": loss.item()}
    if teacher is None:
        raise ValueError(f"method {method!r} needs a teacher (logits or a cache batch)")
    view = _teacher_view(teacher, sel, temperature)
    if isinstance(view, _CachedTeacher):
        logp_star = view.target
    else:
        logp_star = view.token(target, logq)[0]

    if method in DISTRIBUTION_METHODS:
        o = view.outcomes(logq)
        value, w = DISTRIBUTION_METHODS[method](Outcomes(o.logp, o.logq.detach()), o.logq.detach(), **params)
        surrogate = -(w.detach() * o.logq).sum(-1)
        loss = value.mean() + (surrogate.mean() - surrogate.mean().detach())
        return loss, {**diag, method: value.mean().item()}
    if method == "seqkd":
        loss = -(logp_star.exp() * logq_star).mean()
        return loss, {**diag, "mean_weight": logp_star.exp().mean().item()}
    if method == "opd":  # on-policy data: the labels are the student's own samples
        adv = (logp_star - logq_star).detach()
        loss = -(adv * logq_star).mean()
        return loss, {**diag, "reward": adv.mean().item()}

    # hpd
    if sampled_tokens is None:
        with torch.no_grad():
            sample = torch.multinomial(logq.detach().exp(), 1, generator=generator)[:, 0]
    else:
        sample = sampled_tokens[:, 1:][sel]
    logp_samp, inside = view.token(sample, logq)
    logq_samp = logq.gather(-1, sample[:, None])[:, 0]
    same = sample == target
    w_star, w, k1, k1s = (t.detach() for t in hpd_weights(logp_star, logq_star.detach(), logp_samp.detach(),
                                                           logq_samp.detach(), same))
    loss = (-(w_star * logq_star) - (w * logq_samp)).mean()
    return loss, {**diag, "sample_outside_topk": (~inside).float().mean().item(),
                  "sample_term_active": (w != 0).float().mean().item(),
                  "sample_is_expert": same.float().mean().item(), "mean_w_star": w_star.mean().item(),
                  "mean_w_sample": w.mean().item(), "k1_positive": (k1 > 0).float().mean().item()}
