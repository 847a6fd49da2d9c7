"""The two other environments hpd supports, built from scratch and tested: the oldest supported transformers
(constraints/oldest.txt, what `make test-compat` installs) and the optional vLLM extra (`pip install -e '.[vllm]'`).

    python -m bench.versions [--skip-vllm]

For each: a fresh virtual environment in a temporary directory, the install timed, its size on disk, `pip check`,
the versions it resolved, then the whole suite in it (its pass and skip counts and time). The vLLM extra is
installed with `pip --isolated` (this machine's pip configuration is ignored), so torch comes from PyPI, the CUDA
build a GPU machine gets: beside this machine's local CPU build PyPI's torchvision (which vLLM requires) fails to
load. Writes bench/results/versions.json; bench/readme.py puts the figures in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.provenance import stamp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "versions.json"


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def environment(venv: Path, install: list[str], env: dict) -> dict:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    t0 = time.time()
    subprocess.run(
        [*pip, "install", "--quiet", "--disable-pip-version-check", *install],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds = time.time() - t0
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, env=env)
    versions = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, json; print(json.dumps("
            "{p: m.version(p) for p in ('torch', 'transformers', 'numpy', 'tokenizers')"
            " + (('vllm',) if any(d.metadata['Name'] == 'vllm' for d in m.distributions()) else ())}))",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    t0 = time.time()
    suite = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    tail = suite.stdout.strip().splitlines()[-1] if suite.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    skips = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", suite.stdout)))
    return {
        "install_seconds": round(seconds, 1),
        "size_bytes": du_bytes(venv),
        "pip_check": check.stdout.strip(),
        "versions": json.loads(versions.stdout),
        "suite_seconds": round(time.time() - t0, 1),
        "suite": counts,
        "suite_exit": suite.returncode,
        "skip_reasons": skips,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "HPD_HOME")}
    work = Path(tempfile.mkdtemp(prefix="hpd-versions-"))
    result = {"machine": {"cpus": os.cpu_count()}}
    try:
        result["oldest"] = environment(work / "oldest", ["-e", ".[test]", "-c", "constraints/oldest.txt"], env)
        print("oldest:", json.dumps(result["oldest"]), flush=True)
        if not args.skip_vllm:
            isolated = {k: v for k, v in env.items() if not k.startswith("PIP_")}
            cert = ["--cert", env["PIP_CERT"]] if env.get("PIP_CERT") else []  # (--isolated ignores PIP_CERT)
            result["vllm"] = environment(work / "vllm", ["--isolated", *cert, "-e", ".[vllm,test]"], isolated)
            print("vllm:", json.dumps(result["vllm"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["made"] = stamp()
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
