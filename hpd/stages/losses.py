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
from torch.utils.checkpoint import checkpoint

from hpd.stages import heads
from hpd.storage.cache_batch import CacheBatch, SampledBatch

NEG_INF = -float("inf")


@dataclass
class Outcomes:
    """The teacher's and the student's log-probs over the same outcomes, per response position [N, S]. `keep`
    [N, S] says which columns are outcomes (None: all): a column that is not (a sampled cache's empty slot, the
    tail bucket of slots that cover the vocabulary) has logp = -inf and a finite logq that no method weighs."""

    logp: torch.Tensor  # teacher, detached
    logq: torch.Tensor  # student, with grad; finite everywhere (a weight of 0 times it must give 0, not nan)
    keep: torch.Tensor | None = None


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
    p_sorted = p.sort(-1, descending=True).values
    in_head = (p_sorted.cumsum(-1) - p_sorted) < mu  # smallest prefix whose mass reaches mu
    # and every token as probable as its last: the sort would split tied ones (a quantised cache ties many) at whim
    head = p >= torch.where(in_head, p_sorted, float("inf")).amin(-1, keepdim=True)
    gap = (p - q.exp()).abs()
    g_h, g_t = (gap * head).sum(-1), (gap * ~head).sum(-1)
    a_h = (g_h / (g_h + g_t).clamp_min(1e-12))[:, None]
    (v_f, w_f), (v_r, w_r) = _fkl(o, q), _rkl(o, q)
    return a_h[:, 0] * v_f + (1 - a_h[:, 0]) * v_r, a_h * w_f + (1 - a_h) * w_r


DISTRIBUTION_METHODS = {"fkl": _fkl, "rkl": _rkl, "jsd": _jsd, "skl": _skl, "srkl": _srkl, "tvd": _tvd, "akl": _akl}

# HPD (the paper's) and this project's variants of it, which a cache makes affordable: name -> (forward part,
# sampled-token term). Forward part "token": HPD's weight f * p(a*) on the sequence's token only; "dist": the
# same coefficient f on the forward-KL weights p(v) of every outcome (cached top-k + tail bucket, or the whole
# vocabulary). Sampled-token term "sample": one student sample per position (the paper); "samples": the mean of
# HPD over `hpd_samples` independent samples; "expect": its exact expectation under the student, every token v
# weighted by q(v), with p(v) from the cache (estimated outside the top-k as `_CachedTeacher.token` does).
HPD_FAMILY = {
    "hpd": ("token", "sample"),
    "hpd_fkl": ("dist", "sample"),
    "hpd_nsamp": ("token", "samples"),
    "hpd_expect": ("token", "expect"),
    "hpd_fkl_expect": ("dist", "expect"),
}
METHOD_PARAMS = {
    "jsd": ("beta",),
    "skl": ("alpha",),
    "srkl": ("alpha",),
    "akl": ("mu",),  # what each accepts
    "hpd_nsamp": ("hpd_samples",),
}
TOKEN_METHODS = ("sft", "seqkd", "opd", *HPD_FAMILY)
REWARD_METHODS = ("opd", *HPD_FAMILY)  # a per-token teacher reward log p - log q, which a value advantage shifts
METHODS = (*TOKEN_METHODS, *DISTRIBUTION_METHODS)
ON_POLICY_ONLY = ("opd",)  # their labels must be the student's own samples


# -- teacher views: what each kind of teacher signal can tell about the labelled positions of a batch --------
class _TeacherView:
    """What a loss asks of the teacher at n positions: the expert token's log p (`expert`), log p at given tokens
    (`token`) or over the vocabulary (`every`), each with whether it is exact, and the outcomes a divergence sums
    over (`outcomes`); `linear_outcomes` are those for a loss linear in p (fkl's gradient), where a signal may
    offer an unbiased estimate instead. `rows` keeps a chunk of the positions."""

    def linear_outcomes(self, logq: torch.Tensor) -> Outcomes:
        return self.outcomes(logq)


class _FullTeacher(_TeacherView):
    def __init__(self, logp: torch.Tensor):
        self.logp = logp  # [N, V], detached

    @classmethod
    def of(cls, logits: torch.Tensor, sel: torch.Tensor, temperature: float) -> _FullTeacher:
        return cls(torch.log_softmax(logits[:, :-1][sel].float() / temperature, -1).detach())

    def rows(self, part: slice) -> _FullTeacher:
        return _FullTeacher(self.logp[part])

    def expert(self, target: torch.Tensor) -> torch.Tensor:
        return self.logp.gather(-1, target[:, None])[:, 0]

    def token(self, tokens: torch.Tensor, logq: torch.Tensor):
        """log p at tokens [n, S], and whether it is exact (always, here)."""
        return self.logp.gather(-1, tokens), torch.ones_like(tokens, dtype=torch.bool)

    def every(self, logq: torch.Tensor):
        return self.logp, torch.ones_like(self.logp, dtype=torch.bool)

    def outcomes(self, logq: torch.Tensor) -> Outcomes:
        return Outcomes(self.logp, logq)


class _CachedTeacher(_TeacherView):
    """`keep` [n, k]: the slots that hold an outcome (None: all, as in a top-k cache). A sampled cache often has fewer
    distinct draws than slots: its empty slots have log p = -inf and repeat a stored id (they cannot all be given
    unused ids: there may be more slots than vocabulary). So they are masked rather than renamed, and nothing here
    scatters values over `ids` (a repeated id would get whichever slot's value wins): `_held` counts each kept id
    once, and the outcomes are the kept slots plus the student's and teacher's mass outside them."""

    def __init__(self, ids, top, tail, target, keep=None):
        self.ids, self.top, self.tail, self.target = ids, top, tail, target
        self.keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep

    @classmethod
    def of(cls, cache, sel: torch.Tensor) -> _CachedTeacher:
        if not bool(cache.mask[:, :-1][sel].all()):
            raise ValueError(
                "the cache batch has no teacher entry for some labelled positions: cache rows and "
                "token batch are misaligned (join them by sequence id)"
            )
        top = cache.topk_logprobs[:, :-1][sel].float()
        # a slot of log p = -inf is no outcome (fewer distinct tokens than slots, as a cache carried into another
        # tokenizer's vocabulary has where candidates merge): its id is a filler, not a token of probability 0
        return cls(
            cache.topk_ids[:, :-1][sel],
            top,
            cache.tail_logmass[:, :-1][sel].float(),
            cache.target_logprob[:, :-1][sel].float(),
            top > NEG_INF,
        )

    def rows(self, part: slice) -> _CachedTeacher:
        return _CachedTeacher(self.ids[part], self.top[part], self.tail[part], self.target[part], self.keep[part])

    def expert(self, target: torch.Tensor) -> torch.Tensor:
        return self.target  # stored exactly, whether or not it is in the top-k

    def _held(self, logq: torch.Tensor):
        """(held [n, V]: the vocabulary entries a kept slot holds; the student's log-mass outside them [n]; covered
        [n]: whether they hold the whole vocabulary). Where they do there is no tail, and its log-mass is then the
        whole vocabulary's instead of an empty sum's -inf, whose gradient is nan: every caller masks it out."""
        held = torch.zeros_like(logq).scatter_add(-1, self.ids, self.keep.to(logq.dtype)) > 0
        covered = held.all(-1)
        return held, torch.logsumexp(logq.masked_fill(held & ~covered[:, None], NEG_INF), -1), covered

    def token(self, tokens: torch.Tensor, logq: torch.Tensor):
        """log p at tokens [n, S]: cached when in the top-k; otherwise the tail mass shared out in proportion to
        the student's own distribution over the tokens outside the top-k: p(a) ~ T * q(a) / Q_out."""
        hit = (self.ids[:, None, :] == tokens[:, :, None]) & self.keep[:, None, :]
        inside = hit.any(-1)
        cached = torch.where(hit, self.top[:, None, :], NEG_INF).amax(-1)
        q = logq.detach()
        estimate = self.tail[:, None] + q.gather(-1, tokens) - self._held(q)[1][:, None]
        return torch.where(inside, cached, estimate), inside

    def every(self, logq: torch.Tensor):
        """log p over the whole vocabulary [n, V], estimated outside the top-k as in `token`."""
        q = logq.detach()
        held, q_out, _ = self._held(q)
        stored = torch.full_like(q, NEG_INF).scatter_reduce(
            -1, self.ids, self.top.masked_fill(~self.keep, NEG_INF), "amax"
        )  # a repeated id: its kept slot's value
        return torch.where(held, stored, self.tail[:, None] + q - q_out[:, None]), held

    def outcomes(self, logq: torch.Tensor) -> Outcomes:
        """The kept slots and one tail bucket (not an outcome where the slots cover the vocabulary: its stored mass
        is then what rounding left, e.g. in a merge of teachers, and is dropped with it)."""
        _, q_out, covered = self._held(logq)
        keep = torch.cat([self.keep, ~covered[:, None]], -1)
        logp = torch.cat([self.top, self.tail[:, None]], -1).masked_fill(~keep, NEG_INF)
        return Outcomes(logp, torch.cat([logq.gather(-1, self.ids), q_out[:, None]], -1), keep)


class _SampledTeacher(_CachedTeacher):
    """Sampled targets (storage.cache_batch.SampledBatch): S slots per position, each with its exact log p and an
    unbiased estimate p_hat of p (drawn ids; 0 for undrawn ones that fill slots), or empty (log p = -inf: fewer
    distinct draws than slots; not kept). `estimate` gives the outcomes with p_hat: a loss linear in p (fkl, and the
    forward part of the hpd "dist" variants) then has an unbiased gradient. Every other use sees the exact log p at
    the stored ids plus the exact tail, like top-k (biased: the ids are partly random rather than the top)."""

    def __init__(self, ids, top, tail, target, log_w, keep=None):
        super().__init__(ids, top, tail, target, top > NEG_INF if keep is None else keep)
        self.log_w = log_w

    @classmethod
    def of(cls, batch, sel: torch.Tensor) -> _SampledTeacher:
        if not bool(batch.mask[:, :-1][sel].all()):
            raise ValueError(
                "the sampled batch has no teacher entry for some labelled positions: rows and token "
                "batch are misaligned (join them by sequence id)"
            )
        return cls(
            batch.ids[:, :-1][sel],
            batch.logprob[:, :-1][sel].float(),
            batch.tail_logmass[:, :-1][sel].float(),
            batch.target_logprob[:, :-1][sel].float(),
            batch.log_weight[:, :-1][sel].float(),
        )

    def rows(self, part: slice) -> _SampledTeacher:
        return _SampledTeacher(
            self.ids[part], self.top[part], self.tail[part], self.target[part], self.log_w[part], self.keep[part]
        )

    def linear_outcomes(self, logq: torch.Tensor) -> Outcomes:
        """The stored ids with p_hat, unbiased for a loss linear in p (no tail bucket: p_hat sums to 1 in
        expectation over the drawn ids)."""
        return Outcomes(self.log_w, logq.gather(-1, self.ids), self.keep)  # (log_w is -inf where not kept)


# Which distribution methods an unbiased p_hat makes unbiased: those whose gradient is linear in p. (The HPD "dist"
# variants' forward part f * p(v) is too; their sampled-token term and every other method are not.)
UNBIASED_ON_SAMPLED = ("fkl",)


# -- teacher signals: what a loss is given for a batch (DistillKit's dense and sparse signals): `at` a batch's
# labelled positions gives the view above; `select` keeps some of the batch's rows, for a mixture whose sources
# get different losses ------------------------------------------------------------------------------------------
class TeacherSignal:
    def at(self, sel: torch.Tensor, temperature: float) -> _TeacherView:
        raise NotImplementedError

    def select(self, rows) -> TeacherSignal:
        raise NotImplementedError


@dataclass
class TeacherLogits(TeacherSignal):
    """The teacher's full-vocabulary logits [B, L, V] for the batch (an online teacher, or a test's)."""

    logits: torch.Tensor

    def at(self, sel: torch.Tensor, temperature: float) -> _FullTeacher:
        return _FullTeacher.of(self.logits, sel, temperature)

    def select(self, rows) -> TeacherLogits:
        return TeacherLogits(self.logits[rows])


@dataclass
class CachedTargets(TeacherSignal):
    """A cache batch (storage.logit_cache.CacheBatch): the teacher's top-k, tail and target log-probs."""

    batch: CacheBatch

    def at(self, sel: torch.Tensor, temperature: float) -> _CachedTeacher:
        return _CachedTeacher.of(self.batch, sel)  # stored at the scoring temperature

    def select(self, rows) -> CachedTargets:
        return CachedTargets(self.batch.select(rows))


@dataclass
class SampledTargets(TeacherSignal):
    """A sampled-targets batch (storage.cache_batch.SampledBatch): drawn ids with p_hat and exact log-probs."""

    batch: SampledBatch

    def at(self, sel: torch.Tensor, temperature: float) -> _SampledTeacher:
        return _SampledTeacher.of(self.batch, sel)

    def select(self, rows) -> SampledTargets:
        return SampledTargets(self.batch.select(rows))


SIGNAL_OF = {torch.Tensor: TeacherLogits, CacheBatch: CachedTargets, SampledBatch: SampledTargets}


def teacher_signal(teacher) -> TeacherSignal | None:
    """A teacher signal from what a caller holds: logits [B, L, V], a CacheBatch or SampledBatch, or a signal."""
    if teacher is None or isinstance(teacher, TeacherSignal):
        return teacher
    for kind, signal in SIGNAL_OF.items():
        if isinstance(teacher, kind):
            return signal(teacher)
    raise TypeError(f"a teacher signal is logits, a CacheBatch or a SampledBatch, not a {type(teacher).__name__}")


def hpd_weights(logp_star, logq_star, logp_samp, logq_samp, same, shift=0.0):
    """Paper Eq. 11-14 for one sample: the expert-token weight w* = f * p(a*) + k1 and the sampled-token weight
    w (both detached). f, the coefficient of HPD's forward (SeqKD) part, is 2 if k1 > 0 and k1' < 0, 0 if
    k1 < 0 and 1 otherwise; returned too, since the variants apply it to the whole distribution. `shift` is
    added to the expert token's reward log p(a*) - log q(a*) (a sequence's value advantage, value guidance)."""
    k1 = logq_star.exp() * (logp_star - logq_star + shift)
    k1s = logq_samp.exp() * (logp_samp - logq_samp)
    w = torch.where(~same & (k1s < 0), k1s, torch.zeros_like(k1s))
    f = torch.where(k1 < 0, 0.0, torch.where((k1 > 0) & (k1s < 0), 2.0, 1.0))
    return f * logp_star.exp() + k1, w, k1, k1s, f


# Positions x vocabulary entries per loss chunk on a CPU (on a GPU larger: heads.chunk_elements). The loss's
# vocabulary-wide tensors (log-softmax, weights and their gradients) exist for one chunk at a time, so the loss's
# memory stays ~16 MB per tensor whatever the batch. Given logits, they are recomputed in the backward pass
# (activation checkpointing) and only the logits and their gradient are whole; given the student's head
# (StudentHead), not even those exist.
LOSS_CHUNK_ELEMENTS = 1 << 22


@dataclass
class StudentHead:
    """The student's last hidden states at the response positions [N, H] and its output layer (weight [V, H], bias
    [V] or None), in place of its logits: the loss then makes the logits a chunk of positions at a time and takes
    their gradient there, so neither the [N, V] logits nor their gradient ever exist (Liger's fused linear losses;
    heads.hidden_at gives the hidden states)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __getitem__(self, rows) -> StudentHead:
        return StudentHead(self.hidden[rows], self.weight, self.bias)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


class _HeadLoss(torch.autograd.Function):
    """The summed loss of `chunk_loss(logits of a chunk, its slice)` over chunks of positions, its gradient taken
    chunk by chunk in the forward pass (three matmuls a chunk, as the unchunked head takes in all): what the
    backward pass returns is the gradient of the hidden states, the weight and the bias, already summed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, parts):
        need = any(ctx.needs_input_grad[:3])  # (judging a model needs the loss alone)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for part in parts:
            h = hidden[part]
            z = torch.nn.functional.linear(h, weight, bias).detach().requires_grad_(need)
            with torch.enable_grad():
                loss = chunk_loss(z, part)
            if need and loss.requires_grad:
                (gz,) = torch.autograd.grad(loss, z)
                gz = gz.to(weight.dtype)
                if grad_h is not None:
                    grad_h[part] = gz @ weight
                if grad_w is not None:
                    grad_w.addmm_(gz.t(), h)
                if grad_b is not None:
                    grad_b += gz.sum(0)
            total += loss.detach().float()
        # Kept on ctx, not save_for_backward, and handed over in backward: the one reference left is the one returned,
        # so a weight whose gradient was dropped since the last step (the Trainer's zero_grad) takes grad_w as its
        # .grad without a copy: the head's gradient costs no more memory than an unfused head's would.
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if not bool(grad == 1):  # (a loss taken as it is, the usual case, hands its buffers on without a copy)
            grads = tuple(None if g is None else g.mul_(grad) for g in grads)
        return (*grads, None, None)


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions whose logits predict a labelled token. Given to a Hugging Face model as
    `logits_to_keep`, it makes the model compute logits [N, V] only there, in the order distill_loss expects."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def distill_loss(
    method: str,
    student_logits: torch.Tensor | StudentHead,
    labels: torch.Tensor,
    teacher=None,
    sampled_tokens: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    chunk_elements: int | None = None,
    sequence_weight: torch.Tensor | None = None,
    sequence_advantage: torch.Tensor | None = None,
    **params,
):
    """(scalar loss, diagnostics): the mean over labelled positions. `student_logits`: [B, L, V], or [N, V] at
    the `response_positions(labels)` only, or a StudentHead at those positions (the logits made chunk by chunk,
    never whole: the same loss and gradient, far less memory). `teacher`: a teacher signal (TeacherLogits,
    CachedTargets, SampledTargets), or the logits [B, L, V], CacheBatch or SampledBatch it wraps; unused by sft.

    `sampled_tokens` [B, L] fixes HPD's per-position student sample (aligned with `labels`, i.e. the token
    sampled for label position t+1 sits at index t+1); without it one token is drawn from the student in fp32.
    HPD variants that sample take [B, L, S] (`hpd_nsamp`: S = hpd_samples); "expect" variants draw nothing.
    Params: beta (jsd, default 0.5), alpha (skl / srkl, default 0.1), mu (akl, default 0.5), hpd_samples
    (hpd_nsamp, default 4).

    Value guidance, per row [B]: `sequence_weight` multiplies every position's loss of that row (the mean is
    still over positions); `sequence_advantage` is added to the per-token teacher reward log p(a*) - log q(a*)
    of the REWARD_METHODS (opd's advantage, HPD's k1 = q(a*) * reward), i.e. the sequence's value advantage
    reinforces or discourages its tokens on top of the teacher's judgement of each.
    """
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")
    y = labels[:, 1:]
    sel = y != -100
    n = int(sel.sum())
    head = student_logits if isinstance(student_logits, StudentHead) else None
    if n == 0:
        return (head.hidden if head else student_logits).sum() * 0.0, {"tokens": 0}
    z = head.hidden if head else student_logits[:, :-1][sel] if student_logits.dim() == 3 else student_logits
    if z.shape[0] != n:
        raise ValueError(
            f"student logits have {z.shape[0]} positions but the labels {n}: give logits for every "
            f"position or for response_positions(labels) only"
        )
    if method != "sft" and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher (logits or a cache batch)")
    view = None if method == "sft" else teacher_signal(teacher).at(sel, temperature)
    target = y[sel]
    if sequence_advantage is not None and method not in REWARD_METHODS:
        raise ValueError(
            f"a value advantage shifts a teacher reward; method {method!r} has none "
            f"(use one of {', '.join(REWARD_METHODS)})"
        )
    per_row = [
        None if x is None else x.to(z.device, torch.float32)[:, None].expand_as(y)[sel]
        for x in (sequence_weight, sequence_advantage)
    ]
    samples = None if sampled_tokens is None else sampled_tokens[:, 1:][sel]
    chunk_elements = chunk_elements or heads.chunk_elements(LOSS_CHUNK_ELEMENTS, z.device)
    rows = max(1, chunk_elements // (head.vocab if head else z.shape[-1]))
    parts = [slice(lo, min(lo + rows, n)) for lo in range(0, n, rows)]
    draws, sums = _draws(method, params), {}

    def chunk_loss(zp: torch.Tensor, part: slice) -> torch.Tensor:
        sample = None if samples is None else samples[part]
        if draws and sample is None:  # drawn before the loss (and outside a checkpoint: its recomputation sees it)
            with torch.no_grad():
                sample = torch.multinomial(
                    torch.softmax(zp.detach().float(), -1), draws, replacement=True, generator=generator
                )
        args = (
            method,
            None if view is None else view.rows(part),
            params,
            zp,
            target[part],
            sample,
            *(None if x is None else x[part] for x in per_row),
        )
        if head is None and zp.requires_grad and n > rows:
            loss_sum, stats = checkpoint(_position_losses, *args, use_reentrant=False)
        else:
            loss_sum, stats = _position_losses(*args)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        return loss_sum

    if head is not None:
        total = _HeadLoss.apply(head.hidden, head.weight, head.bias, chunk_loss, parts)
    else:
        total = sum(chunk_loss(z[part], part) for part in parts)
    return total / n, {"tokens": n, **{k: v / n for k, v in sums.items()}}


def _draws(method: str, params: dict) -> int:
    """How many student samples per position a method draws."""
    terms = HPD_FAMILY.get(method, (None, None))[1]
    return {"sample": 1, "samples": int(params.get("hpd_samples", 4))}.get(terms, 0)


def _position_losses(
    method: str, view, params: dict, z: torch.Tensor, target: torch.Tensor, sample, weight=None, shift=None
):
    """Summed loss over a chunk of positions (its gradient the weighted log-likelihood's), and summed
    diagnostics. z: the student's logits [n, V] at those positions; `weight` [n] multiplies each position's
    loss and `shift` [n] is added to its teacher reward (value guidance; None: neither)."""
    per, stats = _per_position(method, view, params, z, target, sample, shift)
    if weight is not None:
        per, stats = per * weight, {**stats, "sequence_weight": weight.sum()}
    if shift is not None:
        stats["value_advantage"] = shift.sum()
    return per.sum(), stats


def _per_position(method: str, view, params: dict, z: torch.Tensor, target: torch.Tensor, sample, shift):
    """(loss per position [n], summed diagnostics)."""
    logq = torch.log_softmax(z.float(), -1)
    logq_star = logq.gather(-1, target[:, None])[:, 0]
    if method == "sft":
        return -logq_star, {"nll": -logq_star.detach().sum()}
    logp_star = view.expert(target)

    if method in DISTRIBUTION_METHODS:
        o = view.linear_outcomes(logq) if method in UNBIASED_ON_SAMPLED else view.outcomes(logq)
        q = o.logq.detach()
        if o.keep is not None:  # a column that is no outcome: p = q = 0 in the value, and no weight
            q = q.masked_fill(~o.keep, NEG_INF)
        value, w = DISTRIBUTION_METHODS[method](Outcomes(o.logp, q), q, **params)
        if o.keep is not None:
            w = w.masked_fill(~o.keep, 0.0)
        surrogate = -(w.detach() * o.logq).sum(-1)
        return value + surrogate - surrogate.detach(), {method: value.detach().sum()}
    if method == "seqkd":
        return -(logp_star.exp() * logq_star), {"mean_weight": logp_star.exp().sum()}
    if method == "opd":  # on-policy data: the labels are the student's own samples
        adv = (logp_star - logq_star).detach() + (0.0 if shift is None else shift)
        return -(adv * logq_star), {"reward": adv.sum()}

    return _hpd_family(
        *HPD_FAMILY[method], view, logq, logq_star, logp_star, target, sample, 0.0 if shift is None else shift
    )


# What the HPD family reports per position (means in the training log): the share of sampled candidates whose
# term is active, outside the cached top-k, equal to the expert token; the mean weights; the share with k1 > 0.
HPD_DIAGNOSTICS = (
    "sample_term_active",
    "sample_outside_topk",
    "sample_is_expert",
    "mean_w_star",
    "mean_w_sample",
    "k1_positive",
)


def _hpd_family(forward: str, draws: str, view, logq, logq_star, logp_star, target, sample, shift=0.0):
    """HPD and its variants (HPD_FAMILY): the paper's weights (`hpd_weights`) for each candidate token a,
    averaged over the candidates with weights pi(a): the drawn samples (pi = 1/S) or every vocabulary token
    (pi = q(a), the exact expectation). The candidates' weights go to their own log q(a); the expert token gets
    the mean of w* = f * p(a*) + k1, where the "dist" forward part moves f * p(a*) onto every outcome as f * p(v)."""
    q = logq.detach()
    if draws == "expect":
        cand = torch.arange(q.shape[-1], device=q.device).expand_as(q)
        logp_c, inside = view.every(q)
        pi = q.exp()
    else:
        cand = sample.reshape(len(target), -1)
        logp_c, inside = view.token(cand, q)
        pi = torch.full(cand.shape, 1.0 / cand.shape[-1], device=q.device)
    same = cand == target[:, None]
    logp_c = torch.where(same, logp_star[:, None], logp_c)  # the expert token's log-prob is stored exactly
    logq_c = logq if draws == "expect" else logq.gather(-1, cand)
    shift = shift[:, None] if isinstance(shift, torch.Tensor) else shift
    _, w_c, k1, k1s, f_c = hpd_weights(
        logp_star[:, None], logq_star.detach()[:, None], logp_c, q.gather(-1, cand), same, shift
    )
    k1, f, w = k1[:, 0], (pi * f_c).sum(-1), pi * w_c
    if forward == "dist":
        o = view.linear_outcomes(logq)
        forward_loss = -(f[:, None] * o.logp.exp() * o.logq).sum(-1)
    else:
        forward_loss = -(f * logp_star.exp()) * logq_star
    loss = forward_loss - k1 * logq_star - (w * logq_c).sum(-1)
    return loss, {
        "sample_outside_topk": (pi * ~inside).sum(),
        "sample_term_active": (pi * (w_c != 0)).sum(),
        "sample_is_expert": (pi * same).sum(),
        "mean_w_star": (f * logp_star.exp() + k1).sum(),
        "mean_w_sample": w.sum(),
        "k1_positive": (k1 > 0).sum(),
    }
