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
import statistics
import subprocess
import sys
from pathlib import Path

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


def in_own_process(stage: str, config: str | None, sets: list[str], home: Path) -> dict:
    """`stage` run in a fresh Python process (after its run directory was cleared by the caller); its figures."""
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
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
