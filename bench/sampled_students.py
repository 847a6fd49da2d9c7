"""Students trained from top-k and from sampled-target caches of matched bytes, on the dialogue teacher.

bench/sampled_targets.py measures each encoding's bytes per token and gradient fidelity; this bench trains students
from real caches of the encodings it compares, everything else equal: the dialogue preset's sequences and teacher,
fkl (the loss whose gradient sampled targets estimate without bias), `--steps` steps, the same student seeds (paired
by seed; the verdict is read on KL to the teacher, PRIMARY, named before the runs). Arms: top-16 (compact), top-64
(compact), and two sampled-target encodings chosen by their bytes per token in bench/results/sampled_targets.json
(same teacher): the one nearest top-16 compact's bytes, and the one with the best fkl gradient within the bytes of
a top-16 cache in the default encoding. Each is judged on the held-out conversations: NLL of the reference
responses and KL to the teacher.

    python -m bench.sampled_students [--seeds 5] [--steps 300]
    python -m bench.sampled_students --config smollm2 --steps 48 --sampled sampled-counts:16
                        the real teacher: the preset's layer-kept student, top-16 against the named sampled
                        encodings (arms chosen by hand: each run costs minutes on a CPU), held-out
                        generations cut to 8 tokens (only NLL and KL are reported)

Writes bench/results/sampled_students[_smollm2].json; bench/readme.py puts the tables in the README.
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

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("response_nll_nats", "kl_to_teacher_nats")
REFERENCE = "top-16 compact"
# The measure the verdict is read on, named before the runs: what fkl minimises and what a cache's targets bound.
PRIMARY = "kl_to_teacher_nats"


def arms(gradients: dict) -> dict[str, list[str]]:
    """Arm -> score settings: top-16 and top-64 compact, and two sampled arms: the one nearest top-16 compact's bytes
    (from below if any is), and the one with the best fkl gradient within top-16's bytes in the default encoding
    (idsort-q8), the budget a cache had before compact."""
    out = {
        REFERENCE: ["score.top_k=16", 'score.encoding="compact"'],
        "top-64 compact": ["score.top_k=64", 'score.encoding="compact"'],
    }
    sampled = {a: g for a, g in gradients.items() if g["encoding"].startswith("sampled") and "iid" not in a}
    budget = gradients[REFERENCE]["bytes_per_token"]
    below = {a: g for a, g in sampled.items() if g["bytes_per_token"] <= budget}
    nearest = (
        max(below, key=lambda a: below[a]["bytes_per_token"])
        if below
        else min(sampled, key=lambda a: sampled[a]["bytes_per_token"])
    )
    old = {a: g for a, g in sampled.items() if g["bytes_per_token"] <= gradients["top-16 idsort-q8"]["bytes_per_token"]}
    best = max(old, key=lambda a: old[a]["fkl"]["cosine_mean"], default=None)
    for a in dict.fromkeys(x for x in (nearest, best) if x):
        out[a] = [f'score.encoding="{sampled[a]["encoding"]}"']
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"), help="shares the dialogue teacher")
    ap.add_argument("--config", choices=("dialogue", "smollm2"), default="dialogue")
    ap.add_argument(
        "--sampled",
        default="",
        help="comma-separated sampled encodings to compare with top-16 "
        "(default: chosen from the gradient bench's bytes, dialogue only)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    home = Path(args.home).resolve()
    real = args.config == "smollm2"
    if args.sampled:
        settings = {
            REFERENCE: ["score.top_k=16", 'score.encoding="compact"'],
            **{e: [f'score.encoding="{e}"'] for e in args.sampled.split(",")},
        }
    else:
        settings = arms(json.loads((RESULTS / "sampled_targets.json").read_text())["arms"])
    short = ["eval.max_new_tokens=8"] if real else []  # NLL and KL need no generation; the real teacher's is slow
    out = Path(args.out or RESULTS / ("sampled_students_smollm2.json" if real else "sampled_students.json"))
    common = ["--config", args.config]
    base = open_run(args.config, [], home=home, log=lambda s: None)
    base.run(until="generate")
    rows, caches = [], {}
    for seed in range(args.seeds):
        for arm, sets in settings.items():
            name = f"ss{'-real' if real else ''}-{arm.replace(' ', '').replace('+', 'p').replace(':', '')}-s{seed}"
            r = open_run(
                args.config,
                [
                    *sets,
                    *short,
                    'distill.method="fkl"',
                    f"distill.steps={args.steps}",
                    f"distill.seed={seed}",
                    'distill.baseline=""',
                    f"eval.teacher={'true' if seed == 0 else 'false'}",
                    f'run.name="{name}"',
                ],
                home=home,
                log=lambda s: None,
            )
            r.adopt(args.config, ["data", "teacher", "generate"])
            t0 = time.time()
            r.run()
            cache = r.outputs("score")
            caches[arm] = {
                "encoding": sets[-1].split("=", 1)[1].strip('"'),
                "bytes_per_token": cache.bytes_per_token,
                "tokens": cache.tokens,
            }
            student = r.outputs("eval").report["student"]
            rows.append(
                {"arm": arm, "seed": seed, "seconds": round(time.time() - t0, 1), **{k: student[k] for k in METRICS}}
            )
            print(
                f"{arm} seed {seed}: "
                + ", ".join(f"{k} {student[k]:.4f}" for k in METRICS)
                + f" ({cache.bytes_per_token:.1f} B/token)",
                flush=True,
            )
            if seed == 0 and arm == REFERENCE:
                teacher = {k: r.outputs("eval").report["teacher"].get(k) for k in METRICS}
    result = {
        "made": stamp(),
        "seeds": args.seeds,
        "steps": args.steps,
        "method": "fkl",
        "primary": PRIMARY,
        "config": common[1],
        "arms": settings,
        "caches": caches,
        "rows": rows,
        "teacher": teacher,
        "summary": paired_summary(rows, REFERENCE, METRICS),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
