"""The student's logits at response positions only: the output head hooked to the kept positions
(`heads.head_only_at`, any transformers version) against the full logits and against a boolean
`logits_to_keep` (transformers >= 5.20), and the head moved into the loss (`heads.hidden_at` with a
losses.StudentHead), in values and gradients, for GPT-2 and Llama."""

import inspect

import pytest
import torch

from hpd.stages import heads, student_models
from hpd.stages.losses import StudentHead, distill_loss, response_positions
from hpd.stages.tasks import arithmetic

from tiny_llama import make_llama

pytestmark = pytest.mark.unit


def _gpt2(tmp_path):
    torch.manual_seed(0)
    return student_models.new_gpt2(arithmetic.build_tokenizer(), n_positions=32, n_layer=2, n_embd=16, n_head=2)


def _llama(tmp_path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(make_llama(tmp_path / "llama", n_layer=2))


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :4] = -100  # prompts
    labels[2, :7] = -100
    return ids, mask, labels


def _loss_and_grads(model, ids, mask, labels, how: str):
    model.zero_grad()
    keep = response_positions(labels)
    if how == "hook":
        with heads.head_only_at(model, keep):
            logits = model(input_ids=ids, attention_mask=mask).logits
    elif how == "fused":  # the loss makes the logits itself, a few positions at a time (here 2 per chunk)
        with heads.hidden_at(model, keep) as head:
            hidden = model(input_ids=ids, attention_mask=mask).logits
        loss, _ = distill_loss(
            "sft", StudentHead(hidden, head.weight, head.bias), labels, chunk_elements=2 * model.config.vocab_size
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return hidden.detach(), loss.item(), grads
    elif how == "logits_to_keep":
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[keep]
    loss, _ = distill_loss("sft", logits, labels)
    loss.backward()
    return logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_head_only_at_the_kept_positions_equals_the_full_logits(make, tmp_path):
    model = make(tmp_path)
    ids, mask, labels = _batch(model.config.vocab_size)
    full = _loss_and_grads(model, ids, mask, labels, "full")
    hooked = _loss_and_grads(model, ids, mask, labels, "hook")
    assert hooked[0].shape == (int(response_positions(labels).sum()), model.config.vocab_size)
    torch.testing.assert_close(hooked[0], full[0], rtol=1e-5, atol=1e-6)
    assert hooked[1] == pytest.approx(full[1], rel=1e-6)
    assert hooked[2].keys() == full[2].keys()
    for name in full[2]:
        torch.testing.assert_close(hooked[2][name], full[2][name], rtol=1e-5, atol=1e-7)
    assert model(input_ids=ids).logits.shape[:2] == ids.shape  # the hook is gone after the context


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_the_head_inside_the_loss_equals_the_full_logits(make, tmp_path):
    model = make(tmp_path)
    assert heads.fused_head_works(model)
    ids, mask, labels = _batch(model.config.vocab_size)
    full = _loss_and_grads(model, ids, mask, labels, "full")
    fused = _loss_and_grads(model, ids, mask, labels, "fused")
    assert fused[0].shape == (int(response_positions(labels).sum()), model.config.hidden_size)  # no logits made
    assert fused[1] == pytest.approx(full[1], rel=1e-6)
    assert fused[2].keys() == full[2].keys()  # the head's weight (tied to the embedding in GPT-2) learns too
    for name in full[2]:  # (float32 sums in another order: a few entries differ by ~1e-7)
        torch.testing.assert_close(fused[2][name], full[2][name], rtol=1e-4, atol=1e-6)
    assert model(input_ids=ids).logits.shape == (*ids.shape, model.config.vocab_size)  # the head is itself again


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_head_only_at_equals_a_boolean_logits_to_keep(make, tmp_path):
    model = make(tmp_path)
    import transformers
    from packaging.version import Version

    # a boolean logits_to_keep (a mask of positions) came with transformers 5.20; before it there is nothing to
    # compare with (make test-compat runs 5.18). From 5.20 on, any failure is a failure.
    if Version(transformers.__version__) < Version("5.20"):
        pytest.skip(f"transformers {transformers.__version__} takes no boolean logits_to_keep (5.20 on)")
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
    ids, mask, labels = _batch(model.config.vocab_size)
    kept = _loss_and_grads(model, ids, mask, labels, "logits_to_keep")
    hooked = _loss_and_grads(model, ids, mask, labels, "hook")
    assert torch.equal(hooked[0], kept[0]) and hooked[1] == kept[1]
    for name in kept[2]:
        assert torch.equal(hooked[2][name], kept[2][name]), name


def test_auto_teacher_dtype_is_bf16_only_for_large_models_on_a_bf16_cpu():
    import torch

    from hpd.stages.teacher import BF16_CPU_MIN_PARAMETERS, native_bf16_cpu, resolved_dtype

    assert resolved_dtype("float32", 10**10) == "float32" and resolved_dtype("bfloat16") == "bfloat16"
    if torch.cuda.is_available():
        return
    assert resolved_dtype("auto", BF16_CPU_MIN_PARAMETERS - 1) == "float32"  # the suite's tiny teachers stay exact
    flags = open("/proc/cpuinfo").read()
    assert native_bf16_cpu() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert resolved_dtype("auto", BF16_CPU_MIN_PARAMETERS) == ("bfloat16" if native_bf16_cpu() else "float32")
