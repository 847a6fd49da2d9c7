"""Run configuration: built-in defaults, then a user TOML file, then --set overrides.

Every key a user may set exists in defaults.toml with its type; an unknown key or a value of the wrong type
is an error, so a typo never silently falls back to a default. Every check of a setting's value is here
(`validate`), run when the config is loaded, before any stage: a bad value fails in a second, not after hours
of teacher work. Stages check only what needs their inputs (a k against the teacher's vocabulary, a prompt
against its context).
"""
from __future__ import annotations

import copy
import math
import re
import tomllib
from pathlib import Path

from hpd.common.errors import HpdError

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
PRESETS = Path(__file__).with_name("presets")  # `--config dialogue` names hpd/pipeline/presets/dialogue.toml


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
POSITIVE = ("value.tau", "value.timeout", "teacher.learning_rate", "distill.learning_rate", "rounds.learning_rate", "generate.temperature",
            "score.temperature", "refresh.temperature", "eval.temperature", "eval.timeout")
AT_LEAST_ONE = ("distill.hpd_samples", "data.train_examples", "data.heldout_examples", "data.digits", "data.history_messages",
                "data.max_prompt_chars", "data.max_response_chars",
                *(f"{s}.{k}" for s in ("teacher", "distill") for k in ("n_layer", "n_embd", "n_head", "steps",
                                                                        "batch_size", "checkpoint_steps",
                                                                        "eval_examples")),
                "generate.samples_per_prompt", "generate.max_new_tokens", "generate.batch_size",
                "generate.shard_size", "score.batch_size", "score.shard_size", "distill.gradient_accumulation_steps",
                "distill.curve_examples", "rounds.steps", "refresh.samples_per_prompt", "refresh.batch_size",
                "refresh.shard_size", "value.batch_size", "eval.examples", "eval.samples", "compare.seeds", "compare.steps")
NOT_NEGATIVE = ("run.seed", "generate.batch_tokens", "score.batch_tokens", "eval.batch_tokens", "teacher.warmup_steps", "generate.num_prompts", "score.top_k", "distill.seed",
                "distill.warmup_steps", "distill.curve_every", "rounds.count", "rounds.warmup_steps",
                "refresh.max_new_tokens", "eval.max_new_tokens", "eval.humaneval_problems", "compare.opd_rounds",
                "compare.curve_every", "teachers.weight")
UNIT_INTERVAL = ("distill.beta", "distill.alpha", "distill.mu", "rounds.refresh_share")


# A run's name is a directory under <home>/runs and a name in teachers.runs: a plain name, never a path.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_name(name: str, where: str = "run.name") -> None:
    if not RUN_NAME.fullmatch(name):
        raise HpdError(f"{where}={name!r} is not a plain run name; use letters, digits and -_. (starting with a letter "
                       f"or digit, at most 100 characters), e.g. \"math-fkl\"")


def validate(cfg: dict) -> None:
    """A one-line error for the first value outside its range."""
    check_run_name(cfg["run"]["name"])
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
    check(("refresh.prompt_fraction", "value.keep"), lambda v: 0 < v <= 1, "in (0, 1]")
    check(("generate.engine", "score.engine", "refresh.engine"), lambda v: v in ENGINES,
          " or ".join(f'"{e}"' for e in ENGINES))
    check(("teacher.dtype",), lambda v: v in DTYPES, " or ".join(f'"{d}"' for d in DTYPES))
    check(("generate.mode",), lambda v: v in ("dataset", "teacher"), '"dataset" or "teacher"')
    check(("generate.too_long",), lambda v: v in ("refuse", "truncate"), '"refuse" or "truncate"')
    _check_choices(cfg)
    _check_code(cfg)


def _check_code(cfg: dict) -> None:
    """Settings that run generated or supplied code need the opt-in, code.execute or HPD_ALLOW_CODE_EVAL=1; the
    variable's opt-in is written into code.execute, so the run's saved config.toml reopens as it ran."""
    from hpd.stages import sandbox

    prompts = cfg["generate"]["prompts"]
    runs = [what for on, what in (
        (cfg["value"]["function"] == "verifier" and prompts,
         f'value.function="verifier" runs the test code of the prompts in {prompts} on the responses'),
        (cfg["eval"]["humaneval"], "eval.humaneval=true runs the student's HumanEval completions")) if on]
    cfg["code"]["execute"] = sandbox.allowed(cfg["code"]["execute"])
    if runs:
        sandbox.require(runs[0], cfg["code"]["execute"])


def _check_choices(cfg: dict) -> None:
    """Settings whose allowed values live in the stages (methods, tasks, encodings), and combinations."""
    from hpd.stages.losses import METHODS, ON_POLICY_ONLY
    from hpd.stages.student_models import check_heads
    from hpd.stages.tasks import TASKS
    from hpd.storage import encodings

    data, distill, rounds, score = cfg["data"], cfg["distill"], cfg["rounds"], cfg["score"]
    if distill["teacher_source"] not in ("cache", "online"):
        raise HpdError(f"distill.teacher_source={distill['teacher_source']!r} is unknown; choose cache "
                       f"(train from the teacher cache) or online (the teacher in memory, the baseline)")
    if distill["student_init"] not in ("gpt2", "teacher-layers", "teacher-shape"):
        raise HpdError(f"distill.student_init={distill['student_init']!r} is unknown; choose gpt2 (a fresh "
                       f"GPT-2), teacher-layers (the teacher with distill.n_layer of its layers kept) or "
                       f"teacher-shape (a fresh model of the teacher's architecture, n_layer x n_embd)")
    for section, key in (("distill", "method"), ("rounds", "method"), ("rounds", "offline_method")):
        allowed = (*METHODS, "") if key == "offline_method" else METHODS  # "": distill.method
        if cfg[section][key] not in allowed:
            raise HpdError(f"{section}.{key}={cfg[section][key]!r} is unknown; choose one of {', '.join(METHODS)}")
    for dotted, method in (("distill.method", distill["method"]), ("rounds.offline_method", rounds["offline_method"])):
        if method in ON_POLICY_ONLY:
            raise HpdError(f"{dotted}={method} needs on-policy sequences (the student's own samples), not offline "
                           f"ones; use it for refreshed sequences with rounds.method=\"{method}\" (e.g. --config hpd-opd)")
    baseline = distill["baseline"]
    if baseline not in ("", *METHODS) or baseline in ON_POLICY_ONLY:
        raise HpdError(f"distill.baseline={baseline!r} is unknown; choose an offline method "
                       f"({', '.join(m for m in METHODS if m not in ON_POLICY_ONLY)}), or \"\" for none")
    if data["builtin"] and data["builtin"] not in TASKS:
        raise HpdError(f"unknown built-in task data.builtin={data['builtin']!r}; choose one of {sorted(TASKS)} or \"\"")
    if not data["builtin"]:
        for dotted, value, what in (("teacher.path", cfg["teacher"]["path"], "a local teacher directory or GGUF file"),
                                    ("generate.prompts", cfg["generate"]["prompts"], "a prompts file")):
            if not value:
                raise HpdError(f"{dotted} is empty and data.builtin is empty (no built-in task); set {dotted} to "
                               f"{what}, or use a built-in task")
    if data["builtin"] == "chat" and not cfg["teacher"]["path"]:
        raise HpdError("data.builtin=\"chat\" is prompts for a given instruct teacher; set teacher.path to its "
                       "directory or GGUF file (or use --config smollm2)")
    if distill["student_init"] == "teacher-shape":
        check_heads(distill["n_embd"], distill["n_head"])
    if distill["teacher_source"] == "online" and rounds["count"]:
        raise HpdError("refresh rounds train from teacher caches; use distill.teacher_source=\"cache\" "
                       "with rounds.count > 0")
    try:
        encoding = encodings.get(score["encoding"])
    except ValueError as e:
        raise HpdError(f"score.encoding: {e}") from None
    if score["top_k"] == 1 and encoding.name != "fp16" and not encoding.sampled:
        raise HpdError(f"score.encoding={encoding.name} needs top_k >= 2; use encoding=\"fp16\" for k=1")
    if encoding.sampled and score["engine"] == "vllm":
        raise HpdError("score.encoding=sampled draws from the teacher's whole distribution, which vLLM does not "
                       "return (only its top-k); use score.engine=\"transformers\" or a top-k encoding")
    methods = [m.strip() for m in cfg["compare"]["methods"].split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m != "hpd->opd"]
    if unknown or not methods:
        raise HpdError(f"compare.methods has unknown {', '.join(unknown) or 'entries'}; "
                       f"choose from {', '.join(METHODS)}, hpd->opd")
    c = cfg["compare"]
    if "hpd->opd" in methods and (c["opd_rounds"] < 1 or c["steps"] - c["opd_rounds"] * rounds["steps"] < 1):
        raise HpdError(f"hpd->opd needs compare.opd_rounds >= 1 and compare.steps ({c['steps']}) above "
                       f"opd_rounds x rounds.steps ({c['opd_rounds']} x {rounds['steps']})")
    teachers = cfg["teachers"]
    if teachers["mode"] not in ("route", "ensemble"):
        raise HpdError(f"teachers.mode={teachers['mode']!r} is unknown; choose route (each run's sequences with its "
                       f"own teacher's targets) or ensemble (the teachers' mixture on this run's sequences)")
    if teachers["weighting"] not in ("fixed", "confidence"):
        raise HpdError(f"teachers.weighting={teachers['weighting']!r} is unknown; choose fixed or confidence")
    linked = linked_runs(cfg)
    if linked and distill["teacher_source"] == "online":
        raise HpdError("several teachers train from their caches; use distill.teacher_source=\"cache\" with "
                       "teachers.runs")
    if linked and teachers["mode"] == "ensemble" and encoding.sampled:
        raise HpdError("teachers.mode=\"ensemble\" mixes the teachers' top-k and tails, which sampled targets do not "
                       "keep; use a top-k score.encoding (compact, idsort-q8) or teachers.mode=\"route\"")
    if linked and teachers["weight"] + sum(w for _, w in linked) <= 0:
        raise HpdError("teachers.weight and the weights in teachers.runs sum to 0; give some teacher a weight above 0")
    _check_value(cfg)
    if cfg["eval"]["heldout"]:  # read now: a bad row found after hours of teacher work costs those hours
        from hpd.stages.evaluators import heldout_rows

        heldout_rows(cfg["eval"]["heldout"], cfg["eval"]["examples"])
    if score["engine"] == "vllm" and score["temperature"] != 1.0:
        raise HpdError("score.engine=\"vllm\" scores at temperature 1 only (vLLM reports raw log-probs); "
                       "set score.temperature=1 or use engine=\"transformers\"")


def _check_value(cfg: dict) -> None:
    """[value]: value-guided distillation's settings, and that the run has what they act on."""
    from hpd.stages.losses import HPD_FAMILY
    from hpd.stages.tasks import TASKS
    from hpd.stages.values import FUNCTIONS, SELECT, WEIGHTING, check_reward_model

    value, rounds = cfg["value"], cfg["rounds"]
    for key, allowed in (("function", ("", *FUNCTIONS)), ("select", SELECT), ("weighting", WEIGHTING),
                         ("teacher_reduce", ("mean", "sum"))):
        if value[key] not in allowed:
            raise HpdError(f"value.{key}={value[key]!r} is unknown; choose one of "
                           f"{', '.join(repr(a) if not a else a for a in allowed)}")
    targets = value_targets(cfg)
    if not targets or not targets <= {"generate", "refresh"}:
        raise HpdError(f"value.judge={value['judge']!r} must name generate, refresh or both (\"generate,refresh\")")
    used = [k for k, off in (("select", "none"), ("weighting", "none"), ("advantage", 0.0)) if value[k] != off]
    if not value["function"]:
        if used:
            raise HpdError(f"value.{used[0]} needs values to act on; set value.function (verifier, reward_model or "
                           f"teacher)")
        return
    if "refresh" in targets and not (rounds["count"] and rounds["refresh_share"] > 0):
        raise HpdError("value.judge names refresh, but the run has no refreshed samples; set rounds.count > 0 and "
                       "rounds.refresh_share > 0, or value.judge=\"generate\"")
    if value["function"] == "teacher" and cfg["distill"]["teacher_source"] == "online":
        raise HpdError("value.function=\"teacher\" reads the teacher's log-probs from the cache; use "
                       "distill.teacher_source=\"cache\"")
    if value["function"] == "reward_model":
        if not value["reward_model"]:
            raise HpdError("value.function=\"reward_model\" needs value.reward_model: a local "
                           "AutoModelForSequenceClassification directory with one output")
        check_reward_model(value["reward_model"])
    builtin = TASKS.get(cfg["data"]["builtin"])
    if value["function"] == "verifier" and not cfg["generate"]["prompts"] and not hasattr(builtin, "is_correct"):
        raise HpdError(f"value.function=\"verifier\" needs answers to check: data.builtin=\"math\", or "
                       f"generate.prompts with HumanEval-style test and entry_point fields (the "
                       f"{cfg['data']['builtin'] or 'given'} prompts have none)")
    rewarded = ("opd", *HPD_FAMILY)  # the methods with a per-token teacher reward for the advantage to shift
    if value["advantage"] and not (("refresh" in targets and rounds["method"] in rewarded) or
                                   ("generate" in targets and cfg["distill"]["method"] in rewarded)):
        raise HpdError(f"value.advantage shifts the teacher reward of opd and the hpd family; judge sequences they "
                       f"train on (value.judge=refresh with rounds.method={rounds['method']}, or generate with "
                       f"distill.method={cfg['distill']['method']}: make one of them opd or an hpd method)")
    one_each = cfg["generate"]["mode"] == "dataset" or cfg["generate"]["samples_per_prompt"] == 1
    if value["select"] == "top" and targets == {"generate"} and one_each:
        raise HpdError("value.select=\"top\" keeps the best of each prompt's samples, and the offline sequences "
                       "have one per prompt; use generate.mode=\"teacher\" with generate.samples_per_prompt > 1, "
                       "or value.select=\"threshold\"")


def value_targets(cfg: dict) -> set[str]:
    """The sequence sets value.judge names: "generate" (offline), "refresh" (every round's samples)."""
    return {x.strip() for x in cfg["value"]["judge"].split(",") if x.strip()}


# Keys added after runs and caches already existed: at these values they are left out of a stage's fingerprint,
# so adding them never made a finished stage stale (a student retrained, a teacher pass redone).
LATER_KEYS = {"data.operand_mix": "", "distill.hpd_samples": 4, "distill.fsdp": "", "distill.deepspeed": "", "distill.student_init": "gpt2",
              "teacher.dtype": "auto", "generate.batch_tokens": 0, "score.batch_tokens": 0, "eval.batch_tokens": 0,
              "generate.engine": "transformers", "score.engine": "transformers", "refresh.engine": "transformers"}

DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("transformers", "vllm")  # hpd/stages/vllm_engine.py: the optional one (pip install '.[vllm]')


def linked_runs(cfg: dict) -> list[tuple[str, float]]:
    """teachers.runs as (run name, weight) pairs: "name" or "name:weight", comma-separated."""
    out = []
    for item in filter(None, (x.strip() for x in cfg["teachers"]["runs"].split(","))):
        name, _, weight = item.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = float("nan")
        if not name or not math.isfinite(w) or w < 0:
            raise HpdError(f"teachers.runs entry {item!r} must be a run name, optionally with :WEIGHT (a number >= 0)")
        check_run_name(name, "teachers.runs entry")
        if name == cfg["run"]["name"] or name in (n for n, _ in out):
            raise HpdError(f"teachers.runs names run {name!r} twice (or this run itself); name each other run once")
        out.append((name, w))
    return out


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
