"""Teacher sampling speed: new tokens per second for the ways hpd can batch `model.generate`, against a plain
generate loop, on the real teacher and its own prompts.

    python -m bench.sampling_speed [--prompts 32 --sizes 8,32]      (after `make smollm2-teacher`)

SmolLM2-135M-Instruct (fp32) continues the first `--prompts` chat prompts of --config smollm2 (chat questions,
arithmetic, HumanEval: lengths from tens to hundreds of tokens) by 64 new tokens at temperature 1, as the preset's
generate stage does. Arms:
  plain loop        `model.generate` on batches of 32 in the prompts' own order (what a user writes first);
  token budget      hpd's sampling with the preset's budget before this bench: longest first, (prompt + 64) x
                    count <= 6144;
  sorted, batch N   prompts sorted by length, N at a time (little padding, full batches);
  sorted + static   the same with a static KV cache (`cache_implementation="static"`);
  ..., bf16         the largest sorted batch, with and without the static cache, the teacher in bf16 (what
                    teacher.dtype "auto" now picks here);
  + compiled        (--compiled) and the decoding step compiled (torch.compile, inductor on the CPU), at the
                    largest batch; the warm-up round's seconds (compiling included) are kept beside the timed ones.
bench/timing.py: a warm-up round, then 5 rounds of the arms in turn; medians and spread. Every arm draws from the same
seed; tokens/s counts the new tokens each arm made (up to each reply's end-of-text). Writes
bench/results/sampling_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench.provenance import stamp
from bench.timing import alternate, summary
from hpd import open_run
from hpd.stages import batching, hf_models, sampling

RESULTS = Path(__file__).resolve().parent / "results"
NEW = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--sizes", default="8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="also the compiled arm (its warm-up compiles)")
    args = ap.parse_args()
    run = open_run("smollm2", [], home=args.home, log=lambda s: None)
    run.run(until="teacher")
    teacher, data = run.outputs("teacher"), run.outputs("data")
    model, tok = hf_models.load_causal_lm(teacher.model_dir)  # fp32: what every arm but the last runs in
    model_bf16 = hf_models.load_causal_lm(teacher.model_dir, dtype=torch.bfloat16)[0]
    rows = [json.loads(line) for line in open(data.train)][: args.prompts]
    prompts = [batching.encode_pair(tok, r["prompt"], None)[0] for r in rows]
    made: dict[str, int] = {}

    def arm(name, m=model, **kw):
        def go():
            torch.manual_seed(0)
            out = sampling.sample(m, tok, prompts, max_new_tokens=NEW, temperature=1.0, desc=name, **kw)
            made[name] = sum(len(o) for o in out)

        return go

    def plain():
        torch.manual_seed(0)
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        total = 0
        with torch.no_grad():
            for lo in range(0, len(prompts), 32):
                ids, mask = batching.pad_left(prompts[lo : lo + 32], pad)
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=NEW,
                    do_sample=True,
                    temperature=1.0,
                    top_k=None,
                    top_p=None,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
                total += sum(row.index(eos) + 1 if eos in row else len(row) for row in gen[:, ids.shape[1] :].tolist())
        made["plain loop, batch 32"] = total

    arms = {
        "plain loop, batch 32": plain,
        "token budget 6144": arm("token budget 6144", batch_size=32, batch_tokens=6144),
    }
    for n in map(int, args.sizes.split(",")):
        arms[f"sorted, batch {n}"] = arm(f"sorted, batch {n}", batch_size=n, sort=True)
        arms[f"sorted + static cache, batch {n}"] = arm(
            f"sorted + static cache, batch {n}", batch_size=n, sort=True, static_cache=True
        )
    top = max(map(int, args.sizes.split(",")))
    arms[f"sorted, batch {top}, bf16"] = arm(f"sorted, batch {top}, bf16", model_bf16, batch_size=top, sort=True)
    arms[f"sorted + static cache, batch {top}, bf16"] = arm(
        f"sorted + static cache, batch {top}, bf16", model_bf16, batch_size=top, sort=True, static_cache=True
    )
    if args.compiled:
        arms[f"sorted + static + compiled, batch {top}"] = arm(
            f"sorted + static + compiled, batch {top}", batch_size=top, sort=True, compiled=True
        )
    results = alternate(arms, rounds=args.rounds)
    for name, r in results.items():
        r["new_tokens"] = made[name]
        r["tokens_per_s"] = summary([made[name] / s for s in r["seconds"]["runs"]])  # the fastest run is the max
    out = {
        "made": stamp(),
        "model": teacher.model_dir,
        "prompts": len(prompts),
        "new_tokens_max": NEW,
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "threads": torch.get_num_threads(),
        "arms": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sampling_speed.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:36s} {r['tokens_per_s']['median']:7.1f} new tokens/s")


if __name__ == "__main__":
    main()
