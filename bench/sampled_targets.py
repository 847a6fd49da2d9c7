"""Sampled teacher targets against top-k, by the gradient they give (issue 22's first measurement).

For the batches and student of bench/hpd_gradient.py, the gradient of fkl, hpd_fkl and hpd with respect to the
student's parameters, computed with the teacher's full logits, is compared (cosine) with the same gradient from:
  - a top-k cache at k = 16 and 64 (the real encode/decode path, as bench/hpd_gradient.py does);
  - sampled targets with N draws (`stages/scoring.py sample_positions`: N slots per position, the drawn tokens with an
    unbiased estimate of p, the rest of the slots the most probable undrawn tokens), from p itself (proposal 1) and
    from the flatter proposal p^0.5, one set of draws per position as a cache would hold.
No cache encoding for sampled targets exists yet, so the arms are compared at equal slots per position, not bytes.

    python -m bench.sampled_targets [--config dialogue|smollm2]

Writes bench/results/sampled_targets[_smollm2].json.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from hpd.stages.losses import distill_loss
from hpd.stages.scoring import sample_positions
from hpd.storage.cache_batch import SampledBatch

from .hpd_gradient import agreement, arguments, cache_from_logits, flat_grad, gradient_batches, results_path

SAMPLED = [(8, 1.0), (16, 1.0), (64, 1.0), (16, 0.5)]  # (draws = slots per position, proposal exponent)


def sampled_batch(t_logits, ids, cache_mask, draws: int, proposal: float, seed: int) -> SampledBatch:
    B, L, V = t_logits.shape
    nxt = torch.cat([ids[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1)
    s_ids, log_w, logp, target, tail, _ = sample_positions(t_logits.reshape(B * L, V), nxt.reshape(-1), draws=draws,
                                                  proposal=proposal, generator=torch.Generator().manual_seed(seed))
    return SampledBatch(ids=s_ids.view(B, L, -1), log_weight=log_w.view(B, L, -1), logprob=logp.view(B, L, -1),
                        target_logprob=target.view(B, L), tail_logmass=tail.view(B, L), mask=cache_mask)


def main():
    args = arguments(__doc__).parse_args()
    out = results_path(args, "sampled_targets")
    batches = gradient_batches(args)
    student = next(batches)
    cosines: dict[str, list[float]] = {}
    distinct: dict[str, list[float]] = {}  # drawn ids per position: what a compact encoding would store
    for n, (ids, mask, labels, t_logits, sample, cache_mask) in enumerate(batches, 1):
        targets = {f"top-{k}": cache_from_logits(t_logits, ids, cache_mask, k) for k in (16, 64)}
        targets.update({f"sampled {d}" + (f" (proposal p^{q:g})" if q != 1 else ""):
                        sampled_batch(t_logits, ids, cache_mask, d, q, seed=n) for d, q in SAMPLED})
        for name, t in targets.items():
            if name.startswith("sampled"):
                drawn = (t.log_weight > -float("inf")).sum(-1)[cache_mask]
                distinct.setdefault(name, []).append(float(drawn.float().mean()))
        for method in ("fkl", "hpd_fkl", "hpd"):
            grads = {}
            for name, teacher in (("full", t_logits), *targets.items()):
                student.zero_grad()
                loss, _ = distill_loss(method, student(input_ids=ids, attention_mask=mask).logits, labels,
                                       teacher=teacher, sampled_tokens=sample)
                loss.backward()
                grads[name] = flat_grad(student).clone()
            for name in targets:
                cosines.setdefault(f"{method} from {name}", []).append(agreement(grads[name], grads["full"])[0])
        print(f"batch {n}/{args.batches}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in cosines.items()
                                                         if k.startswith("fkl")), flush=True)
    summary = {k: {"cosine_mean": float(np.mean(v)), "cosine_min": float(np.min(v)), "batches": len(v)}
               for k, v in cosines.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    drawn = {k: float(np.mean(v)) for k, v in distinct.items()}
    out.with_suffix(".json").write_text(json.dumps({"config": args.config, "batches": args.batches, "arms": summary,
                                                    "distinct_drawn_ids_per_position": drawn}, indent=1) + "\n")
    print(drawn)
    for k, v in summary.items():
        print(f"{k:<40} cosine {v['cosine_mean']:.4f} (min {v['cosine_min']:.4f})")


if __name__ == "__main__":
    main()
