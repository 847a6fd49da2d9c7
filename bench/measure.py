"""Run one stage in a process of its own and write what it measured of itself (seconds, memory) as JSON:
the benches' way to time a stage apart (peak memory is a per-process figure).

    python -m bench.measure distill --config smollm2 --set distill.steps=10 --home work --out figures.json

The stage runs through the public API (`hpd.open_run`) with an observer; the stage's figures reach the
observer, never the run's artifacts, so measuring changes no result.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from hpd import open_run

ROOT = Path(__file__).resolve().parent.parent


def paired_summary(rows: list[dict], reference: str, metrics) -> dict:
    """Per arm and metric: mean and sd over seeds, and the arm minus `reference` paired by seed (mean, sd, seeds,
    and on how many seeds the arm is better: higher accuracy / avg@k, lower everything else)."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = {r["seed"]: r for r in rows if r["arm"] == arm}
        ref = {r["seed"]: r for r in rows if r["arm"] == reference}
        out[arm] = {}
        for k in metrics:
            values = [mine[s][k] for s in sorted(mine)]
            d = [mine[s][k] - ref[s][k] for s in sorted(mine) if s in ref]
            higher = k == "accuracy" or k.startswith("avg@")
            out[arm][k] = {
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "minus_reference": {
                    "mean": statistics.mean(d),
                    "sd": statistics.stdev(d) if len(d) > 1 else 0.0,
                    "better": sum((x > 0) if higher else (x < 0) for x in d),
                    "seeds": len(d),
                },
            }
    return out


class Measured(dict):
    """An observer for open_run: stage name -> the figures it measured."""

    def __call__(self, stage: str, figures: dict) -> None:
        self.setdefault(stage, {}).update(figures)


class DoesNotFit(Exception):
    """The stage's process outgrew its memory cap (or the kernel's OOM killer ended it): the figure is that it does
    not fit, with the resident memory it had reached."""

    def __init__(self, peak_rss_mb: float, cap_mb: float | None):
        super().__init__(f"needed more than {cap_mb or 'the machine'} MB (reached {peak_rss_mb:.0f} MB)")
        self.peak_rss_mb, self.cap_mb = peak_rss_mb, cap_mb


def in_own_process(stage: str, config: str | None, sets: list[str], home: Path, memory_cap_mb: float | None = None):
    """`stage` run in a fresh Python process (after its run directory was cleared by the caller); its figures. With
    memory_cap_mb, the process is watched and killed once its resident memory passes the cap (DoesNotFit): a cap a
    little under the machine's memory keeps the kernel's OOM killer away from everything else."""
    out = Path(home) / f".measure-{os.getpid()}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.measure",
        stage,
        "--home",
        str(home),
        "--out",
        str(out),
        *(["--config", config] if config else []),
        *[a for s in sets for a in ("--set", s)],
    ]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched, peak = psutil.Process(child.pid), 0.0
    while child.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        if memory_cap_mb and peak > memory_cap_mb:
            child.kill()
            child.wait()
            raise DoesNotFit(peak, memory_cap_mb)
        time.sleep(0.1)
    if child.wait() == -signal.SIGKILL:  # the kernel's OOM killer
        raise DoesNotFit(peak, memory_cap_mb)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    figures = json.loads(out.read_text())
    out.unlink()
    return figures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("--config")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--home", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    measured = Measured()
    open_run(args.config, args.sets, home=args.home, log=lambda s: None, observers=[measured]).run(args.stage)
    Path(args.out).write_text(json.dumps(measured.get(args.stage, {})))


if __name__ == "__main__":
    main()
