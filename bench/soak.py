"""`make soak`: SIGKILL the pipeline at random moments and check that reruns lose nothing.

Each scenario is one command over a prepared home: the whole pipeline (with judge stages), the same with sampled
and with compact caches, a student of a teacher ensemble, `hpd cache merge`, and a GGUF teacher's conversion. One
uninterrupted reference run of each times every stage. Each trial then starts from the scenario's prepared home,
picks one of its stages in turn and a random moment inside it (uniform over the stage's reference duration),
and kills the command there with SIGKILL (HPD_KILL_IN: no cleanup code runs; mid-write, mid-step,
mid-checkpoint are all fair game). The rerun is killed once more, in a random stage from the first one on; a last
rerun goes to the end. Every published output must equal the reference: sequence and value fingerprints, every
cache shard's checksum, the students' and the converted teacher's weight digests (so training resumed from its
checkpoint without repeating or skipping data) and the evaluation report, with no temporaries left behind.
Results: bench/results/soak.{json,md} and the README's reliability section.

    python -m bench.soak [--trials 54] [--seed 0] [--only pipeline,merge]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.provenance import stamp

RESULTS = Path(__file__).resolve().parent / "results"
HPD = [sys.executable, "-m", "hpd.pipeline.cli"]
# The tiny preset made big enough that every stage has several shards or checkpoints to be killed between (and inside).
SOAK = [
    'run.name="soak"',
    "data.train_examples=2400",
    "generate.num_prompts=1600",
    "generate.shard_size=200",
    "score.shard_size=100",
    "distill.steps=30",
    "distill.checkpoint_steps=6",
    "rounds.count=1",
    "rounds.steps=18",
    "rounds.refresh_share=0.25",
    "refresh.prompt_fraction=0.1",
    "refresh.shard_size=20",
    "refresh.samples_per_prompt=2",
    "eval.examples=40",
    "eval.samples=2",
]
JUDGED = ['value.function="verifier"', 'value.judge="generate,refresh"', 'value.weighting="exp"']
OTHER = [*SOAK, 'run.name="soakb"', "teacher.steps=12"]  # a second teacher on the same sequences
ENSEMBLE = [*SOAK, 'teachers.runs="soakb"', 'teachers.mode="ensemble"', 'distill.method="fkl"', 'rounds.method="fkl"']


@dataclass
class Scenario:
    name: str
    prepare: list[list[str]]  # hpd commands that build the home every trial starts from (not killed)
    command: list[str]  # the command killed and rerun
    killed: tuple[str, ...]  # its stages (HPD_KILL_IN names)
    run: str = "soak"  # the run whose stage manifests are compared (none for a merge)


def _run(sets: list[str], *args: str, config: str = "tiny") -> list[str]:
    return [*args, "--config", config, *(a for s in sets for a in ("--set", s))]


SCENARIOS = [
    Scenario(
        "pipeline",
        [_run(SOAK, "run", "--until", "teacher")],
        _run([*SOAK, *JUDGED], "run"),
        ("generate", "judge", "score", "distill", "refresh-1", "rescore-1", "judge-1", "distill-1", "eval"),
    ),
    Scenario(
        "sampled",
        [_run(SOAK, "run", "--until", "generate")],
        _run([*SOAK, 'score.encoding="sampled:4+8"'], "run"),
        ("score", "distill", "rescore-1", "distill-1"),
    ),
    Scenario(
        "compact",
        [_run(SOAK, "run", "--until", "generate")],
        _run([*SOAK, 'score.encoding="compact"'], "run"),
        ("score", "distill", "rescore-1"),
    ),
    Scenario(
        "ensemble",
        [_run(SOAK, "run", "--until", "score"), _run(OTHER, "run", "--until", "score")],
        _run(ENSEMBLE, "run"),
        ("distill", "refresh-1", "rescore-1-soakb", "distill-1"),
    ),
    Scenario(
        "merge",
        [_run(SOAK, "run", "--until", "score"), _run(OTHER, "run", "--until", "score")],
        ["cache", "merge", "{caches}", "--weighting", "confidence"],
        ("cache-merge",),
        run="",
    ),
    Scenario(
        "gguf", [], _run(['run.name="soakg"'], "run", "--until", "teacher", config="smollm2"), ("teacher",), run="soakg"
    ),
]


def hpd(home: Path, args: list[str], kill_in: tuple[str, float] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPD_HOME": str(home)}
    env.pop("HPD_KILL_IN", None)
    if kill_in is not None:
        env["HPD_KILL_IN"] = f"{kill_in[0]}:{kill_in[1]:.3f}"
    return subprocess.run([*HPD, *args], env=env, capture_output=True, text=True, timeout=1800, check=False)


def _command(s: Scenario, home: Path) -> list[str]:
    """The scenario's command; a merge names the prepared home's two caches."""
    if "{caches}" not in s.command:
        return s.command
    caches = sorted(p.name for p in (home / "caches").iterdir() if not p.name.startswith("."))
    i = s.command.index("{caches}")
    return [*s.command[:i], *caches, *s.command[i + 1 :]]


def _merged(home: Path, before: set[str]) -> Path:
    new = [p for p in (home / "caches").iterdir() if not p.name.startswith(".") and p.name not in before]
    assert len(new) == 1, new
    return new[0]


def outcome(s: Scenario, home: Path, before: set[str]) -> dict:
    """Everything the command published, reduced to what must not change: content digests."""
    from hpd.stages.hf_models import model_fingerprints
    from hpd.storage.logit_cache import LogitCache

    out = {}
    if not s.run:  # a merge: the new cache's shards
        out["merged"] = [x["checksum"] for x in LogitCache(_merged(home, before)).manifest["shards"]]
    for name in s.killed if s.run else ():
        m = json.loads((home / "runs" / s.run / name / "manifest.json").read_text())["outputs"]
        if "cache" in m:
            out[name] = [
                x["checksum"] for x in LogitCache(Path(m["cache"].replace("@home", str(home)))).manifest["shards"]
            ]
        elif name == "eval":
            out[name] = {who: m["report"][who] for who in ("student", "teacher")}
        elif name == "teacher":  # the converted GGUF teacher's files, by content
            out[name] = model_fingerprints(Path(m["model_dir"].replace("@home", str(home))))
        else:
            out[name] = m["fingerprint"]
    out["leftovers"] = sorted(str(p.relative_to(home)) for p in home.rglob(".tmp-*"))
    return out


def _caches(home: Path) -> set[str]:
    return {p.name for p in (home / "caches").iterdir()} if (home / "caches").is_dir() else set()


def reference(s: Scenario, scratch: Path) -> tuple[Path, dict, dict[str, float]]:
    """(the prepared home, the uninterrupted outcome, seconds per killed stage)."""
    base = scratch / f"{s.name}-base"
    for args in s.prepare:
        r = hpd(base, args)
        assert r.returncode == 0, r.stderr[-3000:]
    base.mkdir(parents=True, exist_ok=True)
    ref = scratch / f"{s.name}-ref"
    shutil.copytree(base, ref)
    before = _caches(ref)
    done = hpd(ref, _command(s, ref))
    assert done.returncode == 0, done.stderr[-3000:]
    if s.run:
        seconds = {n: json.loads((ref / "runs" / s.run / n / "manifest.json").read_text())["seconds"] for n in s.killed}
    else:  # a command, not a stage (no manifest): the merge itself timed here, on another copy
        seconds = {s.killed[0]: _merge_seconds(base, scratch / f"{s.name}-timed")}
    return base, outcome(s, ref, before), seconds


def _merge_seconds(base: Path, copy: Path) -> float:
    from hpd.storage.logit_cache import CacheRoot
    from hpd.storage.merge import merge

    shutil.copytree(base, copy)
    root = CacheRoot(copy / "caches")
    caches = [root.open(c) for c in sorted(_caches(copy)) if not c.startswith(".")]
    t0 = time.perf_counter()
    merge(caches, [1.0] * len(caches), root, max(c.k for c in caches), weighting="confidence")
    return time.perf_counter() - t0


def trial(s: Scenario, base: Path, home: Path, target: str, seconds: dict, rng: random.Random) -> tuple[list, dict]:
    shutil.copytree(base, home)
    before, command = _caches(home), _command(s, home)  # (once: a finished merge adds a cache)
    kills = []
    # the first kill in the target stage; the second in the rerun, anywhere from there on
    for stage in (target, rng.choice(s.killed[s.killed.index(target) :])):
        moment = rng.uniform(0, seconds[stage])
        r = hpd(home, command, kill_in=(stage, moment))
        if r.returncode != -signal.SIGKILL:  # the stage finished before the moment came
            assert r.returncode == 0, r.stderr[-3000:]
            break
        kills.append({"stage": stage, "after_s": round(moment, 2)})
    final = hpd(home, command)
    assert final.returncode == 0, final.stderr[-3000:]
    return kills, outcome(s, home, before)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=54)  # 9 rounds of the 6 scenarios: every stage a target
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "soak"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    # trials go round the scenarios in turn, and round each scenario's stages: every scenario gets its share of
    # trials however many stages it has, and every stage of it is a target
    targets = [(s, s.killed[i % len(s.killed)]) for i in range(args.trials) for s in chosen][: args.trials]
    scratch = Path(tempfile.mkdtemp(prefix="hpd-soak-"))
    trials, references = [], {}
    try:
        for s in chosen:
            references[s.name] = reference(s, scratch)
            print(
                f"{s.name}: reference stage seconds",
                {k: round(v, 1) for k, v in references[s.name][2].items()},
                flush=True,
            )
        for i in range(args.trials):
            s, target = targets[i]
            base, expected, seconds = references[s.name]
            home = scratch / f"trial-{i}"
            kills, got = trial(s, base, home, target, seconds, rng)
            diff = sorted(k for k in expected if got.get(k) != expected[k])
            trials.append(
                {
                    "trial": i,
                    "scenario": s.name,
                    "target": target,
                    "kills": kills,
                    "mismatches": diff,
                    "outputs_compared": len(expected),
                }
            )
            print(
                f"trial {i:2d} {s.name}: kills {[(k['stage'], k['after_s']) for k in kills]} "
                f"mismatches {diff or 'none'}",
                flush=True,
            )
            shutil.rmtree(home)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write(trials, references, chosen, args)


def write(trials: list[dict], references: dict, chosen: list[Scenario], args) -> None:
    by: dict[tuple[str, str], int] = {}
    for t in trials:
        for k in t["kills"]:
            by[(t["scenario"], k["stage"])] = by.get((t["scenario"], k["stage"]), 0) + 1
    kills = sum(by.values())
    summary = {
        "made": stamp(),
        "trials": len(trials),
        "kills": kills,
        "kills_by_scenario": {s.name: sum(n for (sc, _), n in by.items() if sc == s.name) for s in chosen},
        "kills_by_stage": {f"{sc}/{st}": n for (sc, st), n in by.items()},
        "trials_matching_reference": sum(not t["mismatches"] for t in trials),
        "mismatched_outputs": sum(len(t["mismatches"]) for t in trials),
        "stage_seconds": {name: r[2] for name, r in references.items()},
        "seed": args.seed,
        "trials_detail": trials,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    md = [
        "# Soak: random SIGKILLs through the pipeline, merges and GGUF conversion",
        "",
        f"{summary['trials']} trials, {kills} SIGKILLs at random moments (seed {args.seed}); after the reruns, "
        f"{summary['trials_matching_reference']} of {summary['trials']} trials published exactly the reference "
        f"outputs. Mismatched outputs: {summary['mismatched_outputs']}.",
        "",
        "| scenario | stage killed in | SIGKILLs |",
        "|---|---|---|",
    ]
    for s in chosen:
        md += [f"| {s.name} | {st} | {by[(s.name, st)]} |" for st in s.killed if (s.name, st) in by]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if summary["mismatched_outputs"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
