"""A GGUF file as the teacher: converted once into an HF directory that computes exactly what the file holds,
and one-line errors for files transformers cannot read."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from hpd.common.errors import HpdError
from hpd.stages import gguf_import, hf_models, student_models

from conftest import hpd_cli
from tiny_llama import make_llama, write_gguf


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny Llama's HF directory, the same model as a GGUF file)."""
    d = tmp_path_factory.mktemp("llama")
    hf = make_llama(d / "hf")
    return hf, write_gguf(hf, d / "tiny-llama.gguf")


def test_gguf_converts_once_into_the_same_model(llama, tmp_path):
    hf, file = llama
    out = gguf_import.import_gguf(file, tmp_path / "models")
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    # the weights are dequantised: the config names no quantisation (the Trainer would refuse it as a student)
    assert "quantization_config" not in (out / "config.json").read_text()
    ref, ref_tok = hf_models.load_causal_lm(hf)
    got, tok = hf_models.load_causal_lm(out)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == ids
    assert tok.get_vocab() == ref_tok.get_vocab() and tok.eos_token == ref_tok.eos_token
    x = torch.tensor([ids])
    with torch.no_grad():  # llama.cpp's Q/K row order undone, tied head kept: the same function, exactly
        assert torch.equal(got(x).logits, ref(x).logits)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_import.import_gguf(file, tmp_path / "models") == out  # keyed by content: converted once
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def _unsupported_quantisation(hf: Path, out: Path) -> Path:
    """The tiny Llama with one tensor in Q8_1, a type ggml has and transformers 5.23 cannot dequantise."""
    add = gguf.GGUFWriter.add_tensor

    def q8_1(self, name, tensor, *args, **kwargs):
        if name == "blk.0.ffn_up.weight":
            rows, cols = tensor.shape  # Q8_1: blocks of 32 values in 40 bytes
            return add(
                self, name, np.zeros((rows, cols // 32 * 40), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1
            )
        return add(self, name, tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "add_tensor", q8_1)
        return write_gguf(hf, out)


@pytest.mark.parametrize(
    "case,message",
    [
        ("not_gguf", "is not a GGUF file (it does not start with the GGUF magic bytes)"),
        ("truncated", "truncated.gguf is truncated: it ends inside its header (4,096 bytes)"),
        ("cut_short", "cut_short.gguf is truncated: 197,000 bytes, its header describes 198,112"),
        ("q8_1", "tensor types F32, Q8_1"),
    ],
)
def test_unreadable_gguf_is_a_one_line_error_and_publishes_nothing(llama, tmp_path, case, message):
    hf, file = llama
    bad = tmp_path / f"{case}.gguf"
    if case == "not_gguf":
        bad.write_text("this is a model card, not weights\n")
    elif case == "truncated":
        bad.write_bytes(file.read_bytes()[:4096])
    elif case == "cut_short":  # the header whole, the last tensor's data cut short (an interrupted copy)
        assert file.stat().st_size == 198_112  # (the expected size in the message is this file's)
        bad.write_bytes(file.read_bytes()[:197_000])
    else:
        _unsupported_quantisation(hf, bad)
    with pytest.raises(HpdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gguf_import.import_gguf(bad, tmp_path / "models")
    r = hpd_cli(tmp_path / "home", "run", "--until", "teacher", overrides=['run.name="gguf"', f'teacher.path="{bad}"'])
    # the conversion's own progress bar may come first; the error is one line, the last
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert sum("error" in line.lower() for line in lines) == 1 and "Traceback" not in r.stderr
    assert not list((tmp_path / "home" / "models").glob("gguf-*"))  # no directory a later run could reuse
    if case != "q8_1":  # refused before the conversion's lock: no lock file either
        assert not list((tmp_path / "home" / "models").glob(".*lock"))
    assert not (tmp_path / "home" / "runs" / "gguf" / "teacher" / "manifest.json").exists()


def test_teacher_layers_student_keeps_evenly_spaced_layers(llama):
    """The layer-kept student is the teacher's own first, middle and last blocks: with every layer kept it is the
    teacher, and with fewer each kept block holds the teacher block's weights."""
    hf, _ = llama
    teacher, tok = hf_models.load_causal_lm(hf)
    same, kept = student_models.keep_layers(teacher, 4)
    assert kept == [0, 1, 2, 3]
    x = torch.tensor([tok("What is 12 plus 30?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(same(x).logits, teacher(x).logits)
    student, kept = student_models.keep_layers(teacher, 2)
    assert kept == [0, 3] and student.config.num_hidden_layers == 2
    for i, k in enumerate(kept):
        assert torch.equal(
            student.model.layers[i].self_attn.q_proj.weight, teacher.model.layers[k].self_attn.q_proj.weight
        )
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    with pytest.raises(HpdError, match="distill.n_layer=5: the teacher has 4 layers"):
        student_models.keep_layers(teacher, 5)


def test_teacher_shape_student_is_a_fresh_narrower_model_of_the_teachers_class(llama):
    """teacher-shape: the teacher's class, vocabulary and context, fresh weights, the asked depth and width, the
    MLP scaled with the width and the teacher's query/key-value head ratio kept; it trains (a finite loss)."""
    hf, _ = llama
    teacher, tok = hf_models.load_causal_lm(hf)
    t = teacher.config
    torch.manual_seed(0)
    student = student_models.same_shape_fresh(
        t, n_layer=2, n_embd=t.hidden_size // 2, n_head=t.num_attention_heads // 2
    )
    s = student.config
    assert type(student) is type(teacher) and s.vocab_size == t.vocab_size
    changed = {
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
    }
    same = lambda c: {k: v for k, v in c.to_dict().items() if k not in changed}  # noqa: E731
    assert same(s) == same(t)  # context, rotary, norms, vocabulary and special tokens are the teacher's
    assert (s.num_hidden_layers, s.hidden_size, s.num_attention_heads) == (
        2,
        t.hidden_size // 2,
        t.num_attention_heads // 2,
    )
    assert s.num_key_value_heads * t.num_attention_heads == s.num_attention_heads * t.num_key_value_heads
    assert s.intermediate_size == round(t.intermediate_size / 2 / 8) * 8
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    x = torch.tensor([tok("What is 12 plus 30?")["input_ids"]])
    loss = student(input_ids=x, labels=x).loss
    assert torch.isfinite(loss) and abs(loss.item() - np.log(t.vocab_size)) < 1.0  # fresh: near uniform
    with pytest.raises(HpdError, match="distill.n_embd=30 is not a multiple of distill.n_head=4"):
        student_models.same_shape_fresh(t, n_layer=1, n_embd=30, n_head=4)


QUESTIONS = [
    "What is the capital of France?",
    "How are you today?",
    "Tell me about the weather.",
    "Can you help me?",
    "What is 12 plus 30?",
    "What is 7 plus 5?",
]


def test_gguf_teacher_through_the_whole_command_line_without_references(llama, tmp_path):
    """A given teacher (a GGUF file), chat-template prompts, teacher sampling, scoring, a layer-kept student,
    distill, eval on held-out prompts without reference answers, and the final table of run, status and
    report: no traceback anywhere."""
    import json
    import math

    hf, file = llama
    _, tok = hf_models.load_causal_lm(hf)
    prompts, heldout = tmp_path / "prompts.jsonl", tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS * 4))
    heldout.write_text(
        json.dumps({"prompt": "What is 12 plus 30?", "answer": 42})
        + "\n"
        + json.dumps({"prompt": "Can you help me?"})
        + "\n"
    )
    sets = [
        'run.name="llama"',
        f'teacher.path="{file}"',
        'data.builtin=""',
        f'generate.prompts="{prompts}"',
        'generate.mode="teacher"',
        "generate.num_prompts=0",
        "generate.samples_per_prompt=2",
        "generate.max_new_tokens=12",
        "generate.shard_size=16",
        "score.top_k=16",
        "score.shard_size=16",
        'distill.student_init="teacher-layers"',
        "distill.n_layer=2",
        "distill.steps=3",
        "distill.batch_size=4",
        "distill.warmup_steps=1",
        f'eval.heldout="{heldout}"',
        "eval.max_new_tokens=10",
    ]
    outputs = [
        hpd_cli(tmp_path / "home", *cmd, overrides=sets, tiny=False) for cmd in (["run"], ["status"], ["report"])
    ]
    for r in outputs:
        assert r.exit_code == 0 and "Traceback" not in r.output, (r.output, r.stderr, r.exception)
    runs = tmp_path / "home" / "runs" / "llama"
    report = json.loads((runs / "eval" / "report.json").read_text())
    assert report["references"] == "teacher"  # the teacher's greedy replies stand in for the missing answers
    student, teacher = report["student"], report["teacher"]
    assert student["parameters"] < teacher["parameters"] and "rouge_l" in student and "rouge_l" not in teacher
    assert student["checked_examples"] == teacher["checked_examples"] == 1
    assert student["kl_to_teacher_nats"] > 0 and 0 < teacher["response_nll_nats"] < math.log(len(tok))
    config = json.loads((runs / "distill" / "student" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    table = outputs[1].output[outputs[1].output.index("\nmodel") :]
    assert all(row in table for row in ("distill (fkl)", "baseline (sft)", "teacher", "ROUGE-L", "KL to teacher"))


def test_block_influence_matches_a_float64_reference_and_drops_the_layers_that_do_nothing(llama):
    """Block influence is 1 - cos(a layer's input, its output), the mean over tokens: checked against the model's
    own hidden states in float64 (layers before the last, whose returned state has the final norm applied); a layer
    whose attention and MLP write nothing (output projections zeroed: the identity) scores 0 and is the one dropped,
    where even spacing would keep it."""
    hf, _ = llama
    teacher, tok = hf_models.load_causal_lm(hf)
    teacher.double()
    seqs = [tok(t)["input_ids"] for t in ("What is 12 plus 30?", "Write a haiku about the sea, please.")]
    got = student_models.block_influence(teacher, seqs)
    total = teacher.config.num_hidden_layers
    sums, tokens = [0.0] * total, 0
    with torch.no_grad():
        for ids in seqs:
            hs = teacher(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i in range(total - 1):
                sums[i] += (1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).sum().item()
            tokens += len(ids)
    for i in range(total - 1):
        assert abs(got[i] - sums[i] / tokens) < 1e-12, i
    assert all(0 < g < 2 for g in got)
    with torch.no_grad():
        teacher.model.layers[3].self_attn.o_proj.weight.zero_()
        teacher.model.layers[3].mlp.down_proj.weight.zero_()
    influence = student_models.block_influence(teacher, seqs)
    assert abs(influence[3]) < 1e-12
    student, kept = student_models.keep_layers(teacher, 3, influence)
    assert kept == [0, 1, 2] and student_models.keep_layers(teacher, 3)[1] == [0, 2, 3]  # even spacing keeps it
    x = torch.tensor([seqs[0]])
    with torch.no_grad():  # dropping the identity layer changes nothing the model computes
        assert torch.allclose(student.double()(x).logits, teacher(x).logits, atol=1e-10)
