"""Value-guided distillation on the built-in math task, measured: the task's verifier (and the teacher's own
log-prob) choosing which samples the student learns from and how much, against the same training unguided.

    python -m bench.value_guided [--seeds 5]

SeqKD from teacher samples. The default teacher samples 4 responses per training prompt at temperature 1 (about
half of them reach the right answer); students learn them by SFT (sequence-level KD, Kim & Rush) for make
distill's steps: from every sample (plain), from the best of each prompt's 4 by the verifier (best-of-4), from the
best of 4 by the teacher's mean log-prob of the response (no checker needed: read from the cache), and from every
sample the verifier accepts (rejection sampling). One generate, score and judge serve every arm: selection is
applied at training time.

Refresh rounds. Each seed's round-0 student is `make distill`'s (fkl, 600 steps on the dataset's traces); one
round of 300 steps then continues it in five arms: offline (every batch from the offline cache), refresh (half of
each batch from the student's own samples, 4 for each of a quarter of the prompts, rescored by the teacher; HPD on
them), and the same refresh guided by the verifier: selection (only the samples with the right answer), weighting
(1 + the sample's advantage over its prompt's other samples), advantage (the advantage added to HPD's per-token
teacher reward). The guided arms share the plain arm's samples and rescoring.

Every student is judged on the 500 held-out problems: greedy accuracy, avg@4 (sampled at temperature 1), held-out
NLL and KL to the teacher. The primary measure, named here before the runs: greedy accuracy (PRIMARY); the verdict
is read on it alone, each arm against its reference paired by seed with a 95% interval; the others are reported
beside it. Writes bench/results/value_guided.json; bench/readme.py puts the tables in the README.
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

PRIMARY = "accuracy"  # the measure the verdict is read on, named before the runs

OUT = Path(__file__).resolve().parent / "results" / "value_guided.json"
METRICS = ("accuracy", "avg@4", "response_nll_nats", "kl_to_teacher_nats")
VERIFIER = ['value.function="verifier"']
SEQKD = {  # arm -> settings on top of the teacher-sampled run
    "plain": [],
    "best-of-4 (verifier)": [*VERIFIER, 'value.judge="generate"', 'value.select="top"', "value.keep=0.25"],
    "best-of-4 (teacher log-prob)": [
        'value.function="teacher"',
        'value.judge="generate"',
        'value.select="top"',
        "value.keep=0.25",
    ],
    "verified only": [*VERIFIER, 'value.judge="generate"', 'value.select="threshold"', "value.threshold=1.0"],
}
SEQKD_RUN = [
    'generate.mode="teacher"',
    "generate.samples_per_prompt=4",
    "generate.max_new_tokens=52",
    'distill.method="sft"',
]
REFRESH = {  # arm -> settings of the round
    "offline": ["rounds.refresh_share=0"],
    "refresh": [],
    "refresh + selection": [*VERIFIER, 'value.select="threshold"', "value.threshold=1.0"],
    "refresh + weighting": [*VERIFIER, 'value.weighting="advantage"'],
    "refresh + advantage": [*VERIFIER, "value.advantage=1.0"],
}
ROUND = ["rounds.count=1", "rounds.steps=300", "rounds.refresh_share=0.5", "refresh.prompt_fraction=0.25"]
COMMON = ['distill.baseline=""', "eval.samples=4"]


def _run(home: Path, name: str, sets: list[str]):
    return open_run(None, [*COMMON, *sets, f'run.name="{name}"'], home=home, log=lambda s: None)


def _judged(r, arm: str, seed: int, t0: float) -> dict:
    """The student's held-out figures, and how many of the judged samples it trained on (kept of judged)."""
    student = r.outputs("eval").report["student"]
    mix = r.outputs(r.student_stages()[-1]).report["mixture"]
    source, sequences = ("refresh", "refresh-1") if r.cfg.rounds.count else ("offline", "generate")
    judged = r.outputs(sequences).count if sequences in r.stages else 0  # 0: a round without samples (offline)
    kept = mix[source].get("kept", judged) if source in mix else 0  # absent: selection kept none this round
    row = {
        "arm": arm,
        "seed": seed,
        "seconds": round(time.time() - t0, 1),
        **{k: student[k] for k in METRICS},
        "samples": {"judged": judged, "kept": kept},
    }
    print(
        f"{arm} seed {seed}: " + ", ".join(f"{k} {student[k]:.4g}" for k in METRICS) + f", kept {kept} of {judged}",
        flush=True,
    )
    return row


def seqkd(home: Path, seeds: int) -> tuple[list[dict], dict]:
    base = _run(home, "vg-seqkd", [*SEQKD_RUN, *SEQKD["best-of-4 (verifier)"]])
    base.run(until="judge")
    values = base.outputs("judge")
    teacher_sampled = {"sequences": base.outputs("generate").count, "verified_share": values.mean}
    rows, judged = [], {"verifier": "vg-seqkd"}  # value function -> a run whose judge stage the others adopt
    for seed in range(seeds):
        for arm, sets in SEQKD.items():
            r = _run(
                home,
                f"vg-seqkd-{arm.split(' ')[0]}-{'t' if 'teacher' in arm else 'v'}-s{seed}",
                [*SEQKD_RUN, *sets, f"distill.seed={seed}", f"eval.teacher={'true' if seed == 0 else 'false'}"],
            )
            r.adopt("vg-seqkd", ["data", "teacher", "generate", "score"])
            function = r.cfg.value.function
            if function in judged:
                r.adopt(judged[function], ["judge"])
            elif function:
                judged[function] = r.ctx.run_name
            t0 = time.time()
            r.run()
            rows.append(_judged(r, arm, seed, t0))
            if seed == 0 and arm == "plain":
                teacher_sampled["teacher"] = {
                    k: r.outputs("eval").report["teacher"][k]
                    for k in METRICS
                    if k in r.outputs("eval").report["teacher"]
                }
    return rows, teacher_sampled


def refresh(home: Path, seeds: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        base = f"vg-round0-s{seed}"
        _run(home, base, [f"distill.seed={seed}"]).run(until="distill")
        sampled = None
        for arm, sets in REFRESH.items():
            name = f"vg-{arm.replace(' + ', '-')}-s{seed}"
            r = _run(home, name, [*ROUND, *sets, f"distill.seed={seed}", "eval.teacher=false"])
            r.adopt(base, ["data", "teacher", "generate", "score", "distill"])
            if sampled and "refresh-1" in r.stages:
                r.adopt(sampled, ["refresh-1", "rescore-1"])  # the plain arm's samples and their rescoring
            t0 = time.time()
            r.run()
            if "refresh-1" in r.stages and sampled is None:
                sampled = name
            rows.append(_judged(r, arm, seed, t0))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"), help="shares the default teacher")
    ap.add_argument("--part", choices=("all", "seqkd", "refresh"), default="all")
    ap.add_argument("--scale", type=float, default=1.0, help="< 1: fewer steps and prompts (a smoke run)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    out = Path(args.out)
    if args.scale < 1:
        COMMON.extend(
            [
                f"distill.steps={max(2, int(600 * args.scale))}",
                f"generate.num_prompts={max(32, int(4096 * args.scale))}",
                "eval.examples=50",
            ]
        )
        ROUND[1] = f"rounds.steps={max(2, int(300 * args.scale))}"
    home = Path(args.home).resolve()
    settings = {"seeds": args.seeds, "settings": {"seqkd": SEQKD_RUN, "round": ROUND, "common": COMMON}}
    if args.part in ("all", "seqkd"):
        rows, sampled = seqkd(home, args.seeds)
        save(
            out,
            {
                **settings,
                "seqkd": {
                    "rows": rows,
                    "teacher_samples": sampled,
                    "summary": paired_summary(rows, "plain", METRICS),
                    "arms": SEQKD,
                },
            },
        )
    if args.part in ("all", "refresh"):
        rows = refresh(home, args.seeds)
        save(
            out,
            {
                **settings,
                "refresh": {"rows": rows, "summary": paired_summary(rows, "refresh", METRICS), "arms": REFRESH},
            },
        )


def save(out: Path, part: dict) -> None:
    """Merges one part's results into the results file (the parts may run as two processes at once)."""
    result = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**result, **part, "made": stamp()}, indent=1) + "\n")
    print(json.dumps({k: v["summary"] for k, v in part.items() if isinstance(v, dict) and "summary" in v}, indent=1))


if __name__ == "__main__":
    main()
