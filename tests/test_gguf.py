"""A GGUF file as the teacher: converted once into an HF directory that computes exactly what the file holds,
and one-line errors for files transformers cannot read."""
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import HpdError
from stages import modeling

from conftest import TINY
from tiny_llama import make_llama, write_gguf


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny Llama's HF directory, the same model as a GGUF file)."""
    d = tmp_path_factory.mktemp("llama")
    hf = make_llama(d / "hf")
    return hf, write_gguf(hf, d / "tiny-llama.gguf")


def test_gguf_converts_once_into_the_same_model(llama, tmp_path):
    hf, file = llama
    out = modeling.import_gguf(file, tmp_path / "models")
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    ref, ref_tok = modeling.load_causal_lm(hf)
    got, tok = modeling.load_causal_lm(out)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == ids
    assert tok.get_vocab() == ref_tok.get_vocab() and tok.eos_token == ref_tok.eos_token
    x = torch.tensor([ids])
    with torch.no_grad():  # llama.cpp's Q/K row order undone, tied head kept: the same function, exactly
        assert torch.equal(got(x).logits, ref(x).logits)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert modeling.import_gguf(file, tmp_path / "models") == out  # keyed by content: converted once
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def _unsupported_quantisation(hf: Path, out: Path) -> Path:
    """The tiny Llama with one tensor in Q8_1, a type ggml has and transformers 5.23 cannot dequantise."""
    add = gguf.GGUFWriter.add_tensor

    def q8_1(self, name, tensor, *args, **kwargs):
        if name == "blk.0.ffn_up.weight":
            rows, cols = tensor.shape  # Q8_1: blocks of 32 values in 40 bytes
            return add(self, name, np.zeros((rows, cols // 32 * 40), np.uint8),
                       raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        return add(self, name, tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "add_tensor", q8_1)
        return write_gguf(hf, out)


@pytest.mark.parametrize("case,message", [
    ("not_gguf", "is not a GGUF file (it does not start with the GGUF magic bytes)"),
    ("truncated", "transformers cannot read this GGUF file"),
    ("q8_1", "tensor types F32, Q8_1"),
])
def test_unreadable_gguf_is_a_one_line_error_and_publishes_nothing(llama, tmp_path, case, message):
    hf, file = llama
    bad = tmp_path / f"{case}.gguf"
    if case == "not_gguf":
        bad.write_text("this is a model card, not weights\n")
    elif case == "truncated":
        bad.write_bytes(file.read_bytes()[:4096])
    else:
        _unsupported_quantisation(hf, bad)
    with pytest.raises(HpdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        modeling.import_gguf(bad, tmp_path / "models")
    sets = [a for o in [*TINY, 'run.name="gguf"', f'teacher.path="{bad}"'] for a in ("--set", o)]
    r = CliRunner().invoke(cli, ["run", "--until", "teacher", *sets], env={"HPD_HOME": str(tmp_path / "home")})
    # the conversion's own progress bar may come first; the error is one line, the last
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert sum("error" in line.lower() for line in lines) == 1 and "Traceback" not in r.stderr
    assert not list((tmp_path / "home" / "models").glob("gguf-*"))  # no directory a later run could reuse
    assert not (tmp_path / "home" / "runs" / "gguf" / "teacher" / "manifest.json").exists()
