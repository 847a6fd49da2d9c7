"""The GPU figures hpd's README quotes, measured in one go on a machine with one CUDA GPU and no network.

    bench/gpu_check.sh [OUT.json]     (or python -m bench.gpu_check --out OUT.json; --small: a CPU-sized run)

It needs torch and transformers only (what a CUDA image has): the part of hpd it runs, the teacher pass's
arithmetic (hpd/stages/cache_rows.py), the losses, the response-position head and the cache's in-memory batch, imports
nothing else (tests/test_gpu_check.py runs it with pyarrow, datasets and zstandard blocked). Parts:

1. teacher side, bf16, on a randomly initialised model of a current architecture (Qwen2 at the 0.5B shape, its
   151,936-token vocabulary): forward-only and scored response tokens/s, the scoring overhead over the forward,
   and the bf16 cache's agreement with an fp32 teacher's on a slice (top-1, top-k overlap, target log-prob);
2. distillation in bf16 autocast (fkl, student logits at response positions only): tokens/s and peak memory,
   from the cached targets (no teacher in memory) against the teacher online (its forward every step);
3. the vLLM engine against the transformers engine (scoring agreement and tokens/s), where vLLM imports.
Anything skipped is said in one line, and in the JSON under "skipped".
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.provenance import stamp
from hpd.stages import heads
from hpd.stages.cache_rows import Timer, score_batch
from hpd.stages.losses import CachedTargets, TeacherLogits, distill_loss, response_positions
from hpd.storage.cache_batch import ScoredSequence, grid_batch

OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"
QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
)
SCALE = {  # shapes and counts: the real check, and a CPU-sized one for the test
    "gpu": dict(
        teacher=QWEN2_05B,
        student=dict(
            hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2
        ),
        seq_len=1024,
        prompt_len=256,
        batch=16,
        batches=6,
        agree_batches=1,
        steps=12,
        top_k=64,
    ),
    "small": dict(
        teacher=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        ),
        student=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
        ),
        seq_len=48,
        prompt_len=16,
        batch=4,
        batches=2,
        agree_batches=1,
        steps=3,
        top_k=16,
    ),
}


def qwen2(shape: dict, vocab: int, device, dtype, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**{**shape, "vocab_size": vocab}, max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():  # sharper than the default initialisation: distributions far from uniform
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sequences(s: dict, vocab: int, n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (s["seq_len"],), generator=g).numpy() for _ in range(n)]


def teacher_side(teacher, s: dict, device) -> tuple[dict, list]:
    """Forward-only and scored throughput, and the scored rows of every batch (the training targets)."""
    seqs = sequences(s, teacher.config.vocab_size, s["batch"] * s["batches"], seed=1)
    plens = [s["prompt_len"]] * len(seqs)
    response = (s["seq_len"] - s["prompt_len"]) * s["batch"]
    batches = [seqs[i * s["batch"] : (i + 1) * s["batch"]] for i in range(s["batches"])]
    with torch.no_grad():  # warm-up (kernels, allocator)
        score_batch(teacher, batches[0], plens[: s["batch"]], top_k=s["top_k"], temperature=1.0, pad_id=0)
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            ids = torch.stack([torch.from_numpy(x) for x in b]).to(device)
            teacher(input_ids=ids).logits
        sync(device)
        forward = time.perf_counter() - t0
    timer, rows = Timer(), []
    t0 = time.perf_counter()
    for b in batches:
        rows.append(score_batch(teacher, b, plens[: len(b)], top_k=s["top_k"], temperature=1.0, pad_id=0, timer=timer))
    sync(device)
    scored = time.perf_counter() - t0
    n = response * s["batches"]
    return {
        "response_tokens": n,
        "forward_tokens_per_s": n / forward,
        "scored_tokens_per_s": n / scored,
        "overhead_over_forward": scored / forward - 1,
        "phases_seconds": dict(timer),
    }, list(zip(batches, rows))


def agreement(fast: list[dict], exact: list[dict]) -> dict:
    """How far a bf16 teacher's cache rows are from an fp32 teacher's (same weights)."""
    top1, overlap, diff = [], [], []
    for a, b in zip(fast, exact):
        ia, ib = torch.as_tensor(a["topk_ids"]), torch.as_tensor(b["topk_ids"])
        top1.append((ia[:, 0] == ib[:, 0]).float())
        overlap.append(torch.tensor([len(set(x.tolist()) & set(y.tolist())) / ia.shape[1] for x, y in zip(ia, ib)]))
        diff.append((torch.as_tensor(a["target_logprob"]) - torch.as_tensor(b["target_logprob"])).abs())
    top1, overlap, diff = torch.cat(top1), torch.cat(overlap), torch.cat(diff)
    return {
        "positions": len(top1),
        "top1_agreement": top1.mean().item(),
        "topk_overlap": overlap.mean().item(),
        "target_logprob_abs_diff_mean": diff.mean().item(),
        "target_logprob_abs_diff_max": diff.max().item(),
    }


def training_batch(batch: list, rows: list[dict], k: int, device):
    ids = torch.stack([torch.from_numpy(x) for x in batch]).to(device)
    labels = ids.clone()
    labels[
        :, : rows[0]["start"] + 1
    ] = -100  # the prompt (row "start" is the position predicting the first response token)
    scored = [ScoredSequence(seq_id=i, input_ids=None, crc=0, **r) for i, r in enumerate(rows)]
    return ids, labels, grid_batch(scored, k, length=ids.shape[1]).to(device)


def distill_steps(student, data: list, s: dict, device, teacher=None) -> dict:
    """`steps` optimizer steps of fkl in bf16 autocast from the cached rows, or (teacher given) its logits online."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    reset_peak(device)
    tokens, t0 = 0, None
    for step in range(s["steps"] + 1):  # step 0 warms up and is not timed
        if step == 1:
            sync(device)
            t0 = time.perf_counter()
        ids, labels, cache = data[step % len(data)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if teacher is None:
                signal = CachedTargets(cache)
            else:
                with torch.no_grad():
                    signal = TeacherLogits(teacher(input_ids=ids).logits)
            with heads.head_only_at(student, response_positions(labels)):
                logits = student(input_ids=ids).logits
        loss, diag = distill_loss("fkl", logits, labels, teacher=signal)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += diag["tokens"] if step else 0
    sync(device)
    return {
        "tokens_per_s": tokens / (time.perf_counter() - t0),
        "peak_memory_mb": peak_mb(device),
        "steps": s["steps"],
        "final_loss": loss.item(),
    }


def save_for_vllm(teacher, skipped: dict) -> Path | None:
    """The random teacher saved with a word-level tokenizer for its ids, for vLLM to load (None: vLLM cannot run)."""
    from hpd.stages import vllm_engine

    reason = vllm_engine.unavailable()
    if reason:
        skipped["vllm"] = reason
        return None
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    out = Path(tempfile.mkdtemp(prefix="hpd-gpu-check-"))
    vocab = {f"t{i}": i for i in range(teacher.config.vocab_size)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0",
        pad_token="t0",
        eos_token="t1",
    )
    teacher.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def vllm_part(model_dir: Path, batches_rows: list, s: dict) -> dict:
    """vLLM's scoring of the same sequences: throughput, and agreement with the transformers engine's rows."""
    from hpd.stages import vllm_engine

    llm = vllm_engine.load(str(model_dir), scoring=True, top_k=s["top_k"])
    seqs = [x for b, _ in batches_rows for x in b]
    plens = [s["prompt_len"]] * len(seqs)
    vllm_engine.score(llm, seqs[: s["batch"]], plens[: s["batch"]], top_k=s["top_k"], temperature=1.0)  # warm-up
    t0 = time.perf_counter()
    rows = vllm_engine.score(llm, seqs, plens, top_k=s["top_k"], temperature=1.0)
    seconds = time.perf_counter() - t0
    n = sum(len(r["target_logprob"]) for r in rows)
    return {
        "scored_tokens_per_s": n / seconds,
        "agreement_with_transformers": agreement(rows, [r for _, rs in batches_rows for r in rs]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--small", action="store_true", help="CPU-sized models and counts (the test's run)")
    args = ap.parse_args()
    s = SCALE["small" if args.small else "gpu"]
    skipped: dict[str, str] = {}
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        skipped["everything"] = "no CUDA GPU here (torch.cuda.is_available() is False); run it on the GPU machine"
        result = {"skipped": skipped}
    else:
        device = torch.device("cuda" if cuda else "cpu")
        t_start = time.perf_counter()
        vocab = s["teacher"]["vocab_size"]
        teacher = qwen2(s["teacher"], vocab, device, torch.bfloat16, seed=0)
        params = sum(p.numel() for p in teacher.parameters())
        side, batches_rows = teacher_side(teacher, s, device)
        # the same weights in fp32, on a slice: how much the bf16 cache differs from an fp32 teacher's
        exact_teacher = qwen2(s["teacher"], vocab, device, torch.float32, seed=0)
        bf16_rows, fp32_rows = [], []
        for batch, rows in batches_rows[: s["agree_batches"]]:
            bf16_rows += rows
            fp32_rows += score_batch(
                exact_teacher, batch, [s["prompt_len"]] * len(batch), top_k=s["top_k"], temperature=1.0, pad_id=0
            )
        side["bf16_vs_fp32"] = agreement(bf16_rows, fp32_rows)
        del exact_teacher
        data = [training_batch(b, rows, s["top_k"], device) for b, rows in batches_rows]
        student = qwen2(s["student"], vocab, device, torch.float32, seed=1).train()
        online = distill_steps(student, data, s, device, teacher=teacher)
        vllm_dir = save_for_vllm(teacher, skipped) if cuda else None
        if not cuda:
            skipped["vllm"] = "no CUDA GPU (the --small run)"
        del teacher, student
        student = qwen2(s["student"], vocab, device, torch.float32, seed=1).train()
        cached = distill_steps(student, data, s, device)
        student_parameters = sum(p.numel() for p in student.parameters())
        del student, data
        vllm = None
        if vllm_dir is not None:  # last, with this process's GPU memory given back: vLLM takes most of the GPU
            gc.collect()
            torch.cuda.empty_cache()
            try:
                vllm = vllm_part(vllm_dir, batches_rows, s)
            except Exception as e:  # noqa: BLE001 - the other figures stand; say what stopped vLLM
                skipped["vllm"] = f"vLLM failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        result = {
            "made": stamp(),
            "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "versions": {
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "python": platform.python_version(),
            },
            "teacher": {
                "architecture": "Qwen2 (random init)",
                "parameters": params,
                "dtype": "bfloat16",
                **s["teacher"],
            },
            "student_parameters": student_parameters,
            "sequence": {"length": s["seq_len"], "prompt": s["prompt_len"], "batch": s["batch"], "top_k": s["top_k"]},
            "teacher_side": side,
            "distill_bf16": {
                "cached": cached,
                "online": online,
                "cached_speedup": cached["tokens_per_s"] / online["tokens_per_s"],
            },
            "vllm": vllm,
            "skipped": skipped,
            "seconds": time.perf_counter() - t_start,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for part, why in skipped.items():
        print(f"gpu_check: skipped {part}: {why}")
    print(f"gpu_check: results in {args.out}")


if __name__ == "__main__":
    main()
