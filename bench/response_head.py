"""The student's logits at response positions: three ways, timed side by side on one training step.

    python -m bench.response_head [--repeats 30]

  full            the model's [B, L, V] logits, then the response positions picked out (what any version can do);
  logits_to_keep  transformers' boolean `logits_to_keep` (5.20 and later);
  head hook       `heads.head_only_at`: a forward pre-hook runs the output head on the response positions only
                  (what distill uses, on every transformers version).
A GPT-2 student of the dialogue task's shape (vocabulary 8,192) does forward + sft loss + backward on a batch
whose responses are half its positions; the three are interleaved, repeat after repeat, and the median step time
of each is kept. Writes bench/results/response_head.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

from bench.provenance import stamp
from hpd.stages import heads
from hpd.stages.losses import distill_loss, response_positions

OUT = Path(__file__).resolve().parent / "results" / "response_head.json"


def step(model, ids, labels, how: str) -> float:
    keep = response_positions(labels)
    t0 = time.perf_counter()
    if how == "head hook":
        with heads.head_only_at(model, keep):
            logits = model(input_ids=ids).logits
    elif how == "logits_to_keep":
        logits = model(input_ids=ids, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=ids).logits[keep]
    loss, _ = distill_loss("sft", logits, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main():
    from transformers import GPT2Config, GPT2LMHeadModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab, batch, length = 8192, 32, 128
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab, n_positions=length, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
    )
    ids = torch.randint(0, vocab, (batch, length))
    labels = ids.clone()
    labels[:, : length // 2] = -100  # prompts: half of every row
    ways = ["full", "head hook"]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        ways.append("logits_to_keep")
    times = {w: [] for w in ways}
    for w in ways:  # warm-up
        step(model, ids, labels, w)
    for _ in range(args.repeats):
        for w in ways:
            times[w].append(step(model, ids, labels, w))
    median = {w: statistics.median(t) for w, t in times.items()}
    result = {
        "made": stamp(),
        "model": "GPT-2 2x128, vocabulary 8192",
        "batch": batch,
        "length": length,
        "response_share": 0.5,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "median_step_seconds": median,
        "relative_to_full": {w: median[w] / median["full"] for w in ways},
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
