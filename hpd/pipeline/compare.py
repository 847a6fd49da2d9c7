"""`hpd compare`: distillation methods x student seeds from one shared teacher cache, and their report.

Each (method, seed) is a run of its own, named <run>-<method>-s<seed>, that adopts the base run's finished
data, teacher, generate and score stages, so the teacher is trained and the cache scored once. Every method
gets the same number of student steps (compare.steps); hpd->opd spends compare.opd_rounds of them in
on-policy rounds (HPD offline first, then OPD on refreshed sequences, as --config hpd-opd).

With `isolate`, each arm runs as `hpd run` in a process of its own: a large student and its teacher leave memory
behind in a process (the models, the allocator's arenas) that the next arm would otherwise start on top of.

With `keep`, an arm the report directory's results.json already holds is taken from it and not run again, where
its record's `arm_key` is the arm's own now (every stage's config fingerprint: its settings, the seed, the stage's
VERSION, the same test by which a run decides a stage is done). A comparison too long for one machine's session
then grows across sessions or machines from its report alone, the runs' directories gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hpd.common.errors import HpdError
from hpd.common.settings import Settings
from hpd.storage.fingerprint import digest

from .config import compare_methods
from .report import compare_report, training_logs
from .runs import open_run

OFFLINE = ["data", "teacher", "generate", "score"]


def slug(method: str) -> str:
    return method.replace("->", "-to-").replace("+", "-")


def method_overrides(method: str, cfg: Settings) -> list[str]:
    c = cfg.compare
    if method == "hpd->opd":
        first = c.steps - c.opd_rounds * cfg.rounds.steps
        return [
            'distill.method="hpd"',
            f"distill.steps={first}",
            f"rounds.count={c.opd_rounds}",
            'rounds.method="opd"',
            'rounds.offline_method="hpd"',
            'distill.baseline=""',
        ]
    # every method is a run of its own (sft among them): no run trains a baseline student beside it
    return [f'distill.method="{method}"', f"distill.steps={c.steps}", "rounds.count=0", 'distill.baseline=""']


def arm_overrides(cfg: Settings, seed: int, name: str, first: bool) -> list[str]:
    """What makes one (method, seed) run of a comparison besides its method: its seed, curve, name, and whether it
    judges the teacher (once, in the first run; never where the config says eval.teacher = false)."""
    return [
        f"distill.seed={seed}",
        f"distill.curve_every={cfg.compare.curve_every}",
        f"eval.teacher={'true' if cfg.eval.teacher and first else 'false'}",
        f'run.name="{name}"',
    ]


def arm_key(run) -> str:
    """What an arm's figures depend on, as a run judges its stages' work: every stage's config fingerprint."""
    return digest({name: run.config_fingerprint(name) for name in run.stages})


def reported_arms(out: Path | None) -> dict:
    """{(method, seed): record} of an earlier report's results.json in `out` (none there: empty)."""
    path = out / "results.json" if out else None
    if path is None or not path.is_file():
        return {}
    return {(r["method"], r["seed"]): r for r in json.loads(path.read_text()) if "arm_key" in r}


def run_apart(config_path, overrides: list[str], home: Path) -> None:
    """`hpd run` with these settings in a process of its own (its output is this process's)."""
    cmd = [sys.executable, "-m", "hpd.pipeline.cli", "run", *(["--config", str(config_path)] if config_path else [])]
    cmd += [a for o in overrides for a in ("--set", o)]
    rc = subprocess.run(cmd, env={**os.environ, "HPD_HOME": str(home)}).returncode
    if rc:
        raise HpdError(f"an arm's `hpd run` failed (exit {rc}); rerun the comparison: it resumes where it stopped")


def compare(
    config_path,
    overrides: list[str],
    out: Path | None = None,
    log=print,
    run_missing: bool = True,
    isolate: bool = False,
    keep: bool = False,
) -> Path:
    """Run every (method, seed) arm that is not finished and report them all; with run_missing=False, report the
    finished arms alone and run nothing (a comparison still under way, read so far); with isolate, each arm in a
    process of its own; with keep, the arms of an earlier report in `out` are kept where their settings are the
    same (module docstring)."""
    base = open_run(config_path, overrides)
    cfg = base.cfg
    c = cfg.compare
    methods = compare_methods(cfg)
    shared = [s for s in OFFLINE if s in base.stages]  # no score stage with the teacher online
    reported = reported_arms(out) if keep else {}
    cache_made = False
    results = []
    # seed by seed, every method of a seed before the next seed: a comparison stopped midway holds whole seeds,
    # each a complete paired block
    for seed in range(c.seeds):
        for method in methods:
            extra = method_overrides(method, cfg)
            name = f"{cfg.run.name}-{slug(method)}-s{seed}"
            arm = [*overrides, *extra, *arm_overrides(cfg, seed, name, first=(method, seed) == (methods[0], 0))]
            r = open_run(config_path, arm)
            done, earlier = r.state("eval")[0] == "done", reported.get((method, seed))
            if not done and earlier and earlier["arm_key"] == arm_key(r):
                log(f"[compare] {method} seed {seed}: kept from the earlier report (the same settings)")
                results.append(earlier)
                continue
            if done:  # finished in this home (its stages judged against these settings): nothing to run
                log(f"[compare] {method} seed {seed}: finished in {name}")
            elif not run_missing:
                log(f"[compare] {method} seed {seed}: not finished, left out")
                continue
            else:
                if not cache_made:  # the teacher and the cache, once for every method and seed
                    base.run(until=shared[-1])
                    cache_made = True
                r.adopt(cfg.run.name, shared)
                log(f"[compare] {method} seed {seed}: run {name}{' (a process of its own)' if isolate else ''}")
                if isolate:
                    run_apart(config_path, arm, base.ctx.home)
                    r = open_run(config_path, arm)  # what the other process finished
                else:
                    r.run()
            distills = r.student_stages()
            results.append(
                {
                    "method": method,
                    "seed": seed,
                    "run": name,
                    "arm_key": arm_key(r),
                    "eval": r.outputs("eval").report,
                    "student": r.outputs(distills[-1]).report,
                    # the student stages' own seconds (training and their held-out report), from the manifests
                    "train_seconds": sum(r.manifest(s)["seconds"] for s in distills),
                    "log": training_logs(r),
                }
            )
    out = out or base.ctx.home / "compare" / cfg.run.name
    title = f"{cfg.run.name}: {len(methods)} methods x {c.seeds} seeds, {c.steps} student steps each, one shared cache"
    return compare_report(results, out, title)
