"""What scoring costs beyond the teacher's forward pass, timed apart from the background writer.

    python -m bench.score_overhead --config smollm2                       (after `make smollm2-teacher`)
    python -m bench.score_overhead --config smollm2 --teacher qwen0.5b    (Qwen2.5-Coder-0.5B-Instruct; make fetch-qwen)
    python -m bench.score_overhead                                         (the built-in math run)

The score stage reports its overhead from inside the stage, where the background shard writer shares the two
cores with the forward and so inflates the forward's time rather than the overhead. Here the same batches
(the run's own sequences, batched as its score section says; for another teacher, their text re-encoded with its
tokenizer and chat template) go through, arms in turn (bench/timing.py: a warm-up round, then 5 rounds; medians and
spread):
  bare      the teacher's forward alone (`model(ids)`, logits for every position, to the CPU);
  scored    `stages.scoring.score_batch`: the forward, the head at response positions only a chunk at a time, top-k,
            target log-prob and tail mass.
Writing (encoding, zstd, Arrow, fsync) is timed on its own, as the background thread would do it.
Writes bench/results/score_overhead_<config>[_<teacher>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.provenance import stamp
from bench.timing import alternate
from hpd import open_run
from hpd.stages import batching, hf_models
from hpd.stages.cache_rows import score_batch
from hpd.stages.score import DEFAULT_K
from hpd.storage.logit_cache import CacheRoot, ScoredSequence, cache_key
from hpd.storage.sequences import SequenceStore

TEACHERS = {"qwen0.5b": "fetched:qwen2.5-coder-0.5b-instruct"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="run config (default: the built-in math run)")
    ap.add_argument("--teacher", choices=sorted(TEACHERS), default=None, help="another teacher on the same text")
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sequences", type=int, default=0, help="0 = all of the run's sequences")
    args = ap.parse_args()
    runner = open_run(args.config, [], home=args.home)
    cfg = runner.cfg
    runner.run(until="generate")
    teacher = runner.outputs("teacher")
    store = SequenceStore(Path(runner.outputs("generate").sequences))
    n = args.sequences or len(store)
    seq_ids, plens, seqs = store.range(0, n)
    plens = [int(p) for p in plens]
    model_dir = teacher.model_dir
    if args.teacher:  # the same prompts and replies as text, in the other teacher's tokens and template
        _, own = hf_models.load_causal_lm(model_dir)
        model_dir = hf_models.local_model(TEACHERS[args.teacher], runner.ctx.home, "--teacher")
        _, tok = hf_models.load_causal_lm(model_dir)
        pairs = [
            batching.encode_pair(
                tok, own.decode(s[:p], skip_special_tokens=True), own.decode(s[p:], skip_special_tokens=True)
            )
            for s, p in zip(seqs, plens)
        ]
        seqs, plens = [p + r for p, r in pairs], [len(p) for p, _ in pairs]
    model, tok = hf_models.load_causal_lm(model_dir, dtype=getattr(torch, teacher.dtype))
    model = hf_models.to_accelerator(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    s = cfg.score
    k = s.top_k or min(DEFAULT_K, vocab)  # the score stage's own rule (math: k = V = 18)
    batches = batching.length_batches([len(x) for x in seqs], s.batch_size, s.batch_tokens)
    tokens = int(sum(len(x) - p for x, p in zip(seqs, plens)))

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
                model, [seqs[i] for i in idx], [plens[i] for i in idx], top_k=k, temperature=s.temperature, pad_id=pad
            )
            rows.extend(ScoredSequence(seq_id=int(seq_ids[i]), input_ids=seqs[i], **o) for i, o in zip(idx, out))

    times = alternate({"bare": bare, "scored": scored}, rounds=args.rounds)
    key = cache_key(
        teacher=teacher.model_fingerprint,
        tokenizer=teacher.tokenizer_fingerprint,
        data=store.fingerprint,
        top_k=k,
        temperature=s.temperature,
        encoding=s.encoding,
    )
    writer = CacheRoot(Path(tempfile.mkdtemp(prefix="hpd-overhead-"))).writer(
        key, shard_size=len(rows), num_sequences=len(rows), vocab_size=vocab
    )
    t0 = time.perf_counter()
    writer.write_rows(0, sorted(rows, key=lambda r: r.seq_id))
    write = time.perf_counter() - t0
    fwd, sc = times["bare"]["seconds"]["median"], times["scored"]["seconds"]["median"]
    name = (args.config or "math") + (f"_{args.teacher}" if args.teacher else "")
    result = {
        "made": stamp(),
        "config": args.config or "math",
        "teacher": args.teacher or "the run's own",
        "model": str(model_dir),
        "vocab": vocab,
        "sequences": n,
        "response_tokens": tokens,
        "top_k": k,
        "batches": len(batches),
        "threads": torch.get_num_threads(),
        "arms": times,
        "bare_forward_s": fwd,
        "scored_s": sc,
        "write_s": write,
        "tokens_per_s_bare": tokens / fwd,
        "tokens_per_s_scored": tokens / sc,
        "overhead_compute": (sc - fwd) / fwd,
        "overhead_with_write": (sc + write - fwd) / fwd,
    }
    out = Path(__file__).parent / "results" / f"score_overhead_{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))


if __name__ == "__main__":
    main()
