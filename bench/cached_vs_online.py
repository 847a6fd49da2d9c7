"""The headline: a student trained from the teacher cache against one trained with the teacher online.

"Online" is distill.teacher_source = "online", the way TRL and the HPD reference code work: the teacher in
memory next to the student, full-vocabulary logits every step. Everything else (data, order, student, schedule,
loss) is the same code. Every teacher here is at least 8x the student's size unless said otherwise.

1. Speed and memory (`timing`): each arm trains in a process of its own (`hpd run distill`), so its peak RSS
   is its own, and the arms alternate (cached, online, cached, online) so drift on this noisy machine hits
   both. Training tokens/s, and memory as the process's peak RSS both in total and above its RSS before any
   model was loaded (the part that lives on the accelerator on a GPU: weights, optimizer, activations,
   logits; the Python runtime under it is the same for both). Measured on the math task (the trained 0.80M
   teacher with the default 105k student, and an 81k one) and on the dialogue vocabulary (8192) at three teacher
   sizes: the trained 1.9M teacher (below the 8x line, for the trend) and two randomly initialised ones of 5.3M
   and 23M (a forward pass costs the same whatever the weights). Each row is labelled by its task and the size
   ratio measured from the two models' parameters (e.g. "math 7.6x"), never a typed one.
2. Teacher-score overhead: the score stage's own phase timings (forward, log-softmax and top-k, waiting for
   the background shard writer) for the same teachers; overhead = (wall - forward) / forward.
3. Quality (`quality`): HPD from the cache against HPD online, several student seeds, default students. Math (k = the
   whole 18-token vocabulary, 8-bit log-probs) by held-out accuracy; dialogue (top-64 of 8192 plus the tail bucket)
   by held-out NLL and KL to the teacher. The math curves (held-out accuracy every 100 steps) give the steps
   each arm needs to reach a fixed accuracy; times the measured seconds per step, the wall-clock to reach it.
4. K experiments sharing one cache: the teacher-scoring time is paid once; online pays the teacher in every
   experiment. From the measured times.

Quality runs are ordinary pipeline runs (reused when finished); timing runs are always fresh.
Writes bench/results/cached_vs_online_{quality,timing}.json (the measurements), cached_vs_online.json (the
summary) and cached_vs_online.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from bench.provenance import stamp
from hpd import open_run

from .measure import Measured, in_own_process

RESULTS = Path(__file__).parent / "results"
MATH_STUDENT = ["distill.n_layer=2", "distill.n_embd=56", "distill.n_head=2"]  # 81k parameters
RANDOM_TEACHERS = {"dialogue-5m": (4, 256, 4), "dialogue-23m": (6, 512, 8)}  # n_layer, n_embd, n_head
ARMS = {"cached": ['distill.teacher_source="cache"'], "online": ['distill.teacher_source="online"']}


def runner(home: Path, config: str | None, name: str, overrides: list[str], observers=()):
    # the student settings this bench was published with (before make distill's re-tuning), no SFT baseline
    return open_run(
        config,
        ["distill.learning_rate=2e-3", 'distill.baseline=""', *overrides, f'run.name="{name}"'],
        home=home,
        log=lambda s: None,
        observers=observers,
    )


def random_teacher(home: Path, like: str, name: str, shape: tuple[int, int, int]) -> str:
    """A randomly initialised GPT-2 with the trained teacher's tokenizer and context, saved as an HF dir."""
    import torch

    from hpd.stages import hf_models, student_models

    out = home / "models" / f"bench-random-{name.replace(' ', '-')}"
    if not (out / "config.json").is_file():
        _, tok = hf_models.load_causal_lm(like)
        torch.manual_seed(0)
        n_layer, n_embd, n_head = shape
        model = student_models.new_gpt2(
            tok,
            n_positions=hf_models.context_length(hf_models.check_causal_lm(like)),
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
        )
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def setups(home: Path) -> dict:
    """setup -> (config, overrides): the teacher/student pairs, each teacher given as a local HF directory. The
    setup names the runs; the results label each row by its measured size ratio (`label`)."""
    trained = {
        task: runner(home, config, task, []).outputs("teacher").model_dir
        for task, config in [("math", None), ("dialogue", "dialogue")]
    }
    dialogue = ["generate.num_prompts=1024"]
    out = {
        "math": (None, [f'teacher.path="{trained["math"]}"', "generate.num_prompts=6144"]),
        "math-small": (None, [f'teacher.path="{trained["math"]}"', "generate.num_prompts=6144", *MATH_STUDENT]),
        "dialogue": ("dialogue", [f'teacher.path="{trained["dialogue"]}"', *dialogue]),
    }
    for name, shape in RANDOM_TEACHERS.items():
        out[name] = (
            "dialogue",
            [f'teacher.path="{random_teacher(home, trained["dialogue"], name, shape)}"', *dialogue],
        )
    return out


def _parameters(model_dir: str) -> int:
    from hpd.stages import hf_models

    return sum(p.numel() for p in hf_models.load_causal_lm(model_dir)[0].parameters())


def timed_distill(home: Path, config, name: str, overrides: list[str], steps: int) -> dict:
    """One fresh distill in a process of its own; what it measured (tokens, seconds, RSS)."""
    shutil.rmtree(home / "runs" / name / "distill", ignore_errors=True)
    sets = [
        "distill.learning_rate=2e-3",
        'distill.baseline=""',
        *overrides,
        f"distill.steps={steps}",
        "distill.eval_examples=20",
        "distill.checkpoint_steps=100000",
        f'run.name="{name}"',
    ]
    rep = in_own_process("distill", config, sets, home)
    return {
        "tokens": rep["input_tokens"],
        "seconds": rep["train_seconds"],
        "steps": steps,
        "tokens_per_s": rep["input_tokens"] / rep["train_seconds"],
        "peak_rss_mb": rep["peak_rss_mb"],
        "training_mb": rep["peak_rss_mb"] - rep["rss_start_mb"],
        "parameters": rep["parameters"],
    }


def label(setup: str, ratio: float) -> str:
    """A row's label: its task and the teacher/student size ratio measured from their parameters."""
    return f"{_task(setup)} {ratio:.{1 if ratio < 10 else 0}f}x"


def _task(setup: str) -> str:
    """The task a setup trains on (its name's first part: "dialogue-5m" -> "dialogue")."""
    return setup.split("-")[0]


def timing(home: Path, steps: dict, repeats: int, only: list[str] | None = None) -> dict:
    """In a fresh home of its own, so every cache is built (and its scoring timed) here. `only`: these setups
    are measured again and the others kept from the last timing file."""
    scratch = home / "bench-timing"
    shutil.rmtree(scratch, ignore_errors=True)
    out, built = {}, {}
    last = RESULTS / "cached_vs_online_timing.json"
    if only and last.exists():
        out = {
            v["setup"]: (k, v)
            for k, v in json.loads(last.read_text()).items()
            if v.get("setup") and v["setup"] not in only
        }
    pairs = setups(home)
    for setup, (config, overrides) in pairs.items():
        if only and setup not in only:
            continue
        name = f"cvo-{setup}"
        measured = Measured()
        r = runner(scratch, config, name, overrides, observers=[measured])
        r.run(until="score")
        teacher, cache = r.outputs("teacher"), r.outputs("score")
        # the cache may have been built (and timed) for an earlier pair with the same teacher
        score = built.get(cache.cache_id) or {
            "timing": measured["score"],
            "tokens": cache.tokens,
            "sequences": cache.sequences,
        }
        built[cache.cache_id] = score
        arms = {arm: [] for arm in ARMS}
        # a warm-up round (i = -1) discarded, then cached, online, online, cached, ...: drift hits both arms
        for i in range(-1, repeats):
            for arm in list(ARMS) if i % 2 == 0 else list(ARMS)[::-1]:
                extra = ARMS[arm]
                (arms[arm] if i >= 0 else []).append(
                    timed_distill(
                        scratch,
                        config,
                        name,
                        [*overrides, *extra],
                        steps[_task(setup)],
                    )
                )
        med = {arm: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for arm, runs in arms.items()}
        teacher_parameters = _parameters(teacher.model_dir)
        row = {
            "made": stamp(),  # the file stays {label: row}, so each row carries the stamp
            "setup": setup,
            "method": r.cfg.distill.method,
            "repeats": repeats,
            "teacher_parameters": teacher_parameters,
            "student_parameters": med["cached"]["parameters"],
            "size_ratio": teacher_parameters / med["cached"]["parameters"],
            "arms": med,
            "runs": arms,
            "score_timing": score["timing"],
            "score_tokens": score["tokens"],
            "score_sequences": score["sequences"],
            "speedup": med["cached"]["tokens_per_s"] / med["online"]["tokens_per_s"],
            "peak_rss_ratio": med["cached"]["peak_rss_mb"] / med["online"]["peak_rss_mb"],
            "training_mb_ratio": med["cached"]["training_mb"] / med["online"]["training_mb"],
        }
        out[setup] = (label(setup, row["size_ratio"]), row)
        print(
            f"[timing] {out[setup][0]}: {row['speedup']:.2f}x tokens/s, peak RSS {row['peak_rss_ratio']:.2f}x, "
            f"training memory {row['training_mb_ratio']:.2f}x, score overhead {score['timing']['overhead']:.1%}",
            flush=True,
        )
    return dict(out[k] for k in pairs if k in out)


def quality(home: Path, seeds: int, math_steps: int, dialogue_steps: int) -> dict:
    out = {}
    # The default students (math 105k, below the 8x line; an 81k one learns nothing with HPD in 600 steps)
    for task, config, steps, base, student in [
        ("math", None, math_steps, "math", []),
        ("dialogue", "dialogue", dialogue_steps, "dialogue", []),
    ]:
        rows = []
        for seed in range(seeds):
            for arm, extra in ARMS.items():
                name = f"bench-cvo-q-{task}-{arm}-s{seed}"
                r = runner(
                    home,
                    config,
                    name,
                    [
                        *student,
                        *extra,
                        'distill.method="hpd"',
                        f"distill.steps={steps}",
                        f"distill.seed={seed}",
                        "distill.curve_every=100",
                        "eval.teacher=false",
                        "eval.samples=1",
                    ],
                )
                r.adopt(base, [s for s in ["data", "teacher", "generate", "score"] if s in r.stages])
                r.run()
                student_dir = Path(r.outputs("distill").student_dir)
                log = json.loads((student_dir / "training_log.json").read_text())
                rows.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "eval": r.outputs("eval").report["student"],
                        "curve": [
                            {k: e[k] for k in e if k == "step" or k.startswith("curve_")}
                            for e in log
                            if "curve_nll" in e
                        ],
                        # HPD's samples outside the cached top-k, (step, share) as logged
                        "outside_topk": [
                            (e["step"], e["sample_outside_topk"]) for e in log if "sample_outside_topk" in e
                        ],
                    }
                )
                print(f"[quality] {task} {arm} seed {seed}: {rows[-1]['eval']}", flush=True)
        out[task] = rows
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def steps_to(curve: list[dict], key: str, target: float, lower_is_better: bool = False) -> float | None:
    """The first step whose held-out measure reaches `target`, interpolated between curve points
    (None if it never does)."""
    sign = -1 if lower_is_better else 1
    prev = None
    for point in curve:
        if sign * point[key] >= sign * target:
            if prev is None:
                return float(point["step"])
            (s0, v0), s1, v1 = prev, point["step"], point[key]
            return s0 + (s1 - s0) * (target - v0) / (v1 - v0)
        prev = (point["step"], point[key])
    return None


def summarise(t: dict, q: dict, k_values=(1, 4, 16)) -> dict:
    s = {}
    math_q = q.get("math", [])
    if math_q:
        finals = {arm: [r["eval"]["accuracy"] for r in math_q if r["arm"] == arm] for arm in ARMS}
        paired = [a - b for a, b in zip(finals["cached"], finals["online"])]
        # Two fixed levels every arm can be timed to: half the weaker arm's mean final accuracy (a seed may
        # never reach it: accuracy jumps late), and the worst final held-out NLL of any run (all reach it).
        acc_target = 0.5 * min(statistics.mean(v) for v in finals.values())
        nll_target = max(r["curve"][-1]["curve_nll"] for r in math_q)
        reach = {
            "accuracy": {
                arm: [steps_to(r["curve"], "curve_accuracy", acc_target) for r in math_q if r["arm"] == arm]
                for arm in ARMS
            },
            "nll": {
                arm: [
                    steps_to(r["curve"], "curve_nll", nll_target, lower_is_better=True)
                    for r in math_q
                    if r["arm"] == arm
                ]
                for arm in ARMS
            },
        }
        s["math"] = {
            "accuracy": {arm: _mean_std(v) for arm, v in finals.items()},
            "paired": _mean_std(paired),
            "nll": {
                arm: _mean_std([r["eval"]["response_nll_nats"] for r in math_q if r["arm"] == arm]) for arm in ARMS
            },
            "targets": {"accuracy": acc_target, "nll": nll_target},
            "steps_to_target": reach,
        }
        default = next((row for row in t.values() if row.get("setup") == "math"), None)
        if default:  # steps from the curves x seconds per step measured on an idle machine
            per_step = {arm: default["arms"][arm]["seconds"] / default["arms"][arm]["steps"] for arm in ARMS}
            s["math"]["seconds_per_step"] = per_step
            s["math"]["seconds_to_target"] = {
                what: {
                    arm: (
                        statistics.mean(x for x in steps if x is not None) * per_step[arm]
                        if any(x is not None for x in steps)
                        else None
                    )
                    for arm, steps in by_arm.items()
                }
                for what, by_arm in reach.items()
            }
    if q.get("dialogue"):
        d = q["dialogue"]
        s["dialogue"] = {
            m: {arm: _mean_std([r["eval"][m] for r in d if r["arm"] == arm]) for arm in ARMS}
            for m in ("response_nll_nats", "kl_to_teacher_nats", "rouge_l")
        }
        s["dialogue"]["paired_nll"] = _mean_std(
            [
                a["eval"]["response_nll_nats"] - b["eval"]["response_nll_nats"]
                for a, b in zip([r for r in d if r["arm"] == "cached"], [r for r in d if r["arm"] == "online"])
            ]
        )
    # K experiments: the cache pays the teacher's scoring once, online pays the teacher inside every run
    s["k_experiments"] = {}
    for label, row in t.items():
        full = {
            arm: row["arms"][arm]["seconds"] / row["arms"][arm]["tokens"] * row["score_tokens"] * 3 for arm in ARMS
        }  # three epochs over the scored tokens, a typical student budget
        score = row["score_timing"]["wall_s"]
        s["k_experiments"][label] = {
            str(k): {"cached_s": score + k * full["cached"], "online_s": k * full["online"]} for k in k_values
        }
    return s


def markdown(t: dict, q: dict, s: dict) -> str:
    lines = [
        "# Cached teacher vs online teacher",
        "",
        "Produced by `bench/cached_vs_online.py` (part of `make bench`) on one machine (2 CPU cores, fp32). "
        "Both arms of a pair are timed in the same invocation, each run in a process of its own, the order "
        "of the arms alternating (cached, online, online, cached, ...); medians of the runs shown, each pair "
        "with its config's distillation loss (`distill.method`).",
        "",
        "## Speed and memory",
        "",
        "| teacher : student | loss | runs per arm | parameters | cached tokens/s | online tokens/s | speed-up | "
        "peak RSS cached / online (MB) | ratio | training memory cached / online (MB) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in t.items():
        c, o = r["arms"]["cached"], r["arms"]["online"]
        lines.append(
            f"| {label} | {r.get('method', 'hpd')} | {len(r['runs']['cached'])} | "
            f"{r['teacher_parameters'] / 1e6:.2f}M : {r['student_parameters'] / 1e3:.0f}k | "
            f"{c['tokens_per_s']:,.0f} | {o['tokens_per_s']:,.0f} | **{r['speedup']:.2f}x** | "
            f"{c['peak_rss_mb']:.0f} / {o['peak_rss_mb']:.0f} | {r['peak_rss_ratio']:.2f} | "
            f"{c['training_mb']:.0f} / {o['training_mb']:.0f} | **{r['training_mb_ratio']:.2f}** |"
        )
    lines += [
        "",
        "Training memory = peak RSS minus the process's RSS before any model was loaded.",
        "",
        "## Teacher-score overhead",
        "",
        "| teacher | tokens | forward s | log-softmax + top-k s | waiting for the writer s | writer (background) s "
        "| wall s | overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in t.items():
        tm = r["score_timing"]
        lines.append(
            f"| {label} ({r['teacher_parameters'] / 1e6:.2f}M) | {r['score_tokens']:,} | "
            f"{tm['forward_s']:.1f} | {tm['topk_s']:.1f} | {tm.get('write_wait_s', 0):.2f} | "
            f"{tm.get('write_s', 0):.1f} | {tm['wall_s']:.1f} | **{tm['overhead']:.1%}** |"
        )
    if "math" in s:
        m = s["math"]
        tg = m["targets"]
        lines += [
            "",
            "## Student quality and time to a fixed level (math, HPD, the default pair)",
            "",
            f"| arm | seeds | held-out accuracy | held-out NLL | steps to {tg['accuracy']:.1%} accuracy "
            f"(seeds reaching it) | seconds to it | steps to NLL {tg['nll']:.3f} | seconds to it |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm in ARMS:
            cells = []
            for what in ("accuracy", "nll"):
                steps = [x for x in m["steps_to_target"][what][arm] if x is not None]
                secs = m.get("seconds_to_target", {}).get(what, {}).get(arm)
                cells += [
                    f"{statistics.mean(steps):.0f} ({len(steps)} of {len(m['steps_to_target'][what][arm])})"
                    if steps
                    else "not reached",
                    "" if secs is None else f"{secs:.0f}",
                ]
            (am, asd), (nm, nsd) = m["accuracy"][arm], m["nll"][arm]
            lines.append(
                f"| {arm} | {len(m['steps_to_target']['nll'][arm])} | {am:.1%} ± {asd:.1%} | "
                f"{nm:.3f} ± {nsd:.3f} | " + " | ".join(cells) + " |"
            )
        lines.append(
            f"\nPaired by seed, cached - online accuracy: {m['paired'][0]:+.1%} ± {m['paired'][1]:.1%}. "
            "Seconds = steps from the learning curves x seconds per step timed above "
            + (
                f"({m['seconds_per_step']['cached']:.2f} s cached, {m['seconds_per_step']['online']:.2f} s online)."
                if "seconds_per_step" in m
                else "."
            )
        )
    if "dialogue" in s:
        d = s["dialogue"]
        lines += [
            "",
            "## Student quality (dialogue, HPD, top-64 of 8192 cached vs the full vocabulary online)",
            "",
            "| arm | held-out NLL | KL to teacher | ROUGE-L |",
            "|---|---|---|---|",
        ]
        for arm in ARMS:
            lines.append(
                f"| {arm} | "
                + " | ".join(
                    f"{d[k][arm][0]:.3f} ± {d[k][arm][1]:.3f}"
                    for k in ("response_nll_nats", "kl_to_teacher_nats", "rouge_l")
                )
                + " |"
            )
        lines.append(f"\nPaired NLL difference, cached - online: {d['paired_nll'][0]:+.4f} ± {d['paired_nll'][1]:.4f}.")
    lines += [
        "",
        "## K experiments from one cache (three epochs over the scored tokens each)",
        "",
        "| teacher : student | K | cached: score once + K trainings (s) | online: K trainings (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    for label, ks in s["k_experiments"].items():
        for k, v in ks.items():
            lines.append(
                f"| {label} | {k} | {v['cached_s']:.0f} | {v['online_s']:.0f} | {v['online_s'] / v['cached_s']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "timing", "quality", "report"], default="all")
    ap.add_argument("--seeds", type=int, default=5, help="student seeds per arm of the quality part, paired")
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per arm, at least 5 (arms alternating, after a warm-up round)",
    )
    ap.add_argument("--math-steps", type=int, default=600)
    ap.add_argument("--dialogue-steps", type=int, default=300)
    ap.add_argument("--timing-steps", type=int, default=40)
    ap.add_argument(
        "--only",
        default="",
        help="timing: measure only these setups again (comma-separated, of: math, math-small, dialogue, dialogue-5m, "
        "dialogue-23m)",
    )
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"), help="shares the default teachers")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats: at least 5 runs per arm (these machines are noisy)")
    home = Path(args.home).resolve()
    for config, name in [(None, "math"), ("dialogue", "dialogue")]:  # the default runs' teachers and caches
        runner(home, config, name, []).run(until="score")
    # Each part keeps its results in a file of its own, so a part can be rerun alone; the report joins them.
    parts = {
        "quality": lambda: quality(home, args.seeds, args.math_steps, args.dialogue_steps),
        "timing": lambda: timing(
            home,
            {"math": args.timing_steps, "dialogue": args.timing_steps // 2},
            args.repeats,
            [x for x in args.only.split(",") if x] or None,
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    for part, fn in parts.items():
        if args.part in ("all", part):
            result = fn()
            if part == "quality":  # the timing file stays {label: row}: it is read so, here and by bench/readme.py
                result = {"made": stamp(), **result}
            (RESULTS / f"cached_vs_online_{part}.json").write_text(json.dumps(result, indent=1))
    done = {
        part: json.loads((RESULTS / f"cached_vs_online_{part}.json").read_text())
        for part in parts
        if (RESULTS / f"cached_vs_online_{part}.json").exists()
    }
    if len(done) < len(parts):
        print(f"report waits for {', '.join(p for p in parts if p not in done)}")
        return
    t, q = done["timing"], done["quality"]
    s = summarise(t, q)
    (RESULTS / "cached_vs_online.json").write_text(json.dumps({"made": stamp(), "summary": s}, indent=1))
    (RESULTS / "cached_vs_online.md").write_text(markdown(t, q, s))
    print(markdown(t, q, s))


if __name__ == "__main__":
    main()
