"""The GPU figures hpd's pages quote, measured in one go on a machine with one CUDA GPU and no network.

    bench/gpu_check.sh [OUT.json]     (or python -m bench.gpu_check --out OUT.json; --small: a CPU-sized run)

It needs torch and transformers only (what a CUDA image has): the part of hpd it runs, the teacher pass's
arithmetic (hpd/stages/cache_rows.py), the losses, the response-position head and the cache's in-memory batch, imports
nothing else (tests/test_gpu_check.py runs it with pyarrow, datasets and zstandard blocked). The models are randomly
initialised at the shapes of the real pair hpd fetches (Qwen2.5-Coder 1.5B teacher, 0.5B student, untied heads as
converted, the 151,936-token vocabulary): speed and memory do not depend on the weights' values, and no weights travel.
Parts:

1. teacher side, bf16: response tokens/s of the bare forward (output head at response positions only) and of the
   scoring (top-64, target log-prob, tail), and the scoring overhead; the bf16 cache's agreement with the same
   weights in fp32 on a slice (top-1, top-k overlap, target log-prob);
2. distillation of the 0.5B in bf16 autocast (fkl, student logits at response positions only): tokens/s from the
   cached targets (no teacher forward) against the 1.5B teacher online (its forward every step), and each arm's peak
   GPU memory alone (the cached arm with no teacher in memory);
3. the vLLM engine against the transformers engine (scoring agreement and tokens/s), where vLLM imports.
Every speed is a median of 5 rounds, the arms in turn after a warm-up round (bench/timing.py), with its spread. The
JSON is written after each part, so a run cut short keeps what it measured. Anything skipped is said in one line,
and in the JSON under "skipped".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.provenance import stamp
from bench.timing import alternate, measured, rate, summary
from hpd.stages import heads
from hpd.stages.cache_rows import Timer, score_batch
from hpd.stages.losses import CachedTargets, TeacherLogits, distill_loss, response_positions
from hpd.storage.cache_batch import ScoredSequence, grid_batch

OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"
VOCAB = 151936  # Qwen2.5's tokenizer (its heads as converted from GGUF have this many rows)
QWEN25_CODER_15B = dict(  # 1.78B parameters with the untied head
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)
QWEN25_CODER_05B = dict(  # 630M parameters with the untied head
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)
SCALE = {  # shapes and counts: the real check, and a CPU-sized one for the test
    "gpu": dict(
        teacher=QWEN25_CODER_15B,
        student=QWEN25_CODER_05B,
        seq_len=1024,
        prompt_len=256,
        batch=16,
        batches=6,
        agree_batches=1,
        steps=8,
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
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=512,
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


def qwen2(shape: dict, device, dtype, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():  # sharper than the default initialisation: distributions far from uniform
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_measured(device):
    """bench/timing.py's per-call measure on the GPU: seconds once the GPU's queued work is done, and the peak memory
    the call allocated over what was allocated before it (MB)."""

    def measure(fn, prepare=None) -> dict:
        if prepare is not None:
            prepare()
        gc.collect()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "peak_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20}

    return measure


def peak_alone(device, fn) -> float | None:
    """The GPU's whole peak allocation (MB) while `fn` runs, everything then in memory counted."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def sequences(s: dict, vocab: int, n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (s["seq_len"],), generator=g).numpy() for _ in range(n)]


def teacher_side(teacher, s: dict, device, measure) -> tuple[dict, list]:
    """Bare-forward and scored response tokens/s, the arms in turn, and the scored rows of every batch (the
    training targets). The bare forward runs the output head at the response positions only, as the scoring does:
    the difference is what scoring adds (top-k, target log-prob, tail)."""
    seqs = sequences(s, teacher.config.vocab_size, s["batch"] * s["batches"], seed=1)
    plens = [s["prompt_len"]] * s["batch"]
    batches = [seqs[i * s["batch"] : (i + 1) * s["batch"]] for i in range(s["batches"])]
    inputs = [torch.stack([torch.from_numpy(x) for x in b]).to(device) for b in batches]
    keep = torch.zeros_like(inputs[0], dtype=torch.bool)
    keep[:, s["prompt_len"] - 1 : s["seq_len"] - 1] = True  # the positions that predict a response token
    timer, rows = Timer(), []

    @torch.no_grad()
    def forward():
        for ids in inputs:
            with heads.head_only_at(teacher, keep):
                teacher(input_ids=ids).logits

    @torch.no_grad()
    def scored():
        timer.clear()
        rows[:] = [
            score_batch(teacher, b, plens, top_k=s["top_k"], temperature=1.0, pad_id=0, timer=timer) for b in batches
        ]

    timed = alternate({"forward": forward, "scored": scored}, log=lambda line: None, measure=measure)
    n = int(keep.sum()) * s["batches"]
    fwd, sc = timed["forward"]["seconds"], timed["scored"]["seconds"]
    overhead = [b / a - 1 for a, b in zip(fwd["runs"], sc["runs"])]  # per round: the two arms ran back to back
    return {
        "response_tokens": n,
        "forward_tokens_per_s": rate(fwd, n),
        "scored_tokens_per_s": rate(sc, n),
        "overhead_over_forward": summary(overhead),
        "phases_seconds_last_round": dict(timer),
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
    labels[:, : rows[0]["start"] + 1] = -100  # the prompt (row "start" predicts the first response token)
    scored = [ScoredSequence(seq_id=i, input_ids=None, crc=0, **r) for i, r in enumerate(rows)]
    return ids, labels, grid_batch(scored, k, length=ids.shape[1]).to(device)


class Distiller:
    """A student and its optimizer, taking `steps` optimizer steps of fkl in bf16 autocast per call: from the cached
    rows, or (teacher given) from the teacher's logits online, its forward every step."""

    def __init__(self, student, data: list, s: dict, device, teacher=None):
        self.student, self.data, self.s, self.device, self.teacher = student, data, s, device, teacher
        self.opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        self.calls, self.tokens_per_call, self.loss = 0, 0, float("nan")

    def __call__(self) -> None:
        tokens = 0
        for step in range(self.s["steps"]):
            ids, labels, cache = self.data[(self.calls * self.s["steps"] + step) % len(self.data)]
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                if self.teacher is None:
                    signal = CachedTargets(cache)
                else:
                    with torch.no_grad():
                        signal = TeacherLogits(self.teacher(input_ids=ids).logits)
                with heads.head_only_at(self.student, response_positions(labels)):
                    logits = self.student(input_ids=ids).logits
            loss, diag = distill_loss("fkl", logits, labels, teacher=signal)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens += diag["tokens"]
        self.calls, self.tokens_per_call, self.loss = self.calls + 1, tokens, loss.item()


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


def check(s: dict, device, result: dict, save) -> None:
    """The three parts, `result` filled and saved after each."""
    cuda = device.type == "cuda"
    measure = gpu_measured(device) if cuda else measured
    skipped = result["skipped"]
    t_start = time.perf_counter()
    teacher = qwen2(s["teacher"], device, torch.bfloat16, seed=0)
    result["teacher"] = {
        "architecture": "Qwen2 (random init, the Qwen2.5-Coder shape)",
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "dtype": "bfloat16",
        **s["teacher"],
    }
    result["sequence"] = {"length": s["seq_len"], "prompt": s["prompt_len"], "batch": s["batch"], "top_k": s["top_k"]}
    side, batches_rows = teacher_side(teacher, s, device, measure)
    result["teacher_side"] = side
    save()
    # the same weights in fp32, on a slice: how much the bf16 cache differs from an fp32 teacher's
    exact_teacher = qwen2(s["teacher"], device, torch.float32, seed=0)
    bf16_rows, fp32_rows = [], []
    for batch, rows in batches_rows[: s["agree_batches"]]:
        bf16_rows += rows
        fp32_rows += score_batch(
            exact_teacher, batch, [s["prompt_len"]] * len(batch), top_k=s["top_k"], temperature=1.0, pad_id=0
        )
    side["bf16_vs_fp32"] = agreement(bf16_rows, fp32_rows)
    del exact_teacher
    save()

    data = [training_batch(b, rows, s["top_k"], device) for b, rows in batches_rows]
    arms = {  # two students of one initialisation, one per arm, both trained in the rounds
        "cached": Distiller(qwen2(s["student"], device, torch.float32, seed=1).train(), data, s, device),
        "online": Distiller(qwen2(s["student"], device, torch.float32, seed=1).train(), data, s, device, teacher),
    }
    timed = alternate(arms, log=lambda line: None, measure=measure)
    distill = {
        arm: {
            "tokens_per_s": rate(timed[arm]["seconds"], arms[arm].tokens_per_call),
            "steps_per_call": s["steps"],
            "peak_mb_over_resident": timed[arm]["peak_mb"]["median"],
            "final_loss": arms[arm].loss,
        }
        for arm in arms
    }
    result["student_parameters"] = sum(p.numel() for p in arms["cached"].student.parameters())
    # each arm's whole peak alone: the online arm with the teacher, the cached arm with no teacher in memory
    cached = arms.pop("cached")
    del cached
    distill["online"]["peak_memory_mb_alone"] = peak_alone(device, arms["online"])
    vllm_dir = save_for_vllm(teacher, skipped) if cuda else None
    if not cuda:
        skipped["vllm"] = "no CUDA GPU (the --small run)"
    arms.clear()
    del teacher
    cached = Distiller(qwen2(s["student"], device, torch.float32, seed=1).train(), data, s, device)
    distill["cached"]["peak_memory_mb_alone"] = peak_alone(device, cached)
    del cached, data
    distill["cached_speedup"] = (
        distill["cached"]["tokens_per_s"]["median"] / distill["online"]["tokens_per_s"]["median"]
    )
    result["distill_bf16"] = distill
    result["seconds"] = time.perf_counter() - t_start
    save()
    if vllm_dir is not None:  # last, with this process's GPU memory given back: vLLM takes most of the GPU
        gc.collect()
        torch.cuda.empty_cache()
        try:
            result["vllm"] = vllm_part(vllm_dir, batches_rows, s)
        except Exception as e:  # noqa: BLE001 - the other figures stand; say what stopped vLLM
            skipped["vllm"] = f"vLLM failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    result["seconds"] = time.perf_counter() - t_start
    save()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--small", action="store_true", help="CPU-sized models and counts (the test's run)")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        result = {
            "skipped": {
                "everything": "no CUDA GPU here (torch.cuda.is_available() is False); run it on the GPU machine"
            }
        }
        out.write_text(json.dumps(result, indent=1) + "\n")
    else:
        device = torch.device("cuda" if cuda else "cpu")
        made = stamp()
        made["commit"] = os.environ.get("HPD_COMMIT") or made["commit"]  # a copy of the tree: its .git may be stale
        result = {
            "made": made,
            "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "versions": {
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "python": platform.python_version(),
            },
            "skipped": {},
            "complete": False,
        }

        def save():
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(out)

        check(SCALE["small" if args.small else "gpu"], device, result, save)
        result["complete"] = True
        save()
    for part, why in result["skipped"].items():
        print(f"gpu_check: skipped {part}: {why}")
    print(f"gpu_check: results in {args.out}")


if __name__ == "__main__":
    main()
