"""bfloat16 against float32 on this CPU (it has AVX512-BF16): scoring, sampling and a training step, timed side by side,
and how far a bf16 teacher's cache is from the fp32 one.

    python -m bench.bf16_cpu        (after `make smollm2-teacher`)

On SmolLM2-135M-Instruct and the first 32 sequences of --config smollm2 (its own replies):
  score     stages.scoring.score_batch at top-64 over the 32 sequences, the teacher in fp32 or in bf16;
  sample    64 new tokens for 16 of its prompts (stages.sampling.sample, batch 16);
  train     one distillation step (fkl, the head inside the loss) of the whole model on 8 of the sequences, fp32 or
            under CPU autocast to bf16 (what distill.bf16 does).
Agreement: the bucket KL (the fp32 top-64 and one tail bucket) from the fp32 teacher's distribution to the bf16
one's at every response position: what a cache scored in bf16 changes. bench/timing.py: a warm-up round, 5 rounds of
the arms in turn, medians and spread. Writes bench/results/bf16_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from bench.provenance import stamp
from bench.timing import alternate
from hpd import open_run
from hpd.stages import batching, heads, hf_models, sampling
from hpd.stages.cache_rows import score_batch
from hpd.stages.losses import StudentHead, distill_loss, response_positions
from hpd.storage.cache_batch import ScoredSequence, grid_batch
from hpd.storage.sequences import SequenceStore

RESULTS = Path(__file__).resolve().parent / "results"
K = 64


def bucket_kl(p_rows: list[dict], q_rows: list[dict]) -> dict:
    """KL(p || q) over p's top-k and one tail bucket, per position: p from fp32, q from bf16 (its log-probs at p's
    top-k ids are not all stored in q's own top-k, so q is scored in full here: see `full_q`)."""
    kls = []
    for p, q in zip(p_rows, q_rows):
        p_top, q_top = torch.tensor(p["topk_logprobs"]).double(), torch.tensor(q).double()
        p_tail = torch.tensor(p["tail_logmass"]).double()
        q_tail = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-12))
        kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
        kls += kl.tolist()
    kls.sort()
    return {"mean": sum(kls) / len(kls), "p99": kls[int(0.99 * (len(kls) - 1))], "max": kls[-1], "positions": len(kls)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    run = open_run("smollm2", [], home=args.home, log=lambda s: None)
    run.run(until="generate")
    teacher, data = run.outputs("teacher"), run.outputs("data")
    store = SequenceStore(Path(run.outputs("generate").sequences))
    _, plens, seqs = store.range(0, 32)
    plens = [int(p) for p in plens]
    fp32, tok = hf_models.load_causal_lm(teacher.model_dir)
    bf16, _ = hf_models.load_causal_lm(teacher.model_dir, dtype=torch.bfloat16)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [batching.encode_pair(tok, json.loads(line)["prompt"], None)[0] for line in list(open(data.train))[:16]]

    def score(model):
        return lambda: score_batch(model, list(seqs), plens, top_k=K, temperature=1.0, pad_id=pad)

    def sample(model):
        def go():
            torch.manual_seed(0)
            sampling.sample(model, tok, prompts, max_new_tokens=64, batch_size=16, sort=True)

        return go

    student = hf_models.load_causal_lm(teacher.model_dir)[0].train()
    train_seqs, train_plens = list(seqs[:8]), plens[:8]
    ids, mask = batching.pad_right(train_seqs, pad)
    labels = ids.clone()
    labels[mask == 0] = -100
    for b, p in enumerate(train_plens):
        labels[b, :p] = -100
    rows = score_batch(fp32, train_seqs, train_plens, top_k=K, temperature=1.0, pad_id=pad)
    cache = grid_batch(
        [ScoredSequence(seq_id=b, input_ids=train_seqs[b], **r) for b, r in enumerate(rows)], K, length=ids.shape[1]
    )
    keep = response_positions(labels)

    def train(autocast: bool):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with heads.hidden_at(student, keep) as head:
                    hidden = student(input_ids=ids, attention_mask=mask).logits
                loss, _ = distill_loss("fkl", StudentHead(hidden, head.weight, head.bias), labels, teacher=cache)
            loss.backward()

        return step

    arms = {
        "score fp32": score(fp32),
        "score bf16": score(bf16),
        "sample fp32": sample(fp32),
        "sample bf16": sample(bf16),
        "train fp32": train(False),
        "train bf16 autocast": train(True),
    }
    results = alternate(arms, rounds=args.rounds, prepare=lambda: student.zero_grad(set_to_none=True))
    # agreement: the bf16 teacher's log-probs at the fp32 top-k ids, at the same positions
    p_rows = score_batch(fp32, list(seqs), plens, top_k=K, temperature=1.0, pad_id=pad)
    q_rows = []
    with torch.no_grad():
        for s, p, r in zip(seqs, plens, p_rows):
            lp = torch.log_softmax(bf16(input_ids=torch.tensor([s])).logits[0].float(), -1)[p - 1 : len(s) - 1]
            q_rows.append(lp.gather(-1, torch.tensor(r["topk_ids"])).numpy())
    tokens = sum(len(s) - p for s, p in zip(seqs, plens))
    out = {
        "made": stamp(),
        "model": teacher.model_dir,
        "threads": torch.get_num_threads(),
        "cpu_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "scored_tokens": tokens,
        "arms": results,
        "bucket_kl_fp32_to_bf16": bucket_kl(p_rows, q_rows),
        "speedup": {
            what: results[f"{what} fp32"]["seconds"]["median"]
            / results[f"{what} bf16" + (" autocast" if what == "train" else "")]["seconds"]["median"]
            for what in ("score", "sample", "train")
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bf16_cpu.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("speedup", "bucket_kl_fp32_to_bf16")}, indent=1))
    assert math.isfinite(out["bucket_kl_fp32_to_bf16"]["mean"])


if __name__ == "__main__":
    main()
