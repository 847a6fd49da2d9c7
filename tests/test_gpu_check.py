"""The GPU check (bench/gpu_check.sh) runs its CPU-checkable parts here: at CPU size (--small), with the packages a
CUDA image may lack (pyarrow, datasets, zstandard) made unimportable, and it says what it skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("pyarrow", "datasets", "zstandard")


def _run(tmp_path, *args):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "gpu.json"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_gpu_check_at_cpu_size_without_the_storage_packages(tmp_path):
    proc = _run(tmp_path, "--small")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["complete"] is True
    side = r["teacher_side"]
    assert side["response_tokens"] == 2 * 4 * 32  # batches x batch x response positions
    for speed in (side["scored_tokens_per_s"], side["forward_tokens_per_s"]):
        assert speed["rounds"] == 5 and 0 < speed["min"] <= speed["median"] <= speed["max"]
    o = side["overhead_over_forward"]
    assert o["min"] <= o["median"] <= o["max"]
    agree = side["bf16_vs_fp32"]
    assert agree["positions"] == 128 and agree["top1_agreement"] > 0.9 and agree["topk_overlap"] > 0.9
    assert 0 < agree["target_logprob_abs_diff_max"] < 0.5  # bf16 differs from fp32, but not by much
    d = r["distill_bf16"]
    for arm in ("cached", "online"):
        assert d[arm]["tokens_per_s"]["rounds"] == 5 and d[arm]["tokens_per_s"]["median"] > 0
        assert 0 < d[arm]["final_loss"] < 10
    assert d["cached_speedup"] == d["cached"]["tokens_per_s"]["median"] / d["online"]["tokens_per_s"]["median"]
    assert r["teacher"]["architecture"].startswith("Qwen2") and r["student_parameters"] < r["teacher"]["parameters"]
    assert "vllm" in r["skipped"] and "gpu_check: skipped vllm:" in proc.stdout


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "gpu.json").read_text()) == {
        "skipped": {"everything": proc.stdout.splitlines()[0].split("skipped everything: ")[1]}
    }
    assert "no CUDA GPU" in proc.stdout
