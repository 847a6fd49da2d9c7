"""On-policy refresh rounds against the same student steps spent on more offline epochs (default math task).

For each student seed, one offline HPD student (round 0, `make distill`'s) is trained once and then continued
for R rounds in three arms that differ only in the rounds' data and loss:
  - offline:      every batch from the offline cache (HPD), i.e. more offline epochs;
  - hpd+refresh:  10% of each batch from the round's refreshed sequences, HPD on both;
  - hpd->opd:     the same refresh, OPD on the refreshed sequences and HPD on the offline ones (--config hpd-opd).
Every round of every arm has the same steps, batch and schedule. Held-out accuracy (greedy, 500 problems) and
NLL are measured after each round; the verdict is read on held-out accuracy after the last round (PRIMARY, named
before the runs), each arm minus offline paired by seed. The teacher time the refreshes cost is compared with what
online distillation would spend: one teacher forward per training batch, measured here on batches of the same size.

Writes bench/results/refresh_rounds.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.provenance import stamp
from hpd import open_run

RESULTS = Path(__file__).parent / "results"
PRIMARY = "heldout_accuracy"  # the measure the verdict is read on, named before the runs
ARMS = {
    "offline": ["rounds.refresh_share=0"],
    "hpd+refresh": ['rounds.method="hpd"'],
    "hpd->opd": [],
}


def runner(home: Path, name: str, overrides: list[str]):
    return open_run("hpd-opd", [*overrides, f'run.name="{name}"'], home=home, log=lambda s: None)


def teacher_seconds_per_batch(r, batch: int, batches: int = 12) -> float:
    """One teacher forward (full-vocabulary log-probs) on a training batch: what online distillation pays per step."""
    import torch

    from hpd.stages import hf_models
    from hpd.storage.sequences import SequenceStore

    model, tok = hf_models.load_causal_lm(r.outputs("teacher").model_dir)
    store = SequenceStore(Path(r.outputs("generate").sequences))
    _, _, seqs = store.range(0, batch * (batches + 1))
    hf_models.log_probs(model, seqs[:batch], tok.pad_token_id)  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(1, batches + 1):
            hf_models.log_probs(model, seqs[i * batch : (i + 1) * batch], tok.pad_token_id)
    return (time.perf_counter() - t0) / batches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"), help="shares the default teacher and cache")
    args = ap.parse_args()
    home = Path(args.home).resolve()
    # the setting this bench was designed and published with (the defaults before make distill's re-tuning)
    common = [
        f"rounds.count={args.rounds}",
        'distill.method="hpd"',
        "distill.steps=350",
        "distill.learning_rate=2e-3",
        "generate.num_prompts=20000",
        'distill.baseline=""',
    ]
    runs = []
    for seed in range(args.seeds):
        base = f"bench-refresh-s{seed}"
        r0 = runner(home, base, [*common, "rounds.count=0", f"distill.seed={seed}"])
        r0.run()
        for arm, overrides in ARMS.items():
            name = f"{base}-{arm.replace('>', '').replace('+', '-')}"
            shutil.rmtree(home / "runs" / name, ignore_errors=True)
            r = runner(home, name, [*common, *overrides, f"distill.seed={seed}"])
            r.adopt(base, ["data", "teacher", "generate", "score", "distill"])  # one round-0 student per seed
            t0 = time.time()
            r.run()
            m = {s: r.manifest(s) for s in r.order}  # for each stage's seconds
            rounds = []
            for i, stage in enumerate(r.student_stages()):
                d, rep = m[stage], r.outputs(stage).report
                rounds.append(
                    {
                        "round": i,
                        "student_steps": rep["student_steps"],
                        "heldout_accuracy": rep["heldout_accuracy"],
                        "nll": rep["response_nll_nats"],
                        "distill_seconds": d["seconds"],
                        "refresh_seconds": (m.get(f"refresh-{i}") or {}).get("seconds", 0.0),
                        "rescore_seconds": (m.get(f"rescore-{i}") or {}).get("seconds", 0.0),
                        "refreshed_sequences": r.outputs(f"refresh-{i}").count if f"refresh-{i}" in m else 0,
                    }
                )
            runs.append({"seed": seed, "arm": arm, "rounds": rounds, "wall_seconds": round(time.time() - t0, 1)})
            print(
                f"seed {seed} {arm:<12} "
                + "  ".join(f"r{x['round']} {x['heldout_accuracy']:.1%}/{x['nll']:.3f}" for x in rounds),
                flush=True,
            )
    cfg = runner(home, "bench-refresh-s0", common).cfg
    t_batch = teacher_seconds_per_batch(runner(home, "bench-refresh-s0", common), cfg.distill.batch_size)
    total_steps = cfg.distill.steps + args.rounds * cfg.rounds.steps
    online = total_steps * t_batch
    refresh_runs = [x for x in runs if x["arm"] != "offline"]
    rescore = statistics.mean(sum(r["rescore_seconds"] for r in x["rounds"]) for x in refresh_runs)
    sampling = statistics.mean(sum(r["refresh_seconds"] for r in x["rounds"]) for x in refresh_runs)
    refreshed = statistics.mean(sum(r["refreshed_sequences"] for r in x["rounds"]) for x in refresh_runs)
    summary = {}
    for arm in ARMS:
        per_round = []
        for i in range(args.rounds + 1):
            accs = [x["rounds"][i]["heldout_accuracy"] for x in runs if x["arm"] == arm]
            nlls = [x["rounds"][i]["nll"] for x in runs if x["arm"] == arm]
            per_round.append(
                {
                    "round": i,
                    "student_steps": runs[0]["rounds"][i]["student_steps"],
                    "accuracy_mean": statistics.mean(accs),
                    "accuracy_std": _std(accs),
                    "nll_mean": statistics.mean(nlls),
                    "nll_std": _std(nlls),
                    "accuracy": accs,
                }
            )
        arm_runs = [x for x in runs if x["arm"] == arm]
        summary[arm] = {
            "per_round": per_round,
            "round_seconds": statistics.mean(
                sum(r["distill_seconds"] + r["refresh_seconds"] + r["rescore_seconds"] for r in x["rounds"][1:])
                for x in arm_runs
            ),
        }
    result = {
        "machine": {"cpus": os.cpu_count()},
        "made": stamp(),
        "seeds": args.seeds,
        "primary": PRIMARY,
        "rounds": args.rounds,
        "config": {
            "distill_steps": cfg.distill.steps,
            "round_steps": cfg.rounds.steps,
            "batch": cfg.distill.batch_size,
            "refresh_share": cfg.rounds.refresh_share,
            "prompt_fraction": cfg.refresh.prompt_fraction,
            "samples_per_prompt": cfg.refresh.samples_per_prompt,
            "train_examples": cfg.data.train_examples,
            "heldout_examples": cfg.distill.eval_examples,
        },
        "runs": runs,
        "summary": summary,
        "teacher_cost": {
            "teacher_forward_seconds_per_batch": t_batch,
            "total_student_steps": total_steps,
            "online_teacher_seconds": online,
            "refresh_rescore_seconds": rescore,
            "refresh_sampling_seconds": sampling,
            "refreshed_sequences": refreshed,
            "rescore_fraction_of_online": rescore / online,
            "forward_fraction_of_online": refreshed / (total_steps * cfg.distill.batch_size),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "refresh_rounds.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "refresh_rounds.md").write_text(markdown(result))
    print(markdown(result))


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def markdown(r: dict) -> str:
    arms = list(r["summary"])
    head = "| round | student steps | " + " | ".join(f"{a} accuracy | {a} NLL" for a in arms) + " |\n"
    head += "|---|---|" + "---|---|" * len(arms) + "\n"
    lines = []
    for i in range(r["rounds"] + 1):
        cells = []
        for a in arms:
            p = r["summary"][a]["per_round"][i]
            cells += [
                f"{p['accuracy_mean']:.1%} ± {p['accuracy_std']:.1%}",
                f"{p['nll_mean']:.3f} ± {p['nll_std']:.3f}",
            ]
        lines.append(f"| {i} | {r['summary'][arms[0]]['per_round'][i]['student_steps']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
