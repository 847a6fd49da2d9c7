"""Benchmark of the embedded default: `make teacher-cache` from nothing, and the task's difficulty.

Writes bench/results/default_task.json and prints a summary. It measures
  - wall time of every stage of a from-scratch teacher-cache run, and of a second, up-to-date run;
  - the teacher's held-out accuracy and mean next-token entropy on response tokens;
  - the cache's size (bytes per scored token);
  - students 5-10x smaller than the teacher trained by plain SFT on the teacher's budget (same steps, batch
    and data), over several seeds: the task must leave them clearly below the teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.graph import build  # noqa: E402
from pipeline.stage import Context, Runner  # noqa: E402


def student_sft(teacher_out: dict, data_out: dict, tcfg: dict, n_layer: int, n_embd: int, seed: int, workdir: Path):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2Config

    from stages import modeling
    from stages.evaluators import encode_example, heldout_report
    from stages.training import train_causal_lm

    tok = AutoTokenizer.from_pretrained(teacher_out["model_dir"])
    rows = [json.loads(x) for x in open(data_out["train"])]
    seqs = [encode_example(tok, r["prompt"], r["response"]) for r in rows]
    tconf = GPT2Config.from_pretrained(teacher_out["model_dir"])
    torch.manual_seed(seed)
    model = modeling.new_gpt2(tok, n_positions=tconf.n_positions, n_layer=n_layer, n_embd=n_embd,
                              n_head=max(1, n_embd // 32))
    ds = Dataset.from_dict({"input_ids": [s[0] for s in seqs], "prompt_len": [s[1] for s in seqs]})
    t0 = time.time()
    train_causal_lm(model, tok, ds, workdir / f"student-{seed}", steps=tcfg["steps"], batch_size=tcfg["batch_size"],
                    learning_rate=tcfg["learning_rate"], warmup_steps=tcfg["warmup_steps"], seed=seed,
                    save_steps=10 ** 9)
    model.eval()
    from stages.tasks import TASKS

    report = heldout_report(model, tok, data_out["heldout"], tcfg["eval_examples"], TASKS["math"])
    return {"seed": seed, "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(time.time() - t0, 1), **report}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3, help="student seeds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "default_task.json"))
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="hpd-bench-"))
    cfg = config_mod.load(None, [])
    runner = Runner(build(cfg), cfg, Context(home=home, run_name="bench", seed=cfg["run"]["seed"]))
    t0 = time.time()
    runner.run()
    cold = time.time() - t0
    t0 = time.time()
    Runner(build(cfg), cfg, Context(home=home, run_name="bench", seed=cfg["run"]["seed"], log=lambda s: None)).run()
    warm = time.time() - t0
    m = {s: runner.manifest(s) for s in runner.order}
    teacher = m["teacher"]["outputs"]
    score = m["score"]["outputs"]
    students = [student_sft(teacher, m["data"]["outputs"], cfg["teacher"], 2, 64, seed, home)
                for seed in range(args.seeds)]
    accs = [s["heldout_accuracy"] for s in students]
    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()},
        "config": cfg,
        "stage_seconds": {s: m[s]["seconds"] for s in runner.order},
        "teacher_cache_cold_seconds": round(cold, 1), "teacher_cache_warm_seconds": round(warm, 2),
        "teacher": teacher["report"],
        "distilled_student": m["distill"]["outputs"]["report"],
        "cache": {k: score[k] for k in ("top_k", "sequences", "tokens", "bytes", "bytes_per_token")},
        "sft_student_same_budget": {
            "parameters": students[0]["parameters"],
            "size_ratio": round(teacher["report"]["parameters"] / students[0]["parameters"], 1),
            "heldout_accuracy_mean": statistics.mean(accs), "heldout_accuracy_min": min(accs),
            "heldout_accuracy_max": max(accs),
            "response_entropy_nats_mean": statistics.mean(s["response_entropy_nats"] for s in students),
            "runs": students},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    t, st = result["teacher"], result["sft_student_same_budget"]
    print(f"stages (s): {result['stage_seconds']}  cold {cold:.0f}s, warm {warm:.1f}s")
    print(f"teacher: {t['parameters'] / 1e6:.2f}M params, held-out accuracy {t['heldout_accuracy']:.1%}, "
          f"response entropy {t['response_entropy_nats']:.3f} nats")
    print(f"cache: {score['tokens']:,} tokens, {score['bytes_per_token']} bytes/token (k={score['top_k']})")
    print(f"SFT student ({st['size_ratio']}x smaller), {args.seeds} seeds: accuracy mean {st['heldout_accuracy_mean']:.1%} "
          f"(min {st['heldout_accuracy_min']:.1%}, max {st['heldout_accuracy_max']:.1%})")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
