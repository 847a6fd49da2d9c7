"""`hpd compare`: distillation methods x student seeds from one shared teacher cache, and their report.

Each (method, seed) is a run of its own, named <run>-<method>-s<seed>, that adopts the base run's finished
data, teacher, generate and score stages, so the teacher is trained and the cache scored once. Every method
gets the same number of student steps (compare.steps); hpd->opd spends compare.opd_rounds of them in
on-policy rounds (HPD offline first, then OPD on refreshed sequences, as --config hpd-opd).

With `isolate`, each arm runs as `hpd run` in a process of its own: a large student and its teacher leave memory
behind in a process (the models, the allocator's arenas) that the next arm would otherwise start on top of.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hpd.common.errors import HpdError
from hpd.common.settings import Settings

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
) -> Path:
    """Run every (method, seed) arm that is not finished and report them all; with run_missing=False, report the
    finished arms alone and run nothing (a comparison still under way, read so far); with isolate, each arm in a
    process of its own."""
    base = open_run(config_path, overrides)
    cfg = base.cfg
    c = cfg.compare
    methods = compare_methods(cfg)
    shared = [s for s in OFFLINE if s in base.stages]  # no score stage with the teacher online
    if run_missing:
        base.run(until=shared[-1])  # the teacher and the cache, once for every method and seed
    results = []
    for method in methods:
        extra = method_overrides(method, cfg)
        for seed in range(c.seeds):
            name = f"{cfg.run.name}-{slug(method)}-s{seed}"
            arm = [*overrides, *extra, *arm_overrides(cfg, seed, name, first=(method, seed) == (methods[0], 0))]
            r = open_run(config_path, arm)
            if not run_missing:
                if r.state("eval")[0] != "done":
                    log(f"[compare] {method} seed {seed}: not finished, left out")
                    continue
            else:
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
