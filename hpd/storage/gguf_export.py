"""A transformers causal LM written as a GGUF file the way llama.cpp's own converter (convert_hf_to_gguf.py) writes
it, so llama.cpp, Ollama and transformers' GGUF loader read it: its tensor names (the gguf package's name map), the
layouts that converter changes (Llama's Q and K rows reordered for its rotary layout; GPT-2's Conv1D weights
transposed, its tied head written as `output`), the hyperparameters under the architecture's keys, the tokenizer as
a GPT-2-style byte-level BPE (tokens, types, merges, special ids, chat template), and the tensors as f32, f16 or
q8_0 (the gguf package's own quantisation; 1-D tensors stay f32, and a matrix whose rows q8_0's 32-value blocks do
not divide is written f16, as the converter does). Plus free-form metadata (the model card's facts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUPPORTED = ("llama", "qwen2", "gpt2")
TYPES = ("f32", "f16", "q8_0")


class ExportError(ValueError):
    pass


def byte_encoder() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 for U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer writes its pieces in GPT-2's byte-level alphabet (its pre-tokenizer or decoder is
    ByteLevel)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return any('"ByteLevel"' in json.dumps(spec.get(part)) for part in ("pre_tokenizer", "decoder"))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders a Llama Q or K matrix's rows per head (its rotary layout; transformers'
    GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_vocabulary(tokenizer, rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) in GGUF's byte-level BPE form for a head of `rows` rows (rows past the
    tokenizer's tokens are [PAD<i>], unused, as llama.cpp pads). A byte-level BPE is written as it is; a tokenizer
    of single characters (hpd's arithmetic task's) as a byte-level BPE without merges, which cuts text the same way."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, added = spec["model"], tokenizer.added_tokens_decoder
    byte_level = is_byte_level(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if model["type"] == "BPE" and byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        tokens = list(pieces)
    elif model["type"] == "WordLevel" and all(i in added or len(p) == 1 for i, p in enumerate(pieces)):
        enc = byte_encoder()
        merges = []
        tokens = [p if i in added else "".join(enc[b] for b in p.encode()) for i, p in enumerate(pieces)]
    else:
        raise ExportError(
            f"the student's tokenizer is a {model['type']} model{'' if byte_level else ' without byte-level pieces'}; "
            f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2) and single characters"
        )
    types = []
    for i in range(len(tokens)):
        a = added.get(i)
        types.append(
            gguf.TokenType.NORMAL if a is None else gguf.TokenType.CONTROL if a.special else gguf.TokenType.USER_DEFINED
        )
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


def _hyperparameters(w, arch: str, c) -> None:
    if arch == "gpt2":
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        return
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)


def _tensors(model, arch: str):
    """(GGUF name, float32 array) of every weight, in the layouts llama.cpp's converter writes."""
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers, not weights
        if name == "lm_head.weight" and tied and arch != "gpt2":
            continue  # tied: token_embd only, as the converter writes it
        if name == "lm_head.weight" and arch == "gpt2":
            continue  # written as `output` beside token_embd below
        data = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, c.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, c.num_key_value_heads)
        elif arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T  # Conv1D stores [in, out]; llama.cpp reads [out, in]
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"the student's weight {name} has no GGUF name for {arch}; it cannot be exported")
        yield gguf_name, np.ascontiguousarray(data)
        if arch == "gpt2" and gguf_name == "token_embd.weight":
            head = model.get_output_embeddings().weight.detach().float().numpy()
            yield "output.weight", np.ascontiguousarray(head)


def write_gguf(model, tokenizer, out: Path, kind: str = "f16", metadata: dict | None = None, pre: str = "default"):
    """`model` (a transformers causal LM of a SUPPORTED architecture) and its tokenizer as the GGUF file `out`,
    tensors as `kind`; `metadata`: strings under their own keys (general.name, general.description, hpd.*);
    `pre`: llama.cpp's name for the tokenizer's pre-tokenizer (the source GGUF's, when the student came from one)."""
    import gguf

    arch = model.config.model_type
    if arch not in SUPPORTED:
        raise ExportError(f"GGUF export writes {', '.join(SUPPORTED)} models; this student is {arch}")
    if kind not in TYPES:
        raise ExportError(f"--type {kind} is unknown; choose one of {', '.join(TYPES)}")
    c = model.config
    rows = model.get_output_embeddings().weight.shape[0]
    tokens, types, merges = tokenizer_vocabulary(tokenizer, rows)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[kind]
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.upper()]])
    for key, value in (metadata or {}).items():
        w.add_string(key, str(value))
    _hyperparameters(w, arch, c)
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    else:  # single characters: flat scores, from which readers that want merges derive none
        w.add_token_scores([0.0] * len(tokens))
    for what, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if token_id is not None:
            getattr(w, f"add_{what}_token_id")(token_id)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        w.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    for name, data in _tensors(model, arch):
        if kind == "f32" or data.ndim == 1:
            w.add_tensor(name, data.astype(np.float32))
        elif kind == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def read_metadata(path: Path, prefix: str = "") -> dict[str, str]:
    """A GGUF file's string metadata (keys starting with `prefix`): what a model card put there."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(prefix) and field.types and field.types[0] == gguf.GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
    return out
