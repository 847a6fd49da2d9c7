"""Several teachers on the built-in math task, measured: routing two specialists into one student, and an
ensemble of two teachers' targets, each against single-teacher students, paired by student seed.

    python -m bench.multi_teacher [--seeds 5] [--steps 600]

Routing. Two specialists with one tokenizer: `add2` learned sums of 2 numbers, `add4` sums of 4 (3 digits
each). A generalist `mix` learned both kinds (each problem 2 or 4 numbers) for the specialists' two training
budgets together, so the three teachers cost the same in all. Students, all the same shape, steps and method, each
judged on the generalist's held-out set (both skills): from add2 alone, from add4 alone, from both routed
(`teachers.runs`, half of each batch from each specialist's sequences and cache), and from the generalist.

Ensemble. Two teachers of the default task on the same sequences: the default one and a wider, longer-trained one
(`teachers.mode = "ensemble"`: the targets are their equal mixture). Students from each alone and from the
ensemble, judged on the default held-out set.

The verdicts are read on held-out accuracy (PRIMARY, named before the runs: the task's skill), each arm minus its
comparison paired by student seed with a 95% interval; held-out NLL is reported beside it.

Writes bench/results/multi_teacher.json; bench/readme.py puts the tables in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.provenance import stamp
from hpd import open_run

from .measure import paired_summary

OUT = Path(__file__).resolve().parent / "results" / "multi_teacher.json"
PRIMARY = "accuracy"  # the measure the verdicts are read on, named before the runs
TEACHERS = {  # run name -> settings; every teacher run stops at its cache
    "mt-add2": ["data.operands=2"],
    "mt-add4": ["data.operands=4"],
    "mt-mix": ['data.operand_mix="2,4"', "teacher.steps=700"],  # both budgets (2 x 350 steps)
    "mt-t1": [],  # the default teacher
    "mt-t2": ["teacher.n_embd=192", "teacher.n_head=4", "teacher.steps=500"],  # wider and longer trained
}
ROUTING = {  # arm -> (the run whose teacher and data the student starts from, extra settings)
    "add2 alone": ("mt-add2", []),
    "add4 alone": ("mt-add4", []),
    "add2 + add4 routed": ("mt-add2", ['teachers.runs="mt-add4:1"', "teachers.weight=1"]),
    "generalist": ("mt-mix", []),
}
ENSEMBLE = {
    "teacher 1 alone": ("mt-t1", []),
    "teacher 2 alone": ("mt-t2", []),
    "ensemble of 1 and 2": ("mt-t1", ['teachers.runs="mt-t2:1"', 'teachers.mode="ensemble"']),
}
METRICS = ("accuracy", "response_nll_nats")


def _run(home: Path, name: str, sets: list[str]):
    return open_run(None, [*sets, f'run.name="{name}"'], home=home, log=lambda s: None)


def arm_runs(home: Path, arms: dict, seeds: int, common: list[str], heldout: str) -> list[dict]:
    rows = []
    for seed in range(seeds):
        for arm, (base, extra) in arms.items():
            name = f"{base}-{arm.replace(' ', '-').replace('+', 'and')}-s{seed}"
            r = _run(
                home,
                name,
                [
                    *TEACHERS[base],
                    *common,
                    *extra,
                    f"distill.seed={seed}",
                    f'eval.heldout="{heldout}"',
                    f"eval.teacher={'true' if seed == 0 else 'false'}",
                ],
            )
            r.adopt(base, ["data", "teacher", "generate", "score"])
            t0 = time.time()
            r.run()
            student = r.outputs("eval").report["student"]
            rows.append(
                {"arm": arm, "seed": seed, "seconds": round(time.time() - t0, 1), **{k: student[k] for k in METRICS}}
            )
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {student[k]:.4g}" for k in METRICS), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600, help="student steps, every arm (make distill's 600)")
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    args = ap.parse_args()
    home = Path(args.home).resolve()
    common = [f"distill.steps={args.steps}", 'distill.baseline=""', "eval.samples=1"]
    teachers = {}
    for name, sets in TEACHERS.items():  # each teacher once, into its own cache
        r = _run(home, name, [*sets, *common])
        t0 = time.time()
        r.run(until="score")
        teachers[name] = {"seconds": round(time.time() - t0, 1), "settings": sets}
        print(f"teacher {name} ready", flush=True)
    mixed_heldout = _run(home, "mt-mix", TEACHERS["mt-mix"]).outputs("data").heldout
    default_heldout = _run(home, "mt-t1", []).outputs("data").heldout
    routing = arm_runs(home, ROUTING, args.seeds, common, mixed_heldout)
    ensemble = arm_runs(home, ENSEMBLE, args.seeds, common, default_heldout)
    # the teachers themselves on the held-out sets their students are judged on
    judged = {}
    for arm, rows, base in (("routing", routing, ROUTING), ("ensemble", ensemble, ENSEMBLE)):
        for label, (run, extra) in base.items():
            if extra:
                continue
            name = f"{run}-{label.replace(' ', '-').replace('+', 'and')}-s0"
            judged.setdefault(arm, {})[run] = {
                k: _run(home, name, []).outputs("eval").report["teacher"][k] for k in METRICS
            }
    result = {
        "made": stamp(),
        "seeds": args.seeds,
        "primary": PRIMARY,
        "student_steps": args.steps,
        "teachers": teachers,
        "teacher_judged": judged,
        "routing": {"rows": routing, "summary": paired_summary(routing, "generalist", METRICS)},
        "ensemble": {"rows": ensemble, "summary": paired_summary(ensemble, "teacher 1 alone", METRICS)},
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k]["summary"] for k in ("routing", "ensemble")}, indent=1))


if __name__ == "__main__":
    main()
