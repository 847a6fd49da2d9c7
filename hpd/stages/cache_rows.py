"""The teacher pass's arithmetic, in torch alone (no storage): from a batch of sequences to what a cache stores
per response position. The score stage (hpd/stages/score.py) writes it into the cache; bench/gpu_check.py measures it
on a GPU machine that has torch and transformers but none of the storage packages."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

from hpd.common.errors import HpdError

from . import batching, heads


class Timer(dict):
    """Seconds spent per phase: `with timer("forward"): ...` adds to timer["forward"]."""

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0


@torch.no_grad()
def score_positions(logits: torch.Tensor, targets: torch.Tensor, *, top_k: int, temperature: float = 1.0):
    """What a cache stores for N positions, from their [N, V] float32 logits and the [N] tokens that follow:
    top-k ids and log-probs (sorted), the target's exact log-prob, the tail's log-mass. Lean: the top-k of the raw
    logits (the same tokens: dividing by T and normalising keep their order), one logsumexp for the normaliser, and
    the tail summed over the logits with the top-k masked in place: no [N, V] log-softmax is made."""
    z = logits / temperature if temperature != 1.0 else logits.clone()  # (modified in place below)
    top_z, top_ids = torch.topk(z, top_k, dim=-1)  # sorted
    norm = torch.logsumexp(z, dim=-1, keepdim=True)
    target = z.gather(-1, targets.unsqueeze(-1)) - norm
    # The tail is summed directly over the tokens outside the top-k: log(1 - sum(top)) loses all precision
    # when the top-k hold nearly all the mass, which is exactly the common case.
    tail = torch.logsumexp(z.scatter_(-1, top_ids, -float("inf")), dim=-1, keepdim=True) - norm
    return top_ids, top_z - norm, target.squeeze(-1), tail.squeeze(-1)


# Response positions x vocabulary entries whose logits exist at once while scoring on a CPU: the head runs a chunk at a
# time (on a GPU chunks are larger: heads.chunk_elements).
SCORE_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def score_batch(
    model,
    seqs: list[np.ndarray],
    prompt_lens: list[int],
    *,
    top_k: int,
    temperature: float,
    pad_id: int,
    timer: Timer | None = None,
    draws: int = 0,
    head: int = 0,
    seeds: list[int] | None = None,
) -> list[dict]:
    """Top-k, exact target log-prob and tail log-mass for every response position of each sequence. With `draws`,
    sampled targets instead (sample_positions, drawn slots only, with their counts), each sequence's draws from its
    own seed in `seeds`: a sequence gets the same draws whatever batch it is scored in (resume, other batch sizes).

    The teacher's output head runs at the response positions only (prompts and padding are most of a batch), a
    chunk of positions at a time (heads.hidden_at), so its [B, L, V] logits are never built; a head that is not a
    plain linear map (soft capping) runs whole at those positions instead (heads.head_only_at)."""
    timer = timer if timer is not None else Timer()
    spans = [(p - 1, len(s) - 1) for s, p in zip(seqs, prompt_lens)]
    with timer("forward"):
        ids, mask = batching.pad_right(seqs, pad_id)
        ids = ids.to(model.device)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        for b, (st, e) in enumerate(spans):
            keep[b, st:e] = True
        logits_of, vocab = heads.logits_at(model, ids, mask.to(model.device), keep)
        if ids.is_cuda:  # (kernels run asynchronously: the forward's time is the forward's)
            torch.cuda.synchronize(ids.device)
    with timer("topk"):
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: each sequence's positions in order, as `keep` selects
        nxt = ids[rows, cols + 1]
        if draws:  # a sequence at a time: its draws come from its own generator
            return _sampled_rows(logits_of, nxt, spans, draws, head, temperature, seeds)
        n, step = len(nxt), max(1, heads.chunk_elements(SCORE_CHUNK_ELEMENTS, ids.device) // vocab)
        parts = [
            _checked(logits_of(slice(lo, lo + step)), top_k, nxt[lo : lo + step], temperature)
            for lo in range(0, n, step)
        ]
        top_ids, top_lp, target, tail = (torch.cat(x).cpu() for x in zip(*parts))
        out, i = [], 0
        for st, e in spans:
            sl = slice(i, i + e - st)
            out.append(
                {
                    "start": st,
                    "topk_ids": top_ids[sl].numpy(),
                    "topk_logprobs": top_lp[sl].numpy(),
                    "target_logprob": target[sl].numpy(),
                    "tail_logmass": tail[sl].numpy(),
                }
            )
            i += e - st
    return out


def _finite(z: torch.Tensor) -> torch.Tensor:
    """The logits as they are, or a one-line error: a broken teacher must not become a cache that students trust."""
    if not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).any(-1).sum())
        raise HpdError(
            f"the teacher's logits are NaN or inf at {bad} of {len(z)} positions of a batch; "
            f"the teacher is broken (check its weights and dtype, e.g. fp16 overflow)"
        )
    return z


def _checked(z, top_k, nxt, temperature):
    return score_positions(_finite(z), nxt, top_k=top_k, temperature=temperature)


def _sampled_rows(logits_of, nxt, spans, draws: int, head: int, temperature: float, seeds: list[int]) -> list[dict]:
    out, i = [], 0
    for (st, e), seed in zip(spans, seeds):
        sl = slice(i, i + e - st)
        kept = _finite(logits_of(sl))
        g = torch.Generator(device=kept.device).manual_seed(int(seed))
        d = sample_positions(kept, nxt[sl], draws=draws, temperature=temperature, generator=g, fill=False, head=head)
        out.append(
            {
                "start": st,
                "topk_ids": d.ids.cpu().numpy(),
                "topk_logprobs": d.logprob.cpu().numpy(),
                "counts": d.counts.cpu().numpy(),
                "target_logprob": d.target.cpu().numpy(),
                "tail_logmass": d.tail.cpu().numpy(),
                **({"rest_logmass": d.rest.cpu().numpy()} if head else {}),
            }
        )
        i += e - st
    return out


class Draws(NamedTuple):
    """sample_positions' result, per position: S = head + draws slots."""

    ids: torch.Tensor  # [N, S] the head's ids, then the drawn ones (distinct; an empty slot repeats the last)
    log_weight: torch.Tensor  # [N, S] log p_hat: exact log p for the head, -inf where undrawn
    logprob: torch.Tensor  # [N, S] exact log p
    target: torch.Tensor  # [N] exact log p of the next token
    tail: torch.Tensor  # [N] log of the mass outside the slots
    counts: torch.Tensor  # [N, S] times each slot's id was drawn (0 for the head)
    rest: torch.Tensor  # [N] log of the mass outside the head, that the draws estimate (0 without a head)


@torch.no_grad()
def sample_positions(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    draws: int,
    temperature: float = 1.0,
    proposal: float = 1.0,
    generator: torch.Generator | None = None,
    fill: bool = True,
    head: int = 0,
    systematic: bool = True,
) -> Draws:
    """What a sampled-targets cache stores for N positions (random-sampling KD, Anshumann et al. 2025), from their
    [N, V] float32 logits and the [N] tokens that follow. With `head`, the `head` most probable tokens are kept
    exactly and the draws estimate the rest of the distribution only (lower variance for the same draws).

    `draws` tokens are drawn with replacement from r = q^proposal / Z, q being p outside the head renormalised (p
    itself without a head; proposal = 1: q itself). Slots: the head (p_hat = p), then the distinct drawn ids, each
    with p_hat = count / draws x q / r x R, R the mass outside the head: an unbiased estimate of p (its expectation
    over the draws is p), then, where fewer distinct ids were drawn, the most probable undrawn tokens with p_hat = 0.
    Every slot has its exact log p; the target's exact log p and the tail's log-mass (outside the slots) too. With
    fill=False the undrawn slots are left empty (-inf) and the tail is the mass outside the head and drawn ids:
    what a sampled-targets cache stores (encodings.py `sampled`). Slots beyond the V - head tokens outside the head
    (more draws than that) are empty either way.

    systematic (the default): the N draws of a position are one uniform u and the points (u + i) / N, i < N, read
    through r's cumulative distribution (systematic sampling): every draw is still distributed as r, so each token's
    expected count is N r(v) and p_hat stays unbiased, but a token with r(v) >= 1/N is drawn floor(N r(v)) or
    ceil(N r(v)) times, never 0 or 2N r(v): far less variance than N independent draws (measured in
    bench/sampled_targets.py). systematic=False: N independent draws."""
    lp = torch.log_softmax(logits / temperature, dim=-1)
    V = lp.shape[-1]
    if not 0 <= head < V:
        raise ValueError(f"a head of {head} tokens leaves nothing to draw from a vocabulary of {V}: keep fewer")
    if head:
        head_lp, head_ids = lp.topk(head, dim=-1)
        outside = lp.scatter(-1, head_ids, -float("inf"))
        rest = torch.logsumexp(outside, dim=-1)
        base = outside - rest[:, None]  # q: p outside the head, renormalised
    else:
        base, rest = lp, torch.zeros(len(lp), dtype=lp.dtype, device=lp.device)
    log_r = torch.log_softmax(base * proposal, dim=-1)
    if systematic:  # (float64: a float32 cumulative sum over a large vocabulary drifts by more than 1/N's share)
        cdf = log_r.double().exp().cumsum(-1)
        u = torch.rand(len(lp), 1, generator=generator, device=lp.device, dtype=torch.float64)
        points = (u + torch.arange(draws, device=lp.device, dtype=torch.float64)) / draws * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, points, right=True).clamp_max(lp.shape[-1] - 1)
    else:
        drawn = torch.multinomial(log_r.exp(), draws, replacement=True, generator=generator)  # [N, draws]
    counts = torch.zeros_like(lp).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=lp.dtype))
    # drawn ids first (by count), then undrawn ones outside the head by p: one ordering key, counts dominating; the
    # head's ids never (a probability that underflows to 0 would tie with them)
    order = torch.where(counts > 0, counts + 2.0, base.exp())
    if head:
        order = order.scatter(-1, head_ids, -1.0)
    # Only V - head distinct tokens lie outside the head: with more draws than that, the last slots stay empty
    # (log p = -inf, count 0; their id repeats the last one, as a cache decodes them, and is no outcome).
    ids = order.topk(min(draws, V - head), dim=-1).indices
    ids = torch.cat([ids, ids[:, -1:].expand(-1, draws - ids.shape[-1])], -1)
    filled = torch.arange(draws, device=lp.device) < V - head
    c = counts.gather(-1, ids) * filled
    logp = lp.gather(-1, ids)
    log_w = torch.where(
        c > 0, torch.log(c / draws) + base.gather(-1, ids) - log_r.gather(-1, ids) + rest[:, None], -float("inf")
    )
    logp = torch.where((c > 0) if not fill else filled, logp, -float("inf"))
    if head:
        ids, logp = torch.cat([head_ids, ids], -1), torch.cat([head_lp, logp], -1)
        log_w, c = torch.cat([head_lp, log_w], -1), torch.cat([torch.zeros_like(head_lp), c], -1)
    target = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # the mass outside the slots, summed directly (as score_positions does): 1 - sum(slots) rounds to 0 or below
    # when the slots hold nearly all of a peaked distribution; an id counts once, however many slots name it
    held = torch.zeros_like(lp).scatter_add_(-1, ids, (logp > -float("inf")).to(lp.dtype)) > 0
    tail = torch.logsumexp(lp.masked_fill(held, -float("inf")), dim=-1)
    return Draws(ids, log_w, logp, target, tail, c.long(), rest)
