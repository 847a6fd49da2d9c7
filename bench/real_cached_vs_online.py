"""Training from the cache against the teacher online, with the real teacher (`--config smollm2`: SmolLM2-135M-
Instruct) and its layer-kept 49.5M student: response tokens/s and training memory, and plain SFT of the same
student for the loss's own cost at a 49k vocabulary. With `--config qwen-coder` the same for the same-family pair
(Qwen2.5-Coder-1.5B-Instruct online beside its 0.5B student, against the 0.5B from the cache), each arm's process
capped a little under this machine's memory: an arm that outgrows the cap is recorded as not fitting.

    python -m bench.real_cached_vs_online     (after `hpd run --config smollm2 --until score`)
    python -m bench.real_cached_vs_online --config qwen-coder --steps 3 --memory-cap-gb 22

Each arm is `hpd run distill` in a process of its own on the run's own sequences and cache (the same data order,
student and schedule), the arms alternating, a warm-up round discarded, then at least 5 rounds; medians and spread.
The bound on the speed-up is the online step over a plain SFT step of the same student (a cached step costs at least
that); the teacher's forward per batch is timed too, in this process on the first training batches. Writes
bench/results/real_cached_vs_online.json (real_cached_vs_online_<config>.json for another config).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import psutil
import torch

from bench.provenance import stamp
from hpd import open_run
from hpd.stages import batching, hf_models
from hpd.storage.sequences import SequenceStore

from .measure import DoesNotFit, in_own_process

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    "cached": ['distill.teacher_source="cache"'],
    "online": ['distill.teacher_source="online"'],
    "sft": ['distill.method="sft"'],
}
SHARED = ["data", "teacher", "generate", "score"]


def timed(config: str, overrides: list[str], home: Path, shared: str, arm: str, steps: int, cap_mb) -> dict:
    """One arm's `hpd run distill` in a process of its own, on the shared run's sequences and cache."""
    name = f"bench-cvo-{arm}"
    sets = [
        *overrides,
        *ARMS[arm],
        f"distill.steps={steps}",
        "distill.checkpoint_steps=100000",
        'distill.baseline=""',
        "distill.eval_examples=4",
    ]
    sets.append(f'run.name="{name}"')
    r = open_run(config, sets, home=home, log=lambda s: None)
    shutil.rmtree(home / "runs" / name, ignore_errors=True)
    r.adopt(shared, [s for s in SHARED if s in r.stages])
    t0 = time.time()
    try:
        fig = in_own_process("distill", config, sets, home, memory_cap_mb=cap_mb)
    except DoesNotFit as e:
        return {"arm": arm, "fits": False, "wall_s": time.time() - t0, "peak_rss_mb": e.peak_rss_mb}
    wall = time.time() - t0
    log = json.loads((Path(r.outputs("distill").student_dir) / "training_log.json").read_text())
    rates = [e["tokens_per_s"] for e in log if "tokens_per_s" in e][1:]  # the first interval holds start-up
    return {
        "arm": arm,
        "fits": True,
        "wall_s": wall,
        "train_seconds": fig["train_seconds"],
        "seconds_per_step": fig["train_seconds"] / steps,
        "response_tokens_per_s": statistics.median(rates),
        "training_memory_mb": fig["peak_rss_mb"] - fig["rss_start_mb"],
        "peak_rss_mb": fig["peak_rss_mb"],
    }


def teacher_forward_per_batch(base, batches: int = 4) -> float:
    """Seconds of the teacher's forward on the first training batches (the online arm's extra work per step)."""
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
    ap.add_argument("--config", default="smollm2", help="the run whose teacher, student and cache are measured")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every arm")
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per arm (at least 5), after a warm-up round")
    ap.add_argument("--arms", default=",".join(ARMS), help="of cached, online, sft (the bound needs all three)")
    ap.add_argument("--memory-cap-gb", type=float, default=None, help="an arm past this resident memory does not fit")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats: at least 5 runs per arm (these machines are noisy)")
    arms = args.arms.split(",")
    if not {"cached", "online"} <= set(arms) or not set(arms) <= set(ARMS):
        ap.error(f"--arms: cached and online, and optionally sft (got {args.arms!r})")
    home = Path(args.home).resolve()
    config, cap = args.config, args.memory_cap_gb and args.memory_cap_gb * 1024
    base = open_run(config, args.sets, home=home, log=lambda s: None)
    base.run(until="score")
    runs, warmup, unfit = [], [], {}
    for rep in range(-1, args.repeats):  # round -1: the warm-up (file caches, imports), discarded
        order = arms if rep % 2 == 0 else arms[::-1]
        for arm in (a for a in order if a not in unfit):  # an arm that did not fit once is not tried again
            row = {**timed(config, args.sets, home, base.cfg.run.name, arm, args.steps, cap), "repeat": rep}
            if not row["fits"]:
                unfit[arm] = row
            (warmup if rep < 0 else runs).append(row)
            print(("warm-up " if rep < 0 else "") + str(row), flush=True)
    figures = ("seconds_per_step", "response_tokens_per_s", "training_memory_mb", "peak_rss_mb")
    fit = [a for a in arms if a not in unfit]
    med = {arm: {k: statistics.median(r[k] for r in runs if r["arm"] == arm) for k in figures} for arm in fit}
    spread = {
        arm: {
            k: [min(r[k] for r in runs if r["arm"] == arm), max(r[k] for r in runs if r["arm"] == arm)] for k in figures
        }
        for arm in fit
    }
    result = {
        "made": stamp(),
        "config": config,
        "overrides": args.sets,
        "method": base.cfg.distill.method,
        "steps": args.steps,
        "repeats": args.repeats,
        "memory_cap_mb": cap,
        "machine_memory_mb": psutil.virtual_memory().total / 2**20,
        "runs": runs,
        "warmup": warmup,
        "median": med,
        "spread": spread,
        "does_not_fit": {arm: row["peak_rss_mb"] for arm, row in unfit.items()},
        "teacher_forward_s_per_batch": teacher_forward_per_batch(base),
    }
    if "online" in med:
        result["speedup"] = med["cached"]["response_tokens_per_s"] / med["online"]["response_tokens_per_s"]
        result["memory_ratio"] = med["cached"]["training_memory_mb"] / med["online"]["training_memory_mb"]
        if "sft" in med:  # the most a cache can give: a cached step costs at least a plain SFT step of the student
            result["speedup_bound"] = med["online"]["seconds_per_step"] / med["sft"]["seconds_per_step"]
            result["share_of_bound"] = result["speedup"] / result["speedup_bound"]
    if "sft" in med:
        rates = {arm: med[arm]["response_tokens_per_s"] for arm in med}
        result["loss_overhead_vs_sft"] = rates["sft"] / rates["cached"] - 1
    out = RESULTS / ("real_cached_vs_online.json" if config == "smollm2" else f"real_cached_vs_online_{config}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
