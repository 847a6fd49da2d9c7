"""Loading local HF causal LMs, and the two things every stage does with them: sample and score."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hpd.common.errors import HpdError
from hpd.storage.fingerprint import digest, files_digest

WEIGHT_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.bin"]
TOKENIZER_FILES = ["tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "chat_template*", "*.model",
                   "added_tokens.json"]


def read_config(path: str | Path, what: str = "model path", saved: str = "config, weights and tokenizer"):
    """A local model directory's config, or a one-line error naming `what` (the setting) and why it cannot be read."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise HpdError(f"{what} {path} has no config.json; give a local directory saved with save_pretrained ({saved})")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise HpdError(f"{what} {path}: config.json cannot be read ({str(e).splitlines()[0]})") from None


def check_causal_lm(path: str | Path):
    """The model's config, or a one-line error saying why `path` is not a local causal LM."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    path = Path(path)
    config = read_config(path)
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    saved_as = getattr(config, "architectures", None) or []
    # Encoder families (BERT, RoBERTa, ...) are registered for causal LM too, but only as decoders.
    encoder_only = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
    if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.is_encoder_decoder or encoder_only
            or (saved_as and not causal_classes.intersection(saved_as))):
        what = saved_as[0] if saved_as else config.model_type
        raise HpdError(f"model path {path} holds a {what!r} model, which is not a causal LM; "
                       f"give a decoder model that AutoModelForCausalLM can load")
    return config


def load_causal_lm(path: str | Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading takes seconds; its bar would bury one-line errors
    check_causal_lm(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise HpdError(f"model path {path}: tokenizer cannot be loaded ({str(e).splitlines()[0]}); "
                       f"save it next to the model with tokenizer.save_pretrained") from None
    if not any(next(Path(path).glob(pattern), None) for pattern in ("*.safetensors", "*.bin")):
        raise HpdError(f"model path {path} has a config but no weights (*.safetensors or *.bin); "
                       f"save the model there with save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - truncated or mismatched weights raise many types
        raise HpdError(f"model path {path}: the weights cannot be loaded ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, tokenizer


def encode_pair(tokenizer, prompt: str, response: str | None) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and (if given) the response, through the chat template when there is one."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        p_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        if response is None:
            return p_ids, []
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(p_text):
            raise HpdError("the tokenizer's chat template does not render the prompt as a prefix of the "
                           "conversation; responses cannot be separated from prompts")
        return p_ids, tokenizer(full[len(p_text):], add_special_tokens=False)["input_ids"]
    p_ids = tokenizer(prompt)["input_ids"]
    if response is None:
        return p_ids, []
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    return p_ids, r_ids


def load_teacher(teacher):
    """The teacher stage's model (a stages.artifacts.Teacher) in the dtype it resolved (teacher.dtype: fp32 on
    CPU, bf16 on a GPU by default)."""
    return load_causal_lm(teacher.model_dir, dtype=getattr(torch, teacher.dtype))


def teacher_identity(model_dir, dtype: str) -> str:
    """What caches are keyed on: the teacher's files and the dtype it runs in (it changes what the teacher
    writes; float32 is left out, as before dtypes existed)."""
    fingerprints = model_fingerprints(Path(model_dir))
    return digest(fingerprints if dtype == "float32" else {**fingerprints, "dtype": dtype})


def context_length(model_or_config) -> int:
    c = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(c, name, None):
            return int(getattr(c, name))
    return 1 << 30


def model_fingerprints(path: str | Path) -> dict:
    """Identity of a model directory: its config and weights, and separately its tokenizer."""
    return {"model": files_digest(path, WEIGHT_FILES), "tokenizer": files_digest(path, TOKENIZER_FILES)}


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.from_numpy(np.array(s, dtype=np.int64))
        mask[i, :len(s)] = 1
    return ids, mask


def length_batches(lengths: list[int], batch_size: int, batch_tokens: int = 0) -> list[list[int]]:
    """Indices of each batch. By count: consecutive runs of batch_size. With a token budget: longest first, as
    many sequences as keep the padded batch (count x longest) within batch_tokens, so a batch of short prompts
    is wide and one of long prompts narrow, and little of either is padding. A sequence longer than the budget
    gets a batch of its own."""
    n = len(lengths)
    if not batch_tokens:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    batches, current = [], []
    for i in sorted(range(n), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False, batch_size: int = 64, batch_tokens: int = 0,
           desc: str = "sampling") -> list[list[int]]:
    """Continue each prompt; returns the response ids (in the prompts' order), cut after the first
    end-of-sequence token. batch_tokens > 0 batches by prompt plus new tokens instead of by count."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    out: list[list[int] | None] = [None] * len(prompts)
    batches = length_batches([len(p) + max_new_tokens for p in prompts], batch_size, batch_tokens)
    for idx in tqdm(batches, desc=desc, leave=False, disable=len(batches) <= 1):
        ids, mask = (t.to(model.device) for t in pad_left([prompts[i] for i in idx], pad))
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=not greedy, temperature=temperature if not greedy else None,
                             top_k=None, top_p=None, pad_token_id=pad, eos_token_id=eos)
        for i, row in zip(idx, gen[:, ids.shape[1]:].tolist()):
            out[i] = row[:row.index(eos) + 1] if eos in row else row
    return out


def sample_to_store(ctx, model, tokenizer, prompts: list[list[int]], final: Path, meta: dict, *,
                    samples_per_prompt: int, prompts_per_shard: int, max_new_tokens: int, temperature: float,
                    batch_size: int, seed: int, desc: str, engine: str = "transformers",
                    batch_tokens: int = 0) -> dict:
    """N sampled responses per prompt, published as a sequence store in shards; returns its manifest. An
    interrupted run resumes after its last written shard and samples exactly what it would have (each shard
    has its own seed), which is also why ranks can share the shards out (hpd/common/ranks.py)."""
    from hpd.storage import sequences as seqstore
    from hpd.storage.sharded import ShardedWrite

    n_per = samples_per_prompt
    num_shards = -(-len(prompts) // prompts_per_shard)
    out = ShardedWrite(ctx, lambda rank: seqstore.SequenceWriter(
        final, {**meta, "shard_size": prompts_per_shard * n_per}, rank), num_shards)
    if engine == "vllm":
        from . import vllm_engine

        llm = vllm_engine.load(model.name_or_path, scoring=False, seed=seed)
    for shard in tqdm(list(out.todo()), desc=desc, disable=num_shards < 2 or ctx.rank > 0):
        lo, hi = shard * prompts_per_shard, min((shard + 1) * prompts_per_shard, len(prompts))
        torch.manual_seed(seed * 100003 + shard)
        prompt_ids = [prompts[i] for i in range(lo, hi) for _ in range(n_per)]
        if engine == "vllm":
            responses = vllm_engine.sample(llm, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                           seed=seed * 100003 + shard, eos_token_id=tokenizer.eos_token_id)
        else:
            responses = sample(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               batch_size=batch_size, batch_tokens=batch_tokens, desc=f"sampling shard {shard}")
        first = lo * n_per
        out.write(shard, seqstore.rows_table(
            range(first, first + len(prompt_ids)), [i for i in range(lo, hi) for _ in range(n_per)],
            [len(p) for p in prompt_ids], [p + r for p, r in zip(prompt_ids, responses)]))
    return out.finish()


def to_accelerator(model):
    """The model on this process's GPU (torchrun's LOCAL_RANK) when there is one; as it is otherwise."""
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return model


@torch.no_grad()
@contextmanager
def head_only_at(model, keep: torch.Tensor):
    """Inside this context the model's output head (lm_head) runs only at the positions where `keep` [B, L] is
    true, so a forward returns logits [N, V] in row-major order of `keep` instead of [B, L, V]: the [B, L, V]
    logits and their gradient were most of a training step's memory. A forward pre-hook selects the positions
    from the head's input, so it works on any decoder and any transformers version that has the model, through a
    DDP / FSDP wrapper (whose forward runs as usual) and with tied weights (the module tree is untouched).
    Transformers >= 5.20 can do the same with a boolean `logits_to_keep`; tests/test_modeling.py shows both equal
    in values and gradients."""
    head = getattr(model, "module", model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][keep.to(args[0].device)], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def log_probs(model, seqs: list, pad_id: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 next-token log-probs [B, L, V] of right-padded sequences, and the padding mask."""
    ids, mask = pad_right(seqs, pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits / temperature, dim=-1), mask


def new_gpt2(tokenizer, *, n_positions: int, n_layer: int, n_embd: int, n_head: int):
    """A fresh GPT-2 for the tokenizer. No dropout: these small models learn exact algorithms, and dropout
    both slowed the teacher (41-50% instead of 93% held-out) and made gradient measurements noisy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def keep_layers(teacher, n: int):
    """A student made from `teacher` by keeping `n` of its decoder layers, evenly spaced from the first to the
    last, with its embeddings, final norm and output head (DistilBERT's and Minitron's depth pruning). Works on
    any decoder whose layers sit in one ModuleList of num_hidden_layers blocks (GPT-2, Llama, Qwen, ...)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = teacher.config.get_text_config()
    total = config.num_hidden_layers
    if not 1 <= n <= total:
        raise HpdError(f"distill.n_layer={n}: the teacher has {total} layers, so a student made by keeping "
                       f"layers can have 1 to {total}")
    stack = next((name for name, m in teacher.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == total), None)
    if stack is None:
        raise HpdError(f"cannot find the {total} decoder layers of this {type(teacher).__name__}; "
                       f"use distill.student_init=\"gpt2\" or give distill.student_path")
    kept = [round(i * (total - 1) / max(n - 1, 1)) for i in range(n)]
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
            i, rest = key[len(prefix):].split(".", 1)
            state[key] = source[f"{prefix}{kept[int(i)]}.{rest}"]
        else:
            state[key] = source[key]
    student.load_state_dict(state)
    return student, kept


def check_heads(n_embd: int, n_head: int) -> None:
    """The one check of a student width against its heads (config time and build time alike)."""
    if n_embd % n_head:
        raise HpdError(f"distill.n_embd={n_embd} is not a multiple of distill.n_head={n_head}; choose a width "
                       f"that divides into the heads")


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


def config_digest(model_config) -> str:
    return digest(model_config.to_dict())


GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_expected_size(file: Path) -> int:
    """The bytes a GGUF file must have: its header, then every tensor's data at its offset. Read from the header
    alone (gguf's own reader maps the whole file and fails on a short one without saying so). Raises EOFError
    when the file ends inside the header."""
    import struct

    import gguf

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(file, "rb") as f:
        def read(fmt: str):
            raw = f.read(struct.calcsize("<" + fmt))
            if len(raw) < struct.calcsize("<" + fmt):
                raise EOFError
            return struct.unpack("<" + fmt, raw)[0]

        def skip_value(kind: int):
            if kind == 8:  # string: length, bytes
                f.seek(read("Q"), 1)
            elif kind == 9:  # array: item type, count, items
                item, count = read("I"), read("Q")
                if item in scalar:
                    f.seek(count * struct.calcsize(scalar[item]), 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                read(scalar[kind])

        f.seek(4)
        _version, n_tensors, n_kv = read("I"), read("Q"), read("Q")
        alignment = 32
        for _ in range(n_kv):
            key = f.read(read("Q")).decode("utf-8", "replace")
            kind = read("I")
            if key == "general.alignment" and kind == 4:
                alignment = read("I")
            else:
                skip_value(kind)
        end = 0
        for _ in range(n_tensors):
            f.seek(read("Q"), 1)  # name
            elements = 1
            for _ in range(read("I")):
                elements *= read("Q")
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(read("I"))]
            end = max(end, read("Q") + elements // block * size)
        header = f.tell()
    return -(-header // alignment) * alignment + end


def _check_gguf_size(file: Path) -> None:
    size = file.stat().st_size
    try:
        expected = gguf_expected_size(file)
    except EOFError:
        raise HpdError(f"{file.name} is truncated: it ends inside its header ({size:,} bytes); download or copy the "
                       f"file again") from None
    except (ValueError, KeyError):
        return  # a header this reader does not know: transformers' reader says what is wrong with it
    if size < expected:
        raise HpdError(f"{file.name} is truncated: {size:,} bytes, its header describes {expected:,}; download or "
                       f"copy the file again")


def import_gguf(file: str | Path, model_root: Path) -> Path:
    """A GGUF file (llama.cpp's and ollama's format) as an ordinary HF directory under `model_root`, converted
    once and keyed by the file's content: safetensors in fp32 (dequantised), the tokenizer with its chat
    template, and a generation config. Every later run with the same file reuses the directory."""
    import shutil

    from hpd.storage import atomic
    from hpd.storage.fingerprint import file_digest
    from hpd.storage.shards import lock_for

    file = Path(file).expanduser().resolve()
    if not is_gguf(file):
        raise HpdError(f"teacher.path {file} is not a GGUF file (it does not start with the GGUF magic bytes); "
                       f"give a .gguf file or a local HF model directory")
    _check_gguf_size(file)  # before the lock: a file that cannot be converted leaves nothing behind
    final = model_root / f"gguf-{file.stem[:40]}-{file_digest(file)[:12]}"
    model_root.mkdir(parents=True, exist_ok=True)
    with lock_for(final):
        if (final / "config.json").is_file():
            return final
        try:
            import gguf  # noqa: F401 - transformers reads GGUF files through it
        except ImportError:
            raise HpdError("reading a GGUF file needs the gguf package: pip install gguf") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - transformers raises ValueError, KeyError, NotImplementedError...
            raise HpdError(f"{file.name}: transformers cannot read this GGUF file ({_gguf_problem(file, e)}); "
                           f"convert it from its HF checkpoint instead") from None
        # save_pretrained refuses a model loaded from GGUF: rebuild it from its config and weights.
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        atomic.write_json(tmp / "hpd-gguf.json", {"source": str(file), "file_digest": file_digest(file)})
        atomic.publish_dir(tmp, final)
    return final


def _gguf_problem(file: Path, error: Exception) -> str:
    """Names the architecture or the tensor types of a GGUF file transformers refused, and its own words."""
    first = (str(error).splitlines() or [type(error).__name__])[0][:200]
    try:
        import gguf

        reader = gguf.GGUFReader(str(file))
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field else "unknown"
        types = sorted({t.tensor_type.name for t in reader.tensors})
        return f"architecture {arch!r}, tensor types {', '.join(types)}: {first}"
    except Exception:  # noqa: BLE001 - a damaged file: transformers' own message is all there is
        return first
