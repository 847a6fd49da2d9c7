"""`make distill` as a newcomer runs it: a fresh clone of this repository's HEAD, install included, timed.

    python -m bench.fresh_clone

Writes bench/results/fresh_clone.json (wall seconds, the install's share, what it printed). pip's download
cache is whatever this machine has, as it is for a newcomer's second project; a machine that never
downloaded the pinned wheels spends longer in the install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.provenance import stamp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "fresh_clone.json"


def main():
    work = Path(tempfile.mkdtemp(prefix="hpd-fresh-"))
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work / "hpd")], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "HPD_HOME")}
    t0 = time.time()
    install = subprocess.run(["make", "venv"], cwd=work / "hpd", env=env, capture_output=True, text=True)
    installed = time.time() - t0
    run = subprocess.run(["make", "distill"], cwd=work / "hpd", env=env, capture_output=True, text=True)
    total = time.time() - t0
    if install.returncode or run.returncode:
        raise SystemExit(f"make failed:\n{install.stderr[-2000:]}\n{run.stderr[-2000:]}")
    printed = run.stdout[run.stdout.index("\nmodel") :].strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {
        "made": stamp(),
        "commit": commit.strip(),
        "cpus": os.cpu_count(),
        "install_seconds": round(installed, 1),
        "make_distill_seconds": round(total, 1),
        "printed": printed,
        "stage_seconds": {
            m.group(1): float(m.group(2)) for m in re.finditer(r"^\[(\S+)\] done in ([\d.]+)s", run.stdout, re.M)
        },
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(printed)
    print(f"fresh clone: install {installed:.0f}s, make distill in all {total:.0f}s; written to {OUT}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
