"""Run configuration: built-in defaults, then a user TOML file, then --set overrides.

Every key a user may set exists in defaults.toml with its type; an unknown key or a value of the wrong type
is an error, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from .errors import HpdError

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
PRESETS = Path(__file__).with_name("presets")  # `--config dialogue` names pipeline/presets/dialogue.toml


def defaults() -> dict:
    return tomllib.loads(DEFAULTS_FILE.read_text())


def _coerce(where: str, default, value):
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise HpdError(f"config {where} must be a {type(default).__name__}, got {value!r}")


def _merge(base: dict, update: dict, source: str) -> None:
    for section, values in update.items():
        if section not in base or not isinstance(values, dict):
            raise HpdError(f"unknown config section [{section}] in {source}; known: {', '.join(base)}")
        for key, value in values.items():
            if key not in base[section]:
                raise HpdError(f"unknown config key {section}.{key} in {source}; "
                               f"known keys of [{section}]: {', '.join(base[section])}")
            base[section][key] = _coerce(f"{section}.{key}", base[section][key], value)


# Allowed ranges of numeric keys (keys not named here: any value of the right type). Checked once, at load,
# so a bad value fails before any stage runs rather than hours later in the stage that reads it.
POSITIVE = ("teacher.learning_rate", "distill.learning_rate", "rounds.learning_rate", "generate.temperature",
            "score.temperature", "refresh.temperature", "eval.temperature", "eval.timeout")
AT_LEAST_ONE = ("distill.hpd_samples", "data.train_examples", "data.heldout_examples", "data.digits", "data.history_messages",
                "data.max_prompt_chars", "data.max_response_chars",
                *(f"{s}.{k}" for s in ("teacher", "distill") for k in ("n_layer", "n_embd", "n_head", "steps",
                                                                        "batch_size", "checkpoint_steps",
                                                                        "eval_examples")),
                "generate.samples_per_prompt", "generate.max_new_tokens", "generate.batch_size",
                "generate.shard_size", "score.batch_size", "score.shard_size", "distill.gradient_accumulation_steps",
                "distill.curve_examples", "rounds.steps", "refresh.samples_per_prompt", "refresh.batch_size",
                "refresh.shard_size", "eval.examples", "eval.samples", "compare.seeds", "compare.steps")
NOT_NEGATIVE = ("run.seed", "generate.batch_tokens", "score.batch_tokens", "eval.batch_tokens", "teacher.warmup_steps", "generate.num_prompts", "score.top_k", "distill.seed",
                "distill.warmup_steps", "distill.curve_every", "rounds.count", "rounds.warmup_steps",
                "refresh.max_new_tokens", "eval.max_new_tokens", "eval.humaneval_problems", "compare.opd_rounds",
                "compare.curve_every")
UNIT_INTERVAL = ("distill.beta", "distill.alpha", "distill.mu", "rounds.refresh_share")


def validate(cfg: dict) -> None:
    """A one-line error for the first value outside its range."""
    def check(keys, ok, what):
        for dotted in keys:
            section, key = dotted.split(".")
            if not ok(cfg[section][key]):
                raise HpdError(f"config {dotted} must be {what}, got {cfg[section][key]!r}")

    check(POSITIVE, lambda v: v > 0, "> 0")
    check(AT_LEAST_ONE, lambda v: v >= 1, ">= 1")
    check(NOT_NEGATIVE, lambda v: v >= 0, ">= 0")
    check(UNIT_INTERVAL, lambda v: 0 <= v <= 1, "between 0 and 1")
    check(("data.operands",), lambda v: v >= 2, ">= 2")
    check(("refresh.prompt_fraction",), lambda v: 0 < v <= 1, "in (0, 1]")
    check(("generate.engine", "score.engine", "refresh.engine"), lambda v: v in ENGINES,
          " or ".join(f'"{e}"' for e in ENGINES))
    check(("teacher.dtype",), lambda v: v in DTYPES, " or ".join(f'"{d}"' for d in DTYPES))
    check(("generate.mode",), lambda v: v in ("dataset", "teacher"), '"dataset" or "teacher"')


# Keys added after runs and caches already existed: at these values they are left out of a stage's fingerprint,
# so adding them never made a finished stage stale (a student retrained, a teacher pass redone).
LATER_KEYS = {"distill.hpd_samples": 4, "distill.fsdp": "", "distill.deepspeed": "", "distill.student_init": "gpt2",
              "teacher.dtype": "auto", "generate.batch_tokens": 0, "score.batch_tokens": 0, "eval.batch_tokens": 0,
              "generate.engine": "transformers", "score.engine": "transformers", "refresh.engine": "transformers"}

DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("transformers", "vllm")  # stages/vllm_engine.py: the optional one (pip install '.[vllm]')


def parse_override(text: str) -> dict:
    """`section.key=value`; the value is read as TOML (numbers, booleans, quoted strings), else as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise HpdError(f"override {text!r} must look like SECTION.KEY=VALUE, e.g. score.top_k=32")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return {section: {key: value}}


def load(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    cfg = copy.deepcopy(defaults())
    if path:
        path = Path(path)
        if not path.is_file() and (PRESETS / f"{path}.toml").is_file():
            path = PRESETS / f"{path}.toml"
        if not path.is_file():
            presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
            raise HpdError(f"config file {path} does not exist; pass a TOML file or a preset ({presets}) to --config")
        try:
            user = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise HpdError(f"config file {path} is not valid TOML: {e}") from None
        _merge(cfg, user, str(path))
    for text in overrides:
        _merge(cfg, parse_override(text), "--set")
    validate(cfg)
    return cfg


def dumps(cfg: dict) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    return "\n".join(f"[{s}]\n" + "".join(f"{k} = {fmt(v)}\n" for k, v in vals.items())
                     for s, vals in cfg.items())
