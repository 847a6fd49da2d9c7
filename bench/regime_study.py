"""Which loss to use when: SFT, FKL, JSD, HPD and this project's HPD variants, on both built-in tasks, in a
data-limited regime (a small set repeated for many epochs) and a fresh-data regime (each sequence seen about
once), 5 student seeds each, every setting one `hpd compare` from one shared cache.

    python -m bench.regime_study            # runs what is missing (two settings at a time), then summarises
    python -m bench.regime_study --summary  # only summarises bench/results/study/*/results.json

Writes bench/results/study/summary.{json,md} and learning_curves.png; bench/readme.py puts them in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "study"
METHODS = "sft,fkl,jsd,hpd,hpd_fkl,hpd_expect,hpd_fkl_expect"
SEEDS = 5
TASKS = {  # a dialogue student step costs ~4x a math one: fewer, smaller steps
    "math": {
        "config": [],
        "sets": [
            "compare.steps=600",
            "distill.batch_size=64",
            "distill.learning_rate=2e-3",
            "compare.curve_every=150",
            "distill.curve_examples=100",
            "eval.samples=1",
        ],
        "regimes": {"limited": 2048, "plenty": 0},
        "quality": ("accuracy", "held-out accuracy", "{:.1%}"),
    },
    "dialogue": {
        "config": ["--config", "dialogue"],
        "sets": ["compare.steps=150", "compare.curve_every=50", "eval.examples=200"],
        "regimes": {"limited": 800, "plenty": 6400},
        "quality": ("rouge_l", "ROUGE-L", "{:.4f}"),
    },
}
# sequences seen per run: math 600 x 64 = 38,400; dialogue 150 x 32 = 4,800
EPOCHS = {
    ("math", "limited"): "2,048 sequences, 18.8 epochs",
    ("math", "plenty"): "40,000 sequences, 0.96 epochs",
    ("dialogue", "limited"): "800 sequences, 6 epochs",
    ("dialogue", "plenty"): "6,400 sequences, 0.75 epochs",
}
SMOOTH = [("response_nll_nats", "held-out NLL", "{:.3f}"), ("kl_to_teacher_nats", "KL to teacher", "{:.3f}")]


def compare_command(task: str, regime: str, seeds: int) -> list[str]:
    t = TASKS[task]
    sets = [
        f'run.name="study-{task}-{regime}"',
        f"generate.num_prompts={t['regimes'][regime]}",
        f'compare.methods="{METHODS}"',
        f"compare.seeds={seeds}",
        *t["sets"],
    ]
    cmd = [sys.executable, "-m", "hpd.pipeline.cli", "compare", *t["config"]]
    for s in sets:
        cmd += ["--set", s]
    return cmd + ["--out", str(OUT / f"{task}-{regime}")]


def run_task(task: str) -> None:
    """Both regimes, 3 seeds first and then 5, so that an interrupted study has every method on some seeds."""
    for seeds in sorted({3, SEEDS}):
        for regime in TASKS[task]["regimes"]:
            subprocess.run(
                compare_command(task, regime, seeds), cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )


def _mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise_setting(task: str, regime: str) -> dict | None:
    path = OUT / f"{task}-{regime}" / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    quality = TASKS[task]["quality"][0]
    metrics = [quality, *(k for k, _, _ in SMOOTH)]
    by = {}
    for r in results:
        by.setdefault(r["method"], {})[r["seed"]] = r
    table = {
        m: {k: _mean_sd([runs[s]["eval"]["student"][k] for s in sorted(runs)]) for k in metrics} | {"seeds": len(runs)}
        for m, runs in by.items()
    }

    def paired(a, b, k):  # a - b over the seeds both have
        common = sorted(set(by[a]) & set(by[b]))
        d = [by[a][s]["eval"]["student"][k] - by[b][s]["eval"]["student"][k] for s in common]
        return (*_mean_sd(d), len(d), sum(x < 0 for x in d)) if d else None

    # NLL decides the ranking: smooth, and every task has it (accuracy jumps near the learning transition)
    ranking = sorted(by, key=lambda m: table[m]["response_nll_nats"][0])
    best = ranking[0]
    diffs = {
        m: {f"vs_{ref}": {k: paired(m, ref, k) for k in metrics} for ref in ("hpd", "fkl", best) if ref in by}
        for m in by
    }
    curves = {}
    for m, runs in by.items():
        pts = [[e for e in runs[s]["log"] if "curve_nll" in e] for s in sorted(runs)]
        n = min(len(p) for p in pts)
        curves[m] = [(pts[0][i]["input_tokens"], statistics.mean(p[i]["curve_nll"] for p in pts)) for i in range(n)]
    teacher = next((r["eval"].get("teacher") for r in results if r["eval"].get("teacher")), {})
    return {
        "task": task,
        "regime": regime,
        "data": EPOCHS[(task, regime)],
        "table": table,
        "ranking": ranking,
        "best": best,
        "diffs": diffs,
        "curves": curves,
        "teacher": teacher,
        "quality": quality,
    }


def summarise() -> dict:
    settings = [s for t in TASKS for r in TASKS[t]["regimes"] if (s := summarise_setting(t, r))]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(settings, indent=1))
    if settings:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
        for ax, s in zip(axes[0], settings):
            for m, pts in s["curves"].items():
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    marker=".",
                    label=m,
                    ls="--" if m.startswith("hpd_") else "-",
                )
            ax.set_title(f"{s['task']}, {s['regime']} ({s['data']})", fontsize=8)
            ax.set_xlabel("training tokens", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel("held-out NLL (mean over seeds)", fontsize=8)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout(), fig.savefig(OUT / "learning_curves.png", dpi=100), plt.close(fig)
    return settings


def main():
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", action="store_true", help="only summarise existing results")
    ap.add_argument("--dir", type=Path, help="where the settings' results are (default bench/results/study)")
    ap.set_defaults(dir=OUT)
    args = ap.parse_args()
    OUT = args.dir
    if not args.summary:
        with ThreadPoolExecutor(2) as pool:  # one task per core: the tasks' runs never share a cache
            list(pool.map(run_task, TASKS))
    for s in summarise():
        print(f"{s['task']} {s['regime']}: by NLL {', '.join(s['ranking'])}")


if __name__ == "__main__":
    main()
