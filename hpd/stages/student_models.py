"""Students made from nothing or from their teacher: a fresh GPT-2, the teacher with some of its layers kept
(depth pruning), a fresh model of the teacher's architecture at a smaller shape (width)."""

from __future__ import annotations

import torch

from hpd.common.errors import HpdError


def new_gpt2(tokenizer, *, n_positions: int, n_layer: int, n_embd: int, n_head: int):
    """A fresh GPT-2 for the tokenizer. No dropout: these small models learn exact algorithms, and dropout
    both slowed the teacher (41-50% instead of 93% held-out) and made gradient measurements noisy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _layer_stack(teacher) -> tuple[str, int]:
    """(the name of the ModuleList holding the decoder's layers, how many there are)."""
    total = teacher.config.get_text_config().num_hidden_layers
    stack = next(
        (name for name, m in teacher.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total), None
    )
    if stack is None:
        raise HpdError(
            f"cannot find the {total} decoder layers of this {type(teacher).__name__}; "
            f'use distill.student_init="gpt2" or give distill.student_path'
        )
    return stack, total


def block_influence(teacher, sequences) -> list[float]:
    """Each decoder layer's block influence (ShortGPT): 1 - cos(the hidden state it reads, the one it writes), the
    mean over every token of `sequences` (lists of token ids). A layer that barely turns the residual stream scores
    near 0 and is the cheapest to drop. Read with hooks on the layers themselves: the model's returned hidden
    states have the final norm applied to the last one."""
    stack, total = _layer_stack(teacher)
    sums = torch.zeros(total, dtype=torch.float64)
    tokens = 0

    def hook(i):
        def record(module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            sums[i] += (1 - cos).sum()

        return record

    layers = teacher.get_submodule(stack)
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids in sequences:  # one at a time: no padding to mask out of the means
                x = torch.as_tensor([list(ids)])
                teacher(input_ids=x, attention_mask=torch.ones_like(x))
                tokens += len(ids)
    finally:
        for h in handles:
            h.remove()
    return (sums / max(tokens, 1)).tolist()


def keep_layers(teacher, n: int, influence: list[float] | None = None):
    """A student made from `teacher` by keeping `n` of its decoder layers, with its embeddings, final norm and
    output head (DistilBERT's and Minitron's depth pruning): evenly spaced from the first to the last, or, given
    each layer's `influence` (block_influence), the n most influential in their order (ShortGPT). Works on any
    decoder whose layers sit in one ModuleList of num_hidden_layers blocks (GPT-2, Llama, Qwen, ...)."""
    import copy

    from transformers import AutoModelForCausalLM

    total = teacher.config.get_text_config().num_hidden_layers
    if not 1 <= n <= total:
        raise HpdError(
            f"distill.n_layer={n}: the teacher has {total} layers, so a student made by keeping "
            f"layers can have 1 to {total}"
        )
    stack, _ = _layer_stack(teacher)
    if influence is None:
        kept = [round(i * (total - 1) / max(n - 1, 1)) for i in range(n)]
    else:  # ties go to the earlier layer
        kept = sorted(sorted(range(total), key=lambda i: (-influence[i], i))[:n])
    student_config = copy.deepcopy(teacher.config)
    student_config.num_hidden_layers = n
    if isinstance(getattr(student_config, "layer_types", None), list):  # per-layer attention kinds (Qwen3, Gemma)
        student_config.layer_types = [student_config.layer_types[k] for k in kept]
    student = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    source = teacher.state_dict()
    prefix = stack + "."
    state = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            i, rest = key[len(prefix) :].split(".", 1)
            state[key] = source[f"{prefix}{kept[int(i)]}.{rest}"]
        else:
            state[key] = source[key]
    student.load_state_dict(state)
    return student, kept


def check_heads(n_embd: int, n_head: int) -> None:
    """The one check of a student width against its heads (config time and build time alike)."""
    if n_embd % n_head:
        raise HpdError(
            f"distill.n_embd={n_embd} is not a multiple of distill.n_head={n_head}; choose a width "
            f"that divides into the heads"
        )


def same_shape_fresh(teacher_config, *, n_layer: int, n_embd: int, n_head: int):
    """A fresh, randomly initialised model of the teacher's own architecture (its class, vocabulary, context,
    norms, rotary settings) made shallower and narrower: n_layer blocks of width n_embd with n_head heads, the MLP
    scaled by the same factor as the width and grouped-query attention keeping the teacher's ratio of query to
    key/value heads (Minitron's width pruning starts from this shape; here it starts from scratch)."""
    import copy

    from transformers import AutoModelForCausalLM

    t = teacher_config.get_text_config()
    check_heads(n_embd, n_head)
    config = copy.deepcopy(teacher_config)
    c = config.get_text_config()
    heads, kv = t.num_attention_heads, getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    c.num_hidden_layers, c.hidden_size, c.num_attention_heads = n_layer, n_embd, n_head
    if getattr(c, "num_key_value_heads", None) is not None:
        c.num_key_value_heads = max(1, n_head * kv // heads) if n_head % max(1, heads // kv) == 0 else n_head
    if getattr(c, "head_dim", None) is not None:
        c.head_dim = n_embd // n_head
    if getattr(c, "intermediate_size", None):  # keep the teacher's MLP ratio, rounded to a multiple of 8
        c.intermediate_size = max(8, round(t.intermediate_size * n_embd / t.hidden_size / 8) * 8)
    if isinstance(getattr(c, "layer_types", None), list):
        c.layer_types = c.layer_types[:n_layer]
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
