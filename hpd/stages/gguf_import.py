"""A GGUF file (llama.cpp's and Ollama's format) as a teacher: checked whole, converted once into an HF directory."""

from __future__ import annotations

from pathlib import Path

import torch

from hpd.common.errors import HpdError

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
        raise HpdError(
            f"{file.name} is truncated: it ends inside its header ({size:,} bytes); download or copy the file again"
        ) from None
    except (ValueError, KeyError):
        return  # a header this reader does not know: transformers' reader says what is wrong with it
    if size < expected:
        raise HpdError(
            f"{file.name} is truncated: {size:,} bytes, its header describes {expected:,}; download or "
            f"copy the file again"
        )


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
        raise HpdError(
            f"teacher.path {file} is not a GGUF file (it does not start with the GGUF magic bytes); "
            f"give a .gguf file or a local HF model directory"
        )
    _check_gguf_size(file)  # before the lock: a file that cannot be converted leaves nothing behind
    final = model_root / f"gguf-{file.stem[:40]}-{file_digest(file)[:12]}"
    model_root.mkdir(parents=True, exist_ok=True)
    with lock_for(final):
        if (final / "config.json").is_file():
            _drop_gguf_quantization(final / "config.json")  # directories converted before the weights said so
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
            raise HpdError(
                f"{file.name}: transformers cannot read this GGUF file ({_gguf_problem(file, e)}); "
                f"convert it from its HF checkpoint instead"
            ) from None
        # save_pretrained refuses a model loaded from GGUF: rebuild it from its config and weights. The weights are
        # dequantised fp32, so the config no longer names a quantisation (with it, the Trainer refuses to train the
        # model as a student: "cannot perform fine-tuning on purely quantized models").
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
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


def _drop_gguf_quantization(config_path: Path) -> None:
    from hpd.storage import atomic

    config = atomic.read_json(config_path)
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        atomic.write_json(config_path, config)


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
