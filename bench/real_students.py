"""Students worth using from real teachers: does distillation give a small model that keeps its teacher's skill, and
which loss to use there. Hours on 2 CPU cores: `make bench-real`, outside `make bench` and `make test`.

    python -m bench.real_students --pair B     (prune then distil: SmolLM2-135M-Instruct and a half of it)
    python -m bench.real_students --pair A     (Qwen2.5-Coder-1.5B-Instruct teaches Qwen2.5-Coder-0.5B-Instruct)

Pair B (--config smollm2-half): the student is cut from its teacher to half; first both ways are tried briefly (15
of the 30 layers kept, `teacher-layers`; or the teacher's architecture at half width, `teacher-shape`, fkl, one seed)
and the one whose KL to the teacher falls further is kept. Then `hpd compare`: SeqKD (sft on the teacher's replies),
fkl, jsd, hpd and hpd_fkl, 3 seeds each, the same steps and one shared cache. The primary measure, named before any
run: the held-out KL to the teacher on its own replies (lower is better); beside it NLL, the arithmetic questions'
accuracy and ROUGE-L. Each method against SeqKD, paired by seed, with a 95% interval (hpd/common/stats.py).
Recovery: the share of the KL the cut cost that training won back, (KL of the cut student - KL after) / KL of the
cut student. Plateau: whether the last 20% of steps improved held-out KL by under 2% (from the learning curves).

Pair A (--config qwen-coder): the student before distillation, after SeqKD, after fkl and after hpd_fkl (the HPD
variant the regime study recommends), one seed each (each run costs hours here), with their learning curves;
HumanEval pass@1 on all 164 problems (greedy; each pair of models compared by McNemar's exact test and a paired
bootstrap over problems), KL and NLL on held-out teacher replies, and retention (NLL on general chat replies). The
primary measure: HumanEval pass@1. Running the students' code needs the opt-in: HPD_ALLOW_CODE_EVAL=1. Arms judged
on fewer problems (--set eval.humaneval_problems=N, minutes a model less) are judged on all 164 afterwards, every
model in one process, and reported with them:

    python -m bench.real_students --pair A [the arms' flags] --finished-only --humaneval-all 16384

Pair X, across tokenizers (--config qwen-smollm2): Qwen2.5-Coder-0.5B-Instruct's cache teaches SmolLM2-135M-Instruct,
a complete pretrained student of another tokenizer, through the token bridge; SeqKD (sft on the teacher's replies in
the student's tokens, what any offline tool can do across tokenizers) against fkl and hpd_fkl, 3 seeds, the same
steps. The primary measure, named before any run: held-out NLL of the teacher's replies in the student's tokens;
beside it HumanEval pass@1 (paired by problem) and the share of the student's response tokens that got a teacher
distribution.

Pair B also: the arithmetic questions again on a larger set (--arithmetic N: the held-out split holds 16), and how
far a plateau is (--plateau-probe STEPS: the preset's loss, seed 0, trained longer). A comparison at another budget
(--budget NAME, with its --steps) keeps its own results and runs beside the main one, so both can be shown.

Writes bench/results/real_students_<pair>[_<budget>].json (the compare report under the folder of that name).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.provenance import stamp
from hpd import open_run
from hpd.common.stats import mcnemar, paired_t
from hpd.pipeline.compare import OFFLINE, arm_key, compare
from hpd.pipeline.report import training_logs
from hpd.stages import hf_models, metrics
from hpd.stages.tasks import chat
from hpd.storage.fingerprint import digest

RESULTS = Path(__file__).resolve().parent / "results"
PRIMARY = {"B": "kl_to_teacher_nats", "A": "humaneval_pass@1", "X": "response_nll_nats"}
CONFIG = {"B": "smollm2-half", "A": "qwen-coder", "X": "qwen-smollm2"}
HIGHER = ("accuracy", "rouge_l", "humaneval_pass@1")
HUMANEVAL_ALL = RESULTS / "real_students_A" / "humaneval_all.json"  # pair A's models judged on every problem


def choose_cut(home: str, steps: int, run: bool = True) -> dict:
    """Pair B: 15 of 30 layers kept (evenly spaced, or the 15 of most block influence) against the teacher's
    architecture at half width; fkl, one seed, `steps` steps. The one with the lower held-out KL to the teacher
    after training is kept. All adopt the base run's teacher stages and cache (made once, then shared with the
    comparison). With run=False, the cuts not tried yet are left out."""
    base = open_run("smollm2-half", [], home=home)
    if run:
        base.run(until="score")
    tried = {}
    for name, sets in (
        ("teacher-layers", ['distill.student_init="teacher-layers"', "distill.n_layer=15"]),
        (
            "teacher-layers-influence",
            ['distill.student_init="teacher-layers"', 'distill.layer_choice="influence"', "distill.n_layer=15"],
        ),
        (
            "teacher-shape",
            ['distill.student_init="teacher-shape"', "distill.n_layer=30", "distill.n_embd=288", "distill.n_head=9"],
        ),
    ):
        cut = open_run(
            "smollm2-half",
            [
                *sets,
                'distill.method="fkl"',
                f"distill.steps={steps}",
                'distill.baseline=""',
                "eval.teacher=false",
                f'run.name="smollm2-half-cut-{name}"',
            ],
            home=home,
        )
        if run:
            cut.adopt("smollm2-half", OFFLINE)
            cut.run()
        elif cut.state("eval")[0] != "done":
            continue
        report = cut.outputs("eval").report
        tried[name] = {
            "sets": sets,
            "kl": report["student"]["kl_to_teacher_nats"],
            "kl_before": report.get("initial", {}).get("kl_to_teacher_nats"),
        }
    kept = min(tried, key=lambda n: tried[n]["kl"])
    return {"tried": tried, "kept": kept, "steps": steps}


def plateau_probe(home: str, overrides: list[str], steps: int, kept: list[dict]) -> dict:
    """Pair B: how far the plateau is. The preset's method, seed 0, trained `steps` steps (a multiple of the
    comparison's) on the same cut and cache, its held-out learning curve and the plateau test read on it; distill only
    (the curve is in its training log). Of `kept`, earlier probes' results, the one whose run's settings are these
    (the same key as a comparison's arm: every stage's config fingerprint) is taken as it is."""
    base = open_run("smollm2-half", overrides, home=home).cfg.run.name  # whose teacher stages and cache it shares
    run = open_run(
        "smollm2-half",
        [*overrides, f"distill.steps={steps}", 'distill.baseline=""', f'run.name="{base}-probe-{steps}"'],
        home=home,
    )
    key = arm_key(run)
    earlier = next((p for p in kept if p.get("arm_key") == key), None)
    if earlier:
        return earlier
    run.adopt(base, OFFLINE)
    run.run(until="distill")
    log = training_logs(run)
    return {
        "made": stamp(),
        "method": run.cfg.distill.method,
        "steps": steps,
        "batch_size": run.cfg.distill.batch_size,
        "learning_rate": run.cfg.distill.learning_rate,
        "curve": curve(log),
        "plateau": plateau(log, steps),
        "train_seconds": step_seconds(log),
        "arm_key": key,
    }


def plateau(log: list[dict], steps: int) -> dict:
    """Whether held-out KL improved by under 2% over the last 20% of the steps (curve points); across tokenizers,
    where the curve has no per-token KL, the held-out NLL of the teacher's replies."""
    key = "curve_kl" if any("curve_kl" in e for e in log) else "curve_nll"
    curve = [(e["student_step"], e[key]) for e in log if key in e]
    if len(curve) < 2:
        return {"points": len(curve), "plateau": None}
    start = [kl for s, kl in curve if s <= 0.8 * steps]
    before, last = (start[-1] if start else curve[0][1]), curve[-1][1]
    gain = (before - last) / before if before else 0.0
    return {
        "points": len(curve),
        "measure": key,
        "at_80pct": before,
        "final": last,
        "gain_last_20pct": gain,
        "plateau": gain < 0.02,
    }


def curve(log: list[dict]) -> dict:
    """The held-out learning curve of one run: its measure (KL to the teacher, or across tokenizers NLL) and its
    (student step, value) points."""
    key = "curve_kl" if any("curve_kl" in e for e in log) else "curve_nll"
    return {"measure": key, "points": [(e["student_step"], e[key]) for e in log if key in e]}


def step_seconds(log: list[dict]) -> float:
    """The training steps' own seconds, from each step's tokens and tokens/s in the training log (a run resumed
    from a checkpoint after a crash counts its steps before the crash too; learning-curve points not at all)."""
    return sum(e["tokens"] / e["tokens_per_s"] for e in log if e.get("tokens_per_s"))


def summarise(results: list[dict], pair: str) -> dict:
    by = {}
    for r in results:
        by.setdefault(r["method"], {})[r["seed"]] = r
    reference = "sft"
    measures = [
        k
        for k in (
            "kl_to_teacher_nats",
            "response_nll_nats",
            "accuracy",
            "rouge_l",
            "humaneval_pass@1",
            "retention_nll_nats",
        )
        if k in results[0]["eval"]["student"]
    ]
    out = {"primary": PRIMARY[pair], "reference": reference, "methods": {}}
    initial = next((r["eval"]["initial"] for r in results if "initial" in r["eval"]), None)
    teacher = next((r["eval"]["teacher"] for r in results if "teacher" in r["eval"]), None)
    for method, seeds in by.items():
        m = {"seeds": sorted(seeds)}
        for k in measures:
            values = {s: r["eval"]["student"][k] for s, r in seeds.items() if k in r["eval"]["student"]}
            m[k] = {
                "mean": statistics.mean(values.values()),
                "sd": statistics.stdev(values.values()) if len(values) > 1 else 0.0,
            }
            if method != reference and reference in by:
                ref = {s: r["eval"]["student"][k] for s, r in by[reference].items() if k in r["eval"]["student"]}
                m[k]["minus_" + reference] = paired_t(values, ref, higher_is_better=k in HIGHER)
        if pair == "B" and initial and "kl_to_teacher_nats" in initial:  # the share of what the cut cost won back
            before = initial["kl_to_teacher_nats"]
            m["kl_recovered"] = (before - m["kl_to_teacher_nats"]["mean"]) / before
        m["plateau"] = [
            plateau(r["log"], max((e["student_step"] for e in r["log"]), default=0)) for r in seeds.values()
        ]
        m["curves"] = {s: curve(r["log"]) for s, r in seeds.items()}  # the learning curves, seed by seed
        m["train_seconds"] = statistics.mean(step_seconds(r["log"]) for r in seeds.values())
        out["methods"][method] = m
    for method, m in out["methods"].items():  # across tokenizers: how many student tokens the bridge reached
        shares = [r["student"].get("teacher_target_share") for r in by[method].values()]
        if all(x is not None for x in shares):
            m["teacher_target_share"] = statistics.mean(shares)
    if pair in ("A", "X"):  # HumanEval problem by problem, each distilled student against the student before and SeqKD
        # each seed's problems in turn (paired by seed and problem); the student before distillation once per seed
        def passed(method: str, seeds: list[int]) -> list[bool]:
            return sum((by[method][x]["eval"]["student"].get("humaneval_passed") or [] for x in seeds), [])

        base = (initial or {}).get("humaneval_passed") or []
        out["humaneval_paired"] = {}
        if base and (teacher or {}).get("humaneval_passed"):  # the gap distillation is to close
            out["humaneval_paired"]["teacher vs before"] = mcnemar(teacher["humaneval_passed"], base)
        for a in by:
            for b in ("before", "sft"):
                if a == b or (b != "before" and b not in by):
                    continue
                seeds = sorted(by[a]) if b == "before" else sorted(set(by[a]) & set(by[b]))  # paired by seed
                first, other = passed(a, seeds), base * len(seeds) if b == "before" else passed(b, seeds)
                if first and other:
                    out["humaneval_paired"][f"{a} vs {b}"] = mcnemar(first, other)
    out["initial"], out["teacher"] = initial, teacher
    return out


def judge_arithmetic(home: str, overrides: list[str], n: int, results: list[dict], kept: dict) -> dict:
    """Pair B: the teacher, the cut student before distillation and every finished arm's student answer the same
    `n` arithmetic questions that are neither training nor held-out prompts (the held-out split has only 16), greedy,
    graded like the eval's (the reply's last number). Each model's verdicts are kept in `kept` (an earlier file's
    "models") under a key of what they depend on (an arm by its arm_key, the teacher and the cut by their weights'
    fingerprints, and the questions and generation settings) and judged again only when that changed."""
    base = open_run("smollm2-half", overrides, home=home)
    data, teacher, cfg = base.outputs("data"), base.outputs("teacher"), base.cfg.eval
    seen = {json.loads(line)["prompt"] for path in (data.train, data.heldout) for line in open(path)}
    pool = [q for q in chat.arithmetic_questions() if q["prompt"] not in seen]
    random.Random(0).shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"--arithmetic {n}: only {len(pool)} arithmetic questions are unseen by pair B; ask for fewer")
    rows = pool[:n]
    how = {"questions": digest([r["prompt"] for r in rows]), "max_new_tokens": cfg.max_new_tokens}
    models = {"teacher": (teacher.model_dir, teacher.dtype, teacher.model_fingerprint)}
    initial = results[0]["student"]["initial_dir"]  # the cut, before distillation: the same in every arm
    models["before"] = (initial, "float32", digest(hf_models.model_fingerprints(Path(initial))))
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        models[f"{r['method']} s{r['seed']}"] = (r["eval"]["student_dir"], "float32", r["arm_key"])
    judged = {}
    for name, (model_dir, dtype, identity) in tqdm(models.items(), desc="arithmetic", unit="model"):
        key = digest({**how, "model": identity})
        if kept.get(name, {}).get("key") == key:
            judged[name] = kept[name]
            continue
        if not Path(model_dir).is_dir():  # an arm kept from the report whose run directory is gone
            raise SystemExit(f"--arithmetic: {name}'s model is not on this machine ({model_dir}); run its arm again")
        model, tok = hf_models.load_causal_lm(model_dir, dtype=getattr(torch, dtype))
        start = time.perf_counter()
        replies = metrics.generate_texts(
            model, tok, [r["prompt"] for r in rows], max_new_tokens=cfg.max_new_tokens, batch_tokens=cfg.batch_tokens
        )
        correct = [metrics.last_number_is(g[0], r["answer"]) for g, r in zip(replies, rows)]
        judged[name] = {
            "key": key,
            "correct": correct,
            "accuracy": sum(correct) / n,
            "seconds": time.perf_counter() - start,
            "examples": [[r["prompt"], g[0]] for r, g in zip(rows[:4], replies)],  # what its replies look like
        }
        del model
    return {"made": stamp(), **how, "asked": n, "unseen": len(pool), "models": judged}


def arithmetic_summary(judged: dict) -> dict:
    """Each loss's accuracy (mean over seeds) and, paired by seed and question, against SeqKD and the teacher; the
    teacher against the cut student (the gap distillation is to close)."""
    models = judged["models"]
    by: dict[str, dict[int, list[bool]]] = {}
    for name, m in models.items():
        if name not in ("teacher", "before"):
            method, seed = name.rsplit(" s", 1)
            by.setdefault(method, {})[int(seed)] = m["correct"]
    teacher, before = models["teacher"]["correct"], models["before"]["correct"]
    out = {
        "teacher": models["teacher"]["accuracy"],
        "before": models["before"]["accuracy"],
        "teacher vs before": mcnemar(teacher, before),
        "methods": {},
    }
    for method, seeds in by.items():
        order = sorted(seeds)
        flat = sum((seeds[s] for s in order), [])
        m = {"accuracy": {s: sum(seeds[s]) / len(seeds[s]) for s in order}, "mean": sum(flat) / len(flat)}
        m["vs teacher"] = mcnemar(flat, teacher * len(order))
        if method != "sft" and "sft" in by:
            both = [s for s in order if s in by["sft"]]
            m["vs sft"] = mcnemar(sum((seeds[s] for s in both), []), sum((by["sft"][s] for s in both), []))
        out["methods"][method] = m
    return out


def judge_humaneval(home: str, overrides: list[str], batch_tokens: int) -> Path:
    """Pair A on all of HumanEval: the teacher, the student before distillation and each finished arm's student
    judged one after another in one process, on the same 164 problems with the same batching (greedy, so the
    problems' verdicts pair up across models). Each model's verdicts are written as it finishes, so a rerun judges
    only the models not judged yet. The arms' own eval judged fewer problems (eval.humaneval_problems), minutes per
    model less; this replaces their pass@1 in the summary."""
    from hpd.stages import hf_models, metrics, sandbox

    path = HUMANEVAL_ALL
    done = json.loads(path.read_text()) if path.exists() else {"made": stamp(), "models": {}}
    arms = json.loads((RESULTS / "real_students_A" / "results.json").read_text())
    base = open_run(CONFIG["A"], overrides, home=home)
    cfg = base.cfg.eval
    models = {  # the two that make the gap to close first
        "before": arms[0]["eval"]["student_report"]["initial_dir"],
        "teacher": base.outputs("teacher").model_dir,
        **{r["method"]: r["eval"]["student_dir"] for r in arms if r["seed"] == 0},
    }
    problems = metrics.humaneval_problems()
    for name, where in models.items():
        weights = hf_models.model_fingerprints(where)["model"]
        if done["models"].get(name, {}).get("weights") == weights:  # judged already (an arm trained again is not)
            continue
        print(f"[humaneval] {name}: {len(problems)} problems ({where})", flush=True)
        started = time.perf_counter()
        model, tok = hf_models.load_causal_lm(where)
        verdicts = metrics.humaneval_pass_at_1(
            model,
            tok,
            problems,
            timeout=cfg.timeout,
            max_new_tokens=cfg.max_new_tokens or 384,
            execute_code=sandbox.allowed(False),
            batch_tokens=batch_tokens,
        )
        del model
        done["models"][name] = {
            **verdicts,
            "seconds": time.perf_counter() - started,
            "model": where,
            "weights": weights,
        }
        done["batch_tokens"] = batch_tokens
        path.write_text(json.dumps(done, indent=1) + "\n")
        print(f"[humaneval] {name}: pass@1 {verdicts['humaneval_pass@1']:.3f}", flush=True)
    return path


def all_problems(results: list[dict], path: Path = HUMANEVAL_ALL) -> dict | None:
    """Pair A's verdicts on all of HumanEval (judge_humaneval) in place of the arms' own, fewer problems: the
    teacher's, the student's before and each arm's, once every one of them is judged (a McNemar test pairs two
    models' verdicts on the same problems). Returns what the judgement was, for the README (while incomplete, which
    models are judged so far), or None where none is."""
    if not path.exists():
        return None
    judged = json.loads(path.read_text())
    models = judged["models"]
    needed = {"before", "teacher", *(r["method"] for r in results)}
    if not needed <= set(models) or any(r["seed"] != 0 for r in results):
        return {"complete": False, "judged": sorted(models)}
    keys = ("humaneval_pass@1", "humaneval_problems", "humaneval_timed_out", "humaneval_passed")
    for r in results:
        for row, name in ((r["eval"]["student"], r["method"]), (r["eval"].get("initial"), "before")):
            if row is not None:
                row.update({k: models[name][k] for k in keys})
        if r["eval"].get("teacher") is not None:
            r["eval"]["teacher"].update({k: models["teacher"][k] for k in keys})
    return {
        "complete": True,
        "problems": models["teacher"]["humaneval_problems"],
        "batch_tokens": judged["batch_tokens"],
        "made": judged["made"],
        "minutes": {k: m["seconds"] / 60 for k, m in models.items()},
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", choices=("A", "B", "X"), required=True)
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--choice-steps", type=int, default=120)
    ap.add_argument("--steps", type=int, default=None, help="student steps per arm (default: the preset's)")
    ap.add_argument("--curve-every", type=int, default=None, help="held-out KL every N steps (default: the preset's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every arm")
    ap.add_argument(
        "--finished-only",
        action="store_true",
        help="report the arms finished so far, train none (--humaneval-all and --arithmetic still judge them)",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the arms (and pair B's cut) the committed results already hold with the same settings: the "
        "comparison grows across sessions (hpd compare --keep)",
    )
    ap.add_argument(
        "--humaneval-all",
        type=int,
        metavar="BATCH_TOKENS",
        default=0,
        help="pair A, after its arms: judge its five models on all 164 HumanEval problems, batched by this many tokens",
    )
    ap.add_argument(
        "--plateau-probe",
        type=int,
        metavar="STEPS",
        action="append",
        default=[],
        help="pair B, after its arms: the preset's method, seed 0, trained this many steps, to show how far the "
        "plateau is (bench/results/real_students_B_probe.json); repeat it for several lengths",
    )
    ap.add_argument(
        "--arithmetic",
        type=int,
        metavar="N",
        default=0,
        help="pair B, after its arms: the teacher, the cut and every arm's student answer N arithmetic questions "
        "none of them trained or was judged on (bench/results/real_students_B_arithmetic.json)",
    )
    ap.add_argument(
        "--budget",
        default="",
        metavar="NAME",
        help="a comparison at another budget beside the pair's main one: its results in real_students_<pair>_NAME "
        "(.json and a folder), its runs named <preset>-NAME-<method>-s<seed>",
    )
    return ap


def arm_overrides(args, cut_sets: list[str]) -> list[str]:
    """Every arm's settings, from the command's flags and (pair B) the cut's: what its results file records."""
    overrides = [*cut_sets, *args.sets]
    if args.budget:  # its own runs: the main comparison's arms stay as they are
        overrides.append(f'run.name="{CONFIG[args.pair]}-{args.budget}"')
    if args.steps:
        overrides.append(f"compare.steps={args.steps}")
    if args.curve_every:
        overrides.append(f"compare.curve_every={args.curve_every}")
    return overrides


def main():
    ap = parser()
    args = ap.parse_args()
    if (args.plateau_probe or args.arithmetic) and args.pair != "B":
        ap.error("--plateau-probe and --arithmetic are pair B's; drop them, or use --pair B")
    if args.humaneval_all and args.pair != "A":
        ap.error("--humaneval-all judges pair A's models; drop it, or use --pair A")
    overrides, result = [], {"made": stamp(), "pair": args.pair, "config": CONFIG[args.pair]}
    stem = f"real_students_{args.pair}" + (f"_{args.budget}" if args.budget else "")
    path, main_path = RESULTS / f"{stem}.json", RESULTS / f"real_students_{args.pair}.json"
    earlier = json.loads(path.read_text()) if args.keep and path.exists() else {}
    if args.finished_only:  # the command that trains the arms is the same without the flag; this run only reports
        result["made"]["command"] = result["made"]["command"].replace(" --finished-only", "")
        result["made"]["reported_only"] = True
    if args.pair == "B":
        # another budget's comparison starts from the cut the main one chose
        kept_cut = earlier.get("cut") or (json.loads(main_path.read_text()).get("cut") if main_path.exists() else None)
        if kept_cut and kept_cut["steps"] == args.choice_steps:
            result["cut"] = kept_cut  # the cuts' runs are deterministic: the same steps choose the same cut
        else:
            result["cut"] = choose_cut(args.home, args.choice_steps, run=not args.finished_only)
        overrides = result["cut"]["tried"][result["cut"]["kept"]]["sets"]
    overrides = arm_overrides(args, overrides)
    result["overrides"] = overrides
    if args.humaneval_all:  # pair A's finished models judged again on every problem, then reported
        judge_humaneval(args.home, overrides, args.humaneval_all)
    out = RESULTS / stem
    os.environ["HPD_HOME"] = args.home
    # each arm in a process of its own: a 0.5B student beside its 1.5B teacher's leftovers does not fit in 24 GB
    compare(CONFIG[args.pair], overrides, out=out, run_missing=not args.finished_only, isolate=True, keep=args.keep)
    results = json.loads((out / "results.json").read_text())
    if args.finished_only:  # which arms the comparison has not finished yet
        cfg = open_run(CONFIG[args.pair], overrides, home=args.home).cfg
        done = {(r["method"], r["seed"]) for r in results}
        result["unfinished"] = [  # in the order the comparison runs them: seed by seed
            f"{m} seed {s}"
            for s in range(cfg.compare.seeds)
            for m in cfg.compare.methods.split(",")
            if (m, s) not in done
        ]
    base = open_run(CONFIG[args.pair], overrides, home=args.home)
    # what the teacher side cost once, for every arm (from the shared stages' manifests)
    result["teacher_side_seconds"] = {
        s: base.manifest(s)["seconds"] for s in ("generate", "score") if s in base.stages and base.manifest(s)
    } or earlier.get("teacher_side_seconds", {})  # every arm kept: no teacher stage ran here
    if args.pair == "A":
        result["humaneval_all"] = all_problems(results)
    result["summary"] = summarise(results, args.pair)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]["methods"], indent=1)[:3000])
    if args.arithmetic:  # each model kept while its key is the same; a finished-only run judges the finished arms
        arith_path = RESULTS / f"{stem}_arithmetic.json"
        kept = json.loads(arith_path.read_text())["models"] if args.keep and arith_path.exists() else {}
        judged = judge_arithmetic(args.home, overrides, args.arithmetic, results, kept)
        judged["summary"] = arithmetic_summary(judged)
        arith_path.write_text(json.dumps(judged, indent=1) + "\n")
        print(json.dumps({k: m["mean"] for k, m in judged["summary"]["methods"].items()}))
    if args.plateau_probe and not args.finished_only:  # kept, like the arms, when its run's settings are the same
        probe_path = RESULTS / f"{stem}_probe.json"
        kept = json.loads(probe_path.read_text())["probes"] if args.keep and probe_path.exists() else []
        probes = [plateau_probe(args.home, overrides, steps, kept) for steps in sorted(set(args.plateau_probe))]
        probe_path.write_text(json.dumps({"made": stamp(), "probes": probes}, indent=1) + "\n")
        print(json.dumps([p["plateau"] for p in probes]))


if __name__ == "__main__":
    main()
