"""What scoring costs beyond the teacher's forward pass, timed apart from the background writer.

    python -m bench.score_overhead --config smollm2      (after `hpd run --config smollm2 --until generate`)

The score stage reports its overhead from inside the stage, where the background shard writer shares the two
cores with the forward and so inflates the forward's time rather than the overhead. Here the same batches
(the run's own sequences, batched as its score section says) go through, alternating, repeated:
  bare      the teacher's forward alone (`model(ids)`, logits to the CPU), nothing else running;
  scored    `stages.score.score_batch`: the forward plus log-softmax, top-k, target log-prob and tail mass.
Writing (encoding, zstd, Arrow, fsync) is timed on its own, as the background thread would do it.
Writes bench/results/score_overhead_<config>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hpd import open_run
from hpd.stages import batching, hf_models
from hpd.stages.score import DEFAULT_K
from hpd.stages.scoring import score_batch
from hpd.storage.logit_cache import CacheRoot, ScoredSequence, cache_key
from hpd.storage.sequences import SequenceStore


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="run config (default: the built-in math run)")
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=0, help="0 = all of the run's sequences")
    args = ap.parse_args()
    runner = open_run(args.config, [], home=args.home)
    cfg = runner.cfg
    runner.run(until="generate")
    teacher = runner.outputs("teacher")
    store = SequenceStore(Path(runner.outputs("generate").sequences))
    n = args.sequences or len(store)
    seq_ids, plens, seqs = store.range(0, n)
    model, tok = hf_models.load_teacher(teacher)
    model = hf_models.to_accelerator(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    s = cfg.score
    k = s.top_k or min(DEFAULT_K, teacher.vocab_size)  # the score stage's own rule (math: k = V = 18)
    batches = batching.length_batches([len(x) for x in seqs], s.batch_size, s.batch_tokens)
    tokens = int(sum(len(x) - int(p) for x, p in zip(seqs, plens)))

    def bare():
        with torch.no_grad():
            for idx in batches:
                ids, mask = batching.pad_right([seqs[i] for i in idx], pad)
                model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.cpu()

    rows = []

    def scored():
        rows.clear()
        for idx in batches:
            out = score_batch(
                model,
                [seqs[i] for i in idx],
                [int(plens[i]) for i in idx],
                top_k=k,
                temperature=s.temperature,
                pad_id=pad,
            )
            rows.extend(ScoredSequence(seq_id=int(seq_ids[i]), input_ids=seqs[i], **o) for i, o in zip(idx, out))

    times = {"bare": [], "scored": []}
    for _ in range(args.repeats):
        for arm, fn in (("bare", bare), ("scored", scored)):
            t0 = time.perf_counter()
            fn()
            times[arm].append(time.perf_counter() - t0)
    key = cache_key(
        teacher=teacher.model_fingerprint,
        tokenizer=teacher.tokenizer_fingerprint,
        data=store.fingerprint,
        top_k=k,
        temperature=s.temperature,
        encoding=s.encoding,
    )
    writer = CacheRoot(Path(tempfile.mkdtemp(prefix="hpd-overhead-"))).writer(
        key, shard_size=len(rows), num_sequences=len(rows), vocab_size=teacher.vocab_size
    )
    t0 = time.perf_counter()
    writer.write_rows(0, sorted(rows, key=lambda r: r.seq_id))
    write = time.perf_counter() - t0
    fwd, sc = statistics.median(times.bare), statistics.median(times.scored)
    result = {
        "config": args.config or "math",
        "sequences": n,
        "response_tokens": tokens,
        "top_k": k,
        "batches": len(batches),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "bare_forward_s": fwd,
        "scored_s": sc,
        "write_s": write,
        "tokens_per_s_bare": tokens / fwd,
        "tokens_per_s_scored": tokens / sc,
        "overhead_compute": (sc - fwd) / fwd,
        "overhead_with_write": (sc + write - fwd) / fwd,
    }
    out = Path(__file__).parent / "results" / f"score_overhead_{result['config']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
