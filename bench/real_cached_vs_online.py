"""Training from the cache against the teacher online, with the real teacher (`--config smollm2`: SmolLM2-135M-
Instruct) and its layer-kept 49.5M student: response tokens/s and training memory, and plain SFT of the same
student for the loss's own cost at a 49k vocabulary.

    python -m bench.real_cached_vs_online     (after `hpd run --config smollm2 --until score`)

Each arm is `hpd run distill` in a process of its own on the run's own sequences and cache (the same data order,
student and schedule), the arms alternating, a warm-up round discarded, then at least 5 rounds; medians and spread.
The bound on the speed-up is the online step over a plain SFT step of the same student (a cached step costs at least
that); the teacher's forward per batch is timed too, in this process on the first training batches. Writes
bench/results/real_cached_vs_online.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.provenance import stamp
from hpd import open_run
from hpd.stages import batching, hf_models
from hpd.storage.sequences import SequenceStore

from .measure import in_own_process

OUT = Path(__file__).resolve().parent / "results" / "real_cached_vs_online.json"
ARMS = {
    "cached": ['distill.teacher_source="cache"'],
    "online": ['distill.teacher_source="online"'],
    "sft": ['distill.method="sft"'],
}
SHARED = ["data", "teacher", "generate", "score"]


def runner(home: Path, name: str, sets: list[str]):
    return open_run("smollm2", [*sets, f'run.name="{name}"'], home=home, log=lambda s: None)


def timed(home: Path, arm: str, steps: int) -> dict:
    name = f"bench-cvo-{arm}"
    sets = [
        *ARMS[arm],
        f"distill.steps={steps}",
        "distill.checkpoint_steps=100000",
        'distill.baseline=""',
        "distill.eval_examples=4",
    ]
    r = runner(home, name, sets)
    shutil.rmtree(home / "runs" / name, ignore_errors=True)
    r.adopt("smollm2", [s for s in SHARED if s in r.stages])
    t0 = time.time()
    fig = in_own_process("distill", "smollm2", [*sets, f'run.name="{name}"'], home)
    wall = time.time() - t0
    log = json.loads((Path(r.outputs("distill").student_dir) / "training_log.json").read_text())
    rates = [e["tokens_per_s"] for e in log if "tokens_per_s" in e][1:]  # the first interval holds start-up
    return {
        "arm": arm,
        "wall_s": wall,
        "train_seconds": fig["train_seconds"],
        "seconds_per_step": fig["train_seconds"] / steps,
        "response_tokens_per_s": statistics.median(rates),
        "training_memory_mb": fig["peak_rss_mb"] - fig["rss_start_mb"],
        "peak_rss_mb": fig["peak_rss_mb"],
    }


def teacher_forward_per_batch(home: Path, batches: int = 4) -> float:
    """Seconds of the teacher's forward on the first training batches (the online arm's extra work per step)."""
    base = runner(home, "smollm2", [])
    cfg = base.cfg.distill
    store = SequenceStore(Path(base.outputs("generate").sequences))
    model, tok = hf_models.load_teacher(base.outputs("teacher"))
    _, _, seqs = store.range(0, min(len(store), batches * cfg.batch_size))
    times = []
    with torch.no_grad():
        for i in range(0, len(seqs), cfg.batch_size):
            ids, mask = batching.pad_right(seqs[i : i + cfg.batch_size], tok.pad_token_id)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per arm (at least 5), after a warm-up round")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats: at least 5 runs per arm (these machines are noisy)")
    home = Path(args.home).resolve()
    runner(home, "smollm2", []).run(until="score")
    runs, warmup = [], []
    for rep in range(-1, args.repeats):  # round -1: the warm-up (file caches, imports), discarded
        order = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            (warmup if rep < 0 else runs).append({**timed(home, arm, args.steps), "repeat": rep})
            print(("warm-up " if rep < 0 else "") + str((warmup if rep < 0 else runs)[-1]), flush=True)
    figures = ("seconds_per_step", "response_tokens_per_s", "training_memory_mb", "peak_rss_mb")
    med = {arm: {k: statistics.median(r[k] for r in runs if r["arm"] == arm) for k in figures} for arm in ARMS}
    spread = {
        arm: {
            k: [min(r[k] for r in runs if r["arm"] == arm), max(r[k] for r in runs if r["arm"] == arm)] for k in figures
        }
        for arm in ARMS
    }
    forward = teacher_forward_per_batch(home)
    # the most a cache can give: a cached step costs at least a plain SFT step of the same student
    bound = med["online"]["seconds_per_step"] / med["sft"]["seconds_per_step"]
    speedup = med["cached"]["response_tokens_per_s"] / med["online"]["response_tokens_per_s"]
    result = {
        "made": stamp(),
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": runs,
        "warmup": warmup,
        "median": med,
        "spread": spread,
        "teacher_forward_s_per_batch": forward,
        "speedup": speedup,
        "speedup_bound": bound,
        "share_of_bound": speedup / bound,
        "memory_ratio": med["cached"]["training_memory_mb"] / med["online"]["training_memory_mb"],
        "loss_overhead_vs_sft": med["sft"]["response_tokens_per_s"] / med["cached"]["response_tokens_per_s"] - 1,
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
