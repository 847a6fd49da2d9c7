"""How far is a loss computed from the cache from the same loss with the teacher's full distribution?

For batches of held-in sequences the gradient of the loss with respect to the student's parameters is computed
twice with the same student samples: with the teacher's full logits, and with a cache batch built through the real
encode/decode path (default encoding) at k. Reported: cosine similarity and relative norm
||g_cache - g_full|| / ||g_full||, and HPD's diagnostics, for hpd, hpd_fkl and fkl at k = 16 and 64.

    python -m bench.hpd_gradient                    the dialogue task (vocabulary 8,192): a small GPT-2 student,
                                                    briefly trained by SFT so its samples are not uniform noise
    python -m bench.hpd_gradient --config smollm2   the real teacher (SmolLM2-135M-Instruct, vocabulary 49,152) on
                                                    its own samples, the preset's layer-kept student (6 of 30)

Writes bench/results/hpd_gradient[_smollm2].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from bench.provenance import stamp
from hpd import open_run
from hpd.stages import batching, hf_models, student_models
from hpd.stages.cache_rows import score_positions
from hpd.stages.losses import distill_loss
from hpd.storage import encodings as enc
from hpd.storage.logit_cache import DEFAULT_ENCODING, CacheBatch
from hpd.storage.sequences import SequenceStore


def cache_from_logits(teacher_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, k: int) -> CacheBatch:
    """What the score stage would store for these positions (its own computation), through the default encoding
    and back."""
    B, L, V = teacher_logits.shape
    nxt = torch.cat([input_ids[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1)
    ids, top, target, tail = score_positions(teacher_logits.float().reshape(B * L, V), nxt.reshape(-1), top_k=k)
    code = enc.get(DEFAULT_ENCODING)
    d_ids, d_lp = code.decode(code.encode(ids.numpy(), top.numpy(), V), B * L, k)
    return CacheBatch(
        topk_ids=d_ids.view(B, L, k),
        topk_logprobs=d_lp.view(B, L, k),
        target_logprob=target.view(B, L),
        tail_logmass=tail.view(B, L),
        mask=mask,
    )


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def agreement(cached: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """(cosine, ||cached - full|| / ||full||) in float64: over tens of millions of parameters float32 sums drift
    enough to report cosines above 1."""
    a, b = cached.double(), full.double()
    nb = b.norm()
    return (a @ b / (a.norm() * nb)).item(), ((a - b).norm() / nb).item()


def arguments(description: str):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="dialogue", choices=("dialogue", "smollm2"))
    ap.add_argument("--home", default=os.environ.get("HPD_HOME", "work"))
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per batch (dialogue 32, smollm2 8)")
    ap.add_argument(
        "--sft-steps",
        type=int,
        default=60,
        help="dialogue: SFT steps that make the student's samples "
        "resemble language (the smollm2 student is the teacher's)",
    )
    ap.add_argument(
        "--student",
        choices=("kept", "fresh"),
        default="kept",
        help="smollm2: the preset's layer-kept student (close to the teacher) or a fresh small GPT-2 with the "
        "teacher's tokenizer, briefly trained by SFT as on dialogue (far from it)",
    )
    ap.add_argument("--out", default=None)
    return ap


def results_path(args, stem: str) -> Path:
    """--out, or bench/results/STEM (STEM_smollm2 for the real teacher, STEM_smollm2_fresh with a fresh student),
    without a suffix."""
    if args.config == "smollm2":
        stem += "_smollm2" + ("_fresh" if getattr(args, "student", "kept") == "fresh" else "")
    return Path(args.out or Path(__file__).parent / "results" / stem)


def gradient_batches(args):
    """The student, then for each measured batch (ids, mask, labels, the teacher's logits, the student's sampled
    tokens aligned with the labels, the cache mask). dialogue: a small GPT-2 briefly trained by SFT; smollm2: the
    preset's layer-kept student."""
    real = args.config == "smollm2"
    kept = real and getattr(args, "student", "kept") == "kept"
    bs = args.batch_size or (8 if real else 32)
    sft_steps = 0 if kept else args.sft_steps
    runner = open_run(args.config, [], home=args.home)
    cfg = runner.cfg
    runner.run(until="generate")
    store = SequenceStore(Path(runner.outputs("generate").sequences))
    teacher, tok = hf_models.load_teacher(runner.outputs("teacher"))
    torch.manual_seed(0)
    if kept:  # the preset's student: the teacher with distill.n_layer of its layers kept
        student = student_models.keep_layers(teacher, cfg.distill.n_layer)[0]
    else:
        student = student_models.new_gpt2(
            tok, n_positions=hf_models.context_length(teacher), n_layer=2, n_embd=64, n_head=2
        )
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    _, plens, seqs = store.range(0, min(len(store), bs * (sft_steps + args.batches)))
    # dialogue: SFT on the first sft_steps batches, measured on the next ones. smollm2's 192 replies are too few for
    # that: its fresh student is measured on the first batches and trained, cycling, on the replies after them.
    measured = list(range(sft_steps, sft_steps + args.batches))
    sft = list(range(sft_steps))
    if real and not kept:
        rest = max(1, len(seqs) // bs - args.batches)
        measured, sft = list(range(args.batches)), [args.batches + i % rest for i in range(sft_steps)]

    def batch(i):
        part = seqs[bs * i : bs * (i + 1)]
        ids, mask = batching.pad_right(part, tok.pad_token_id)
        labels = ids.clone()
        labels[mask == 0] = -100
        for b, p in enumerate(plens[bs * i : bs * (i + 1)]):
            labels[b, :p] = -100
        return ids, mask, labels

    for step in sft:  # a briefly trained student: its samples resemble language
        ids, mask, labels = batch(step)
        loss, _ = distill_loss("sft", student(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    yield student
    for i in measured:
        ids, mask, labels = batch(i)
        if not len(ids):
            break
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
            s_logits = student(input_ids=ids, attention_mask=mask).logits.float()
        g = torch.Generator().manual_seed(i)
        sample = torch.multinomial(torch.softmax(s_logits.reshape(-1, s_logits.shape[-1]), -1), 1, generator=g).view(
            ids.shape
        )
        del s_logits
        sample = torch.cat([torch.zeros_like(sample[:, :1]), sample[:, :-1]], 1)  # aligned with labels
        cache_mask = torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1)
        yield ids, mask, labels, t_logits, sample, cache_mask


def main():
    args = arguments(__doc__).parse_args()
    out = results_path(args, "hpd_gradient")
    batches = gradient_batches(args)
    student = next(batches)
    results, start_kl = {}, []
    for n, (ids, mask, labels, t_logits, sample, cache_mask) in enumerate(batches, 1):
        for method in ("hpd", "hpd_fkl", "fkl"):
            student.zero_grad()
            full, _ = distill_loss(
                method,
                student(input_ids=ids, attention_mask=mask).logits,
                labels,
                teacher=t_logits,
                sampled_tokens=sample,
            )
            full.backward()
            if method == "fkl":  # forward KL's value: how far the student starts from the teacher
                start_kl.append(float(full.detach()))
            g_full = flat_grad(student).clone()
            for k in (16, 64):
                student.zero_grad()
                cb = cache_from_logits(t_logits, ids, cache_mask, k)
                cached, diag = distill_loss(
                    method,
                    student(input_ids=ids, attention_mask=mask).logits,
                    labels,
                    teacher=cb,
                    sampled_tokens=sample,
                )
                cached.backward()
                g_c = flat_grad(student)
                r = results.setdefault(f"{method}@k={k}", {"cosine": [], "relative_norm": [], "diag": []})
                cos, rel = agreement(g_c, g_full)
                r["cosine"].append(cos)
                r["relative_norm"].append(rel)
                r["diag"].append(diag)
        print(
            f"batch {n}/{args.batches}: " + ", ".join(f"{name} {r['cosine'][-1]:.4f}" for name, r in results.items()),
            flush=True,
        )
    summary = {}
    for name, r in results.items():
        s = {
            "cosine_mean": float(np.mean(r["cosine"])),
            "cosine_min": float(np.min(r["cosine"])),
            "relative_norm_mean": float(np.mean(r["relative_norm"])),
            "batches": len(r["cosine"]),
        }
        if name.startswith("hpd"):
            s["sample_outside_topk"] = float(np.mean([d["sample_outside_topk"] for d in r["diag"]]))
            s["sample_term_active"] = float(np.mean([d["sample_term_active"] for d in r["diag"]]))
        summary[name] = s
    out.parent.mkdir(parents=True, exist_ok=True)
    summary["student_kl_to_teacher_nats"] = float(np.mean(start_kl))  # at the response positions, before any step
    summary["vocab_size"] = int(t_logits.shape[-1])
    summary["made"] = stamp()
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    md = [
        "| loss @ k | cosine(cached, full) mean (min) | relative norm of the difference | sampled token outside top-k "
        "| sampled-token term active |",
        "|---|---|---|---|---|",
    ]
    for name, s in ((n, s) for n, s in summary.items() if "@" in n):
        pct = lambda key: f"{s[key]:.1%}" if key in s else "-"  # noqa: E731
        md.append(
            f"| {name} | {s['cosine_mean']:.4f} ({s['cosine_min']:.4f}) | {s['relative_norm_mean']:.4f} | "
            f"{pct('sample_outside_topk')} | {pct('sample_term_active')} |"
        )
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
