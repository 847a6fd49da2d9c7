"""`hpd export`: students as GGUF files (read back through transformers' GGUF loader and hpd's own GGUF teacher import)
and as transformers directories, each with a model card; bad input refused in one line with nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpd.storage.gguf_export import ExportError, read_metadata, write_gguf

from conftest import copy_home, hpd_cli, make_runner
from tiny_llama import make_llama, make_tokenizer

TEXTS = ["What is the capital of France? The capital of France is Paris.", "What is 12 plus 30? 12 plus 30 is 42."]


def _tiny(arch: str, tmp_path: Path):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    if arch == "llama":
        return AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "llama")), tok, {}
    if arch == "qwen2":  # untied, and a head padded past the tokenizer as Qwen2.5's are
        config = Qwen2Config(
            vocab_size=len(tok) + 16,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        return Qwen2ForCausalLM(config), tok, {}
    # transformers' GGUF loader reads GPT-2's context length under a name GPT2Config ignores (n_ctx): say it
    return (
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4)),
        tok,
        {"n_positions": 128},
    )


def _logits(model, tok, texts=TEXTS):
    with torch.no_grad():
        return [model(torch.tensor([tok(t)["input_ids"]])).logits[0] for t in texts]


def _kl(a, b):
    p = a.log_softmax(-1)
    return float((p.exp() * (p - b.log_softmax(-1))).sum(-1).mean())


@pytest.mark.unit
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_gguf_reads_back_as_the_student(arch, tmp_path):
    """f32: the same logits; f16: the logits of the student with its matrices rounded to fp16; q8_0: KL to the
    student at most 1e-3 per token. The tokenizer (and its chat template) comes back cutting text the same way."""
    model, tok, load = _tiny(arch, tmp_path)
    model.eval()
    want = _logits(model, tok)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    want_f16 = _logits(rounded, tok)
    for kind in ("f32", "f16", "q8_0"):
        path = write_gguf(model, tok, tmp_path / f"{arch}-{kind}.gguf", kind, {"general.name": "tiny"})
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, **load).eval()
        got = _logits(back, tok)
        for g, w, w16 in zip(got, want, want_f16):
            if kind == "f32":
                assert torch.allclose(g, w, atol=1e-5)
            elif kind == "f16":
                assert torch.allclose(g, w16, atol=1e-4), float((g - w16).abs().max())
            else:
                assert _kl(w, g) <= 1e-3
    sizes = {k: (tmp_path / f"{arch}-{k}.gguf").stat().st_size for k in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    back_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"{arch}-f32.gguf")
    for t in TEXTS:
        assert back_tok(t)["input_ids"] == tok(t)["input_ids"]
    assert back_tok.eos_token == tok.eos_token and back_tok.chat_template == tok.chat_template


@pytest.mark.unit
def test_hpds_own_gguf_import_reads_an_export(tmp_path):
    """The exported file as a teacher: hpd's import converts it to the same model."""
    from hpd.stages.gguf_import import import_gguf

    model, tok, _ = _tiny("llama", tmp_path)
    path = write_gguf(model.eval(), tok, tmp_path / "student.gguf", "f32")
    imported = Path(import_gguf(path, tmp_path / "models"))
    back = AutoModelForCausalLM.from_pretrained(imported).eval()
    for g, w in zip(_logits(back, AutoTokenizer.from_pretrained(imported)), _logits(model, tok)):
        assert torch.allclose(g, w, atol=1e-5)


@pytest.mark.unit
def test_an_architecture_the_writer_does_not_know_is_refused(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    tok = make_tokenizer()
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tok),
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            word_embed_proj_dim=16,
            num_attention_heads=2,
        )
    )
    with pytest.raises(ExportError, match="GGUF export writes llama, qwen2, gpt2 models; this student is opt"):
        write_gguf(opt, tok, tmp_path / "opt.gguf")


def test_hpd_export_writes_the_runs_student_with_its_model_card(tiny_home, tmp_path):
    """The tiny run's student (a GPT-2 with the arithmetic task's character tokenizer) as a GGUF file and as a
    transformers directory, each with the card's facts; then the refusals."""
    home = copy_home(tiny_home, tmp_path / "home")
    run = make_runner(home)
    student = Path(run.manifest("distill")["outputs"]["student_dir"])
    model, tok = AutoModelForCausalLM.from_pretrained(student).eval(), AutoTokenizer.from_pretrained(student)
    texts = ["12+30=42|", "7+8:15,3+4=7|<eos>"]

    r = hpd_cli(home, "export", "tiny", "--type", "f32", tiny=False)
    assert r.exit_code == 0, (r.output, r.stderr)
    path = Path(r.output.strip().split("exported: ")[1].split(" (")[0])
    assert path == home / "runs" / "tiny" / "export" / "tiny-distill.f32.gguf"
    meta = read_metadata(path, "hpd.")
    assert meta["hpd.method"] == "hpd" and meta["hpd.cache"] == run.outputs("score").cache_id
    assert json.loads(meta["hpd.eval"])["student"]["accuracy"] == run.outputs("eval").report["student"]["accuracy"]
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, n_positions=model.config.n_positions)
    back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for t in texts:
        assert back_tok(t)["input_ids"] == tok(t)["input_ids"]
    for g, w in zip(_logits(back.eval(), tok, texts), _logits(model, tok, texts)):
        assert torch.allclose(g, w, atol=1e-5)

    r = hpd_cli(home, "export", "tiny", "--format", "hf", tiny=False)
    assert r.exit_code == 0, (r.output, r.stderr)
    hf = home / "runs" / "tiny" / "export" / "tiny-distill"
    card = (hf / "README.md").read_text()
    assert "| method | hpd, 4 steps (stage distill) |" in card and run.outputs("score").cache_id in card
    for g, w in zip(_logits(AutoModelForCausalLM.from_pretrained(hf).eval(), tok, texts), _logits(model, tok, texts)):
        assert torch.equal(g, w)

    r = hpd_cli(home, "export", "tiny", "--format", "hf", "--replace", tiny=False)
    assert r.exit_code == 0 and (hf / "README.md").read_text() == card
    exports = sorted(p.name for p in (home / "runs" / "tiny" / "export").iterdir())
    assert exports == ["tiny-distill", "tiny-distill.f32.gguf"]
    for args, message in (
        (("nosuch",), "no run nosuch under"),
        (("tiny", "--stage", "distill-3"), "run tiny has no student stage distill-3; its students: distill"),
        (("tiny", "--format", "hf"), "exists; give --replace to write over it, or --out another path"),
    ):
        r = hpd_cli(home, "export", *args, tiny=False)
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    fresh = hpd_cli(home, "run", "--until", "teacher", overrides=['run.name="bare"'])
    assert fresh.exit_code == 0, fresh.stderr
    r = hpd_cli(home, "export", "bare", tiny=False)
    assert r.exit_code == 2 and "run bare's student distill is" in r.stderr and "train it first" in r.stderr
    assert sorted(p.name for p in (home / "runs" / "tiny" / "export").iterdir()) == exports
    assert not (home / "runs" / "bare" / "export").exists() or not any((home / "runs" / "bare" / "export").iterdir())
