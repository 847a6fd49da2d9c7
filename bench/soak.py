"""`make soak`: SIGKILL the whole pipeline at random moments and check that reruns lose nothing.

One uninterrupted reference run (generate -> score -> distill -> refresh-1 -> rescore-1 -> distill-1 -> eval,
small scale) times every stage. Each trial then starts from the same finished teacher, picks a stage in
turn and a random moment inside it (uniform over the stage's reference duration), and kills `hpd run` there
with SIGKILL (HPD_KILL_IN: no cleanup code runs; mid-write, mid-step, mid-checkpoint are all fair game).
The rerun is killed once more, in a random stage from the first one on; a last rerun goes to the end. Every
published output must equal the reference: sequence fingerprints, every cache shard's checksum, the
students' weight digests (so training resumed from its checkpoint without repeating or skipping data) and
the evaluation report. Results: bench/results/soak.{json,md} and the README's reliability section.

    python -m bench.soak [--trials 24] [--seed 0]
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
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HPD = [sys.executable, "-m", "hpd.pipeline.cli"]
# The tiny preset made big enough that every stage has several shards or checkpoints to be killed between (and inside).
SOAK = ['run.name="soak"', "data.train_examples=2400", "generate.num_prompts=1600", "generate.shard_size=200",
        "score.shard_size=100", "distill.steps=30", "distill.checkpoint_steps=6", "rounds.count=1",
        "rounds.steps=18", "rounds.refresh_share=0.25", "refresh.prompt_fraction=0.1", "refresh.shard_size=20",
        "refresh.samples_per_prompt=2", "eval.examples=40", "eval.samples=2"]
KILLED = ("generate", "score", "distill", "refresh-1", "rescore-1", "distill-1", "eval")


def hpd(home: Path, *args: str, kill_in: tuple[str, float] | None = None) -> subprocess.CompletedProcess:
    cmd = [*HPD, *args, "--config", "tiny"]
    for o in SOAK:
        cmd += ["--set", o]
    env = {**os.environ, "HPD_HOME": str(home)}
    env.pop("HPD_KILL_IN", None)
    if kill_in is not None:
        env["HPD_KILL_IN"] = f"{kill_in[0]}:{kill_in[1]:.3f}"
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


def outcome(home: Path) -> dict:
    """Everything a finished run published, reduced to what must not change: content digests."""
    from hpd.storage.logit_cache import LogitCache

    run, out = home / "runs" / "soak", {}
    for name in KILLED:
        m = json.loads((run / name / "manifest.json").read_text())["outputs"]
        if "cache" in m:
            cache_dir = Path(m["cache"].replace("@home", str(home)))
            out[name] = [s["checksum"] for s in LogitCache(cache_dir).manifest["shards"]]
        elif name == "eval":
            out[name] = {who: m["report"][who] for who in ("student", "teacher")}
        else:
            out[name] = m["fingerprint"]
    out["leftovers"] = sorted(str(p.relative_to(home)) for p in home.rglob(".tmp-*"))
    return out


def durations(home: Path) -> dict[str, float]:
    run = home / "runs" / "soak"
    return {name: json.loads((run / name / "manifest.json").read_text())["seconds"] for name in KILLED}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "soak"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="hpd-soak-"))
    try:
        base = scratch / "base"
        assert hpd(base, "run", "--until", "teacher").returncode == 0
        ref = scratch / "ref"
        shutil.copytree(base, ref)
        done = hpd(ref, "run")
        assert done.returncode == 0, done.stderr[-3000:]
        reference, seconds = outcome(ref), durations(ref)
        print("reference stage seconds:", {k: round(v, 1) for k, v in seconds.items()}, flush=True)

        trials = []
        for i in range(args.trials):
            target = KILLED[i % len(KILLED)]
            home = scratch / f"trial-{i}"
            shutil.copytree(base, home)
            kills = []
            # the first kill in the target stage; the second in the rerun, anywhere from there on
            for stage in (target, rng.choice(KILLED[KILLED.index(target):])):
                moment = rng.uniform(0, seconds[stage])
                r = hpd(home, "run", kill_in=(stage, moment))
                if r.returncode != -signal.SIGKILL:  # the stage finished before the moment came
                    assert r.returncode == 0, r.stderr[-3000:]
                    break
                kills.append({"stage": stage, "after_s": round(moment, 2)})
            final = hpd(home, "run")
            assert final.returncode == 0, final.stderr[-3000:]
            got = outcome(home)
            diff = sorted(k for k in reference if got.get(k) != reference[k])
            trials.append({"trial": i, "target": target, "kills": kills, "mismatches": diff})
            print(f"trial {i:2d}: kills {[(k['stage'], k['after_s']) for k in kills]} "
                  f"mismatches {diff or 'none'}", flush=True)
            shutil.rmtree(home)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    kills = [k for t in trials for k in t["kills"]]
    by_stage: dict[str, int] = {}
    for k in kills:
        by_stage[k["stage"]] = by_stage.get(k["stage"], 0) + 1
    summary = {"trials": len(trials), "kills": len(kills), "kills_by_stage": by_stage,
               "trials_matching_reference": sum(not t["mismatches"] for t in trials),
               "outputs_compared_per_trial": len(reference), "mismatched_outputs": sum(len(t["mismatches"])
                                                                                      for t in trials),
               "stage_seconds": seconds, "seed": args.seed, "trials_detail": trials}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    md = ["# Soak: random SIGKILLs through the whole pipeline", "",
          f"{summary['trials']} trials, {summary['kills']} SIGKILLs at random moments (seed {args.seed}); "
          f"after the reruns, {summary['trials_matching_reference']} of {summary['trials']} trials published "
          f"exactly the reference outputs ({summary['outputs_compared_per_trial']} compared per trial: "
          f"sequences, every cache shard's checksum, both students' weights, the evaluation report, and no "
          f"temporaries left). Mismatched outputs: {summary['mismatched_outputs']}.", "",
          "| stage killed in | SIGKILLs |", "|---|---|"]
    md += [f"| {s} | {n} |" for s, n in sorted(by_stage.items(), key=lambda x: KILLED.index(x[0])
                                                  if x[0] in KILLED else 99)]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if summary["mismatched_outputs"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
