"""Benchmark of the embedded default: what `make distill` does and prints, and how reliably its student learns.

    python -m bench.default_task [--seeds 5]

1. `hpd run` on the default config in a fresh home, in a process of its own, exactly as `make distill` runs
   it (install excluded): wall time, every stage's seconds and the table it prints; then a second `hpd run`
   that finds everything up to date.
2. The same run for student seeds 1..N-1 (`distill.seed`), each adopting the first run's data, teacher and
   cache: the distilled student and its SFT baseline (same sequences, steps and seed) judged by eval.
   Seed 0 is the run of step 1 itself.

Writes bench/results/default_task.json; bench/readme.py puts its tables in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.provenance import stamp
from hpd import open_run

OUT = Path(__file__).resolve().parent / "results" / "default_task.json"
HPD = [sys.executable, "-m", "hpd.pipeline.cli"]
SHARED = ["data", "teacher", "generate", "score"]
METRICS = ("accuracy", "avg@4", "response_nll_nats", "kl_to_teacher_nats")


def hpd_run(home: Path) -> tuple[float, str]:
    t0 = time.time()
    p = subprocess.run(
        [*HPD, "run"], env={**os.environ, "HPD_HOME": str(home)}, capture_output=True, text=True, check=True
    )
    return time.time() - t0, p.stdout


def spread(xs: list[float]) -> dict:
    return {
        "mean": statistics.mean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "values": xs,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5, help="student seeds (seed 0 is make distill's)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="hpd-bench-"))
    cold, printed = hpd_run(home)
    warm, _ = hpd_run(home)
    base = open_run(None, [], home=home)
    cfg = base.cfg
    stage_seconds = {s: base.manifest(s)["seconds"] for s in base.order}
    runs = [base.outputs("eval").report]
    for seed in range(1, args.seeds):
        name = f"bench-s{seed}"
        r = open_run(
            None, [f"distill.seed={seed}", f'run.name="{name}"', "eval.teacher=false"], home=home, log=lambda s: None
        )
        r.adopt(cfg.run.name, SHARED)
        t0 = time.time()
        r.run()
        print(f"seed {seed}: {time.time() - t0:.0f}s")
        runs.append(r.outputs("eval").report)
    teacher = runs[0]["teacher"]
    arms = {arm: {k: spread([run[arm][k] for run in runs]) for k in METRICS} for arm in ("student", "baseline")}
    paired = {k: spread([run["student"][k] - run["baseline"][k] for run in runs]) for k in METRICS}
    score = base.outputs("score")
    result = {
        "machine": {"cpus": os.cpu_count()},
        "made": stamp(),
        "config": cfg.as_dict(),
        "seeds": args.seeds,
        "make_distill_seconds": round(cold, 1),
        "up_to_date_seconds": round(warm, 1),
        "stage_seconds": stage_seconds,
        "printed": printed[printed.index("\nmodel") :].strip() if "\nmodel" in printed else printed,
        "teacher": teacher,
        "sizes": {
            "teacher": teacher["parameters"],
            "student": runs[0]["student"]["parameters"],
            "ratio": teacher["parameters"] / runs[0]["student"]["parameters"],
        },
        "method": runs[0]["student_report"]["method"],
        "baseline": runs[0]["baseline_report"]["method"],
        "arms": arms,
        "paired_student_minus_baseline": paired,
        "student_over_teacher_accuracy_min": arms["student"]["accuracy"]["min"] / teacher["accuracy"],
        "seeds_above_80pct_of_teacher": {
            arm: sum(run[arm]["accuracy"] >= 0.8 * teacher["accuracy"] for run in runs)
            for arm in ("student", "baseline")
        },
        "cache": {k: getattr(score, k) for k in ("top_k", "sequences", "tokens", "bytes", "bytes_per_token")},
        "runs": [{arm: run[arm] for arm in ("student", "baseline")} for run in runs],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(result["printed"])
    a = arms["student"]["accuracy"]
    print(
        f"make distill {cold:.0f}s (stages {stage_seconds}); {args.seeds} seeds: {result['method']} accuracy "
        f"min {a['min']:.1%} mean {a['mean']:.1%} max {a['max']:.1%}; teacher {teacher['accuracy']:.1%}; "
        f"baseline mean {arms['baseline']['accuracy']['mean']:.1%}"
    )
    shutil.rmtree(home, ignore_errors=True)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
