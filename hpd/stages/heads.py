"""A causal LM's output head at chosen positions only, in torch alone (the score stage and the losses use it; so does
bench/gpu_check.py, on machines without the storage packages). Prompts and padding are most of a batch's positions
and the head is the one [positions, vocabulary] step: `head_only_at` runs it where a loss or a cache needs it;
`hidden_at` does not run it at all and hands over the hidden states and the head, for losses.StudentHead and the
score stage to make the logits a chunk of positions at a time."""

from __future__ import annotations

from contextlib import contextmanager

import torch

# A chunk of positions x vocabulary entries (the loss's and the scoring's vocabulary-wide tensors exist a chunk at a
# time). On a CPU small chunks keep memory flat at no cost. On a GPU each chunk costs a few dozen kernel launches
# whatever its size: with a 151,936-token vocabulary a 4M-element chunk is 27 positions, and a 0.5B student's training
# step was launch-bound at 4.5k tokens/s on an H200 (bench/results/gpu_check_loss_chunk_4m.json). There a chunk is at
# least 2^27 elements (512 MB per float32 tensor), which a GPU that holds the model has room for.
GPU_CHUNK_ELEMENTS = 1 << 27


def chunk_elements(cpu_elements: int, device) -> int:
    """The elements per chunk on `device`: `cpu_elements` on a CPU, at least GPU_CHUNK_ELEMENTS on a GPU."""
    return max(cpu_elements, GPU_CHUNK_ELEMENTS) if torch.device(device).type == "cuda" else cpu_elements


@torch.no_grad()
@contextmanager
def head_only_at(model, keep: torch.Tensor):
    """Inside this context the model's output head (lm_head) runs only at the positions where `keep` [B, L] is
    true, so a forward returns logits [N, V] in row-major order of `keep` instead of [B, L, V]: the [B, L, V]
    logits and their gradient were most of a training step's memory. A forward pre-hook selects the positions
    from the head's input, so it works on any decoder and any transformers version that has the model, through a
    DDP / FSDP wrapper (whose forward runs as usual) and with tied weights (the module tree is untouched).
    Transformers >= 5.20 can do the same with a boolean `logits_to_keep`; tests/test_hf_models.py shows both equal
    in values and gradients."""
    head = getattr(model, "module", model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][keep.to(args[0].device)], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def hidden_at(model, keep: torch.Tensor):
    """Inside this context the model's output head returns its own input at the positions where `keep` [B, L] is
    true: a forward's `.logits` are the last hidden states [N, H], in row-major order of `keep`, and no logits are
    made; the head itself is yielded, for its weight and bias (losses.StudentHead makes the logits chunk by chunk).
    Like head_only_at it goes through the model's own forward (and a DDP wrapper's)."""
    head = getattr(model, "module", model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][keep.to(args[0].device)], *args[1:]))
    head.forward = lambda hidden, *args, **kwargs: hidden  # an instance attribute, over the class's forward
    try:
        yield head
    finally:
        del head.forward
        handle.remove()


def logits_at(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor):
    """(logits_of(rows) -> float32 logits [n, V] of those rows of the `keep` positions, V), after one forward: the head
    run chunk by chunk on the kept hidden states where it is a plain linear map, at the kept positions otherwise
    (and over the whole batch for a model that shows no head)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "get_output_embeddings"):
        whole = model(input_ids=ids, attention_mask=mask).logits[keep]
        return (lambda rows: whole[rows].float()), whole.shape[-1]
    if fused_head_works(model):
        with hidden_at(model, keep) as head:
            hidden = model(input_ids=ids, attention_mask=mask).logits  # [N, H]
        return (
            lambda rows: torch.nn.functional.linear(hidden[rows], head.weight, head.bias).float()
        ), head.weight.shape[0]
    with head_only_at(model, keep):
        whole = model(input_ids=ids, attention_mask=mask).logits  # [N, V]
    return (lambda rows: whole[rows].float()), whole.shape[-1]


def fused_head_works(model) -> bool:
    """Whether the logits are the head's plain linear map of the last hidden states (and nothing after it: no soft
    capping, no logit scale), so that hidden_at and a StudentHead compute exactly what the model would."""
    model = getattr(model, "module", model)
    head, config = model.get_output_embeddings(), model.config.get_text_config()
    return (
        type(head) is torch.nn.Linear
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
    )
