"""What every results file records of how it was made: the commit, the machine and the command."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git here (a bare CUDA image running bench/gpu_check.sh): the commit is left blank
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _commit() -> str:
    return _git("rev-parse", "--short=12", "HEAD") + ("-dirty" if _git("status", "--porcelain", "--", "hpd") else "")


# Taken once, when a bench imports this module (as it starts): the code it loaded. A file written hours later would
# otherwise name whatever the checkout held by then (a commit made, or an edit begun, while the bench ran).
COMMIT_AT_START = _commit()


def stamp() -> dict:
    with open("/proc/meminfo") as f:
        memory_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {
        "commit": COMMIT_AT_START,
        "machine": {
            "cores": os.cpu_count(),
            "memory_gb": round(memory_kb / 2**20, 1),
            "cpu": cpu,
            "python": platform.python_version(),
        },
        "command": " ".join(["python -m", _module(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }


def _module() -> str:
    """The module the bench was run as (`bench.real_students`), from the running script's path in the repository."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or not script.is_relative_to(ROOT):
        return "?"
    return ".".join(script.relative_to(ROOT).with_suffix("").parts)
