"""Run configuration: the built-in defaults (hpd/common/settings.py, where every key is typed and documented), then
a user TOML file, then --set overrides.

An unknown key or a value of the wrong type is an error, so a typo never silently falls back to a default. Every
check of a setting's value is here (`validate`), run when the config is loaded, before any stage: a bad value
fails in a second, not after hours of teacher work. Stages check only what needs their inputs (a k against the
teacher's vocabulary, a prompt against its context).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

from hpd.common.errors import HpdError
from hpd.common.settings import Settings

PRESETS = Path(__file__).with_name("presets")  # `--config dialogue` names hpd/pipeline/presets/dialogue.toml


def _coerce(where: str, default, value):
    """`value` as the type of the key's default: a bool only from a bool, an int from an int, a float from either."""
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


def _merge(cfg: Settings, update: dict, source: str) -> None:
    for name, values in update.items():
        if name not in cfg.sections() or not isinstance(values, dict):
            raise HpdError(f"unknown config section [{name}] in {source}; known: {', '.join(cfg.sections())}")
        section = cfg.section(name)
        keys = [f.name for f in dataclasses.fields(section)]
        for key, value in values.items():
            if key not in keys:
                raise HpdError(
                    f"unknown config key {name}.{key} in {source}; known keys of [{name}]: {', '.join(keys)}"
                )
            setattr(section, key, _coerce(f"{name}.{key}", getattr(section, key), value))


# A run's name is a directory under <home>/runs and a name in teachers.runs: a plain name, never a path.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_name(name: str, where: str = "run.name") -> None:
    if not RUN_NAME.fullmatch(name):
        raise HpdError(
            f"{where}={name!r} is not a plain run name; use letters, digits and -_. (starting with a letter "
            f'or digit, at most 100 characters), e.g. "math-fkl"'
        )


def _check_key(name: str, f: dataclasses.Field, value) -> None:
    """A key's own checks, declared beside it (hpd/common/settings.py): a range, or a set of choices."""
    m = f.metadata
    if m["choices"] is not None and value not in m["choices"]:
        shown = ", ".join(repr(c) if not c else c for c in m["choices"])
        raise HpdError(f"{name}.{f.name}={value!r} is unknown; choose one of {shown} ({m['doc']})")
    low, above, high = m["low"], m["above"], m["high"]
    bad = (
        (low is not None and value < low)
        or (above is not None and value <= above)
        or (high is not None and value > high)
    )
    if bad:
        what = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else f"in ({above}, {high}]"
            if above is not None and high is not None
            else f">= {low}"
            if low is not None
            else f"> {above}"
            if above is not None
            else f"<= {high}"
        )
        raise HpdError(f"config {name}.{f.name} must be {what}, got {value!r}")


def validate(cfg: Settings) -> None:
    """A one-line error for the first value that cannot work: each key's own checks, then those across keys."""
    check_run_name(cfg.run.name)
    for name in cfg.sections():
        section = cfg.section(name)
        for f in dataclasses.fields(section):
            _check_key(name, f, getattr(section, f.name))
    _check_choices(cfg)
    _check_code(cfg)


def _check_code(cfg: Settings) -> None:
    """Settings that run generated or supplied code need the opt-in, code.execute or HPD_ALLOW_CODE_EVAL=1; the
    variable's opt-in is written into code.execute, so the run's saved config.toml reopens as it ran."""
    from hpd.stages import sandbox

    prompts = cfg.generate.prompts
    runs = [
        what
        for on, what in (
            (
                cfg.value.function == "verifier" and prompts,
                f'value.function="verifier" runs the test code of the prompts in {prompts} on the responses',
            ),
            (cfg.eval.humaneval, "eval.humaneval=true runs the student's HumanEval completions"),
        )
        if on
    ]
    cfg.code.execute = sandbox.allowed(cfg.code.execute)
    if runs:
        sandbox.require(runs[0], cfg.code.execute)


def _check_choices(cfg: Settings) -> None:
    """Settings whose allowed values live in the stages (methods, tasks, encodings), and combinations."""
    from hpd.stages.losses import METHODS, ON_POLICY_ONLY
    from hpd.stages.student_models import check_heads
    from hpd.stages.tasks import TASKS
    from hpd.storage import encodings

    data, distill, rounds, score, teachers = cfg.data, cfg.distill, cfg.rounds, cfg.score, cfg.teachers
    for dotted, method, allowed in (
        ("distill.method", distill.method, METHODS),
        ("rounds.method", rounds.method, METHODS),
        ("rounds.offline_method", rounds.offline_method, (*METHODS, "")),
    ):
        if method not in allowed:  # (offline_method "": distill.method)
            raise HpdError(f"{dotted}={method!r} is unknown; choose one of {', '.join(METHODS)}")
    for dotted, method in (("distill.method", distill.method), ("rounds.offline_method", rounds.offline_method)):
        if method in ON_POLICY_ONLY:
            raise HpdError(
                f"{dotted}={method} needs on-policy sequences (the student's own samples), not offline "
                f'ones; use it for refreshed sequences with rounds.method="{method}" (e.g. --config hpd-opd)'
            )
    if distill.baseline not in ("", *METHODS) or distill.baseline in ON_POLICY_ONLY:
        raise HpdError(
            f"distill.baseline={distill.baseline!r} is unknown; choose an offline method "
            f'({", ".join(m for m in METHODS if m not in ON_POLICY_ONLY)}), or "" for none'
        )
    if data.builtin and data.builtin not in TASKS:
        raise HpdError(f'unknown built-in task data.builtin={data.builtin!r}; choose one of {sorted(TASKS)} or ""')
    if not data.builtin:
        for dotted, value, what in (
            ("teacher.path", cfg.teacher.path, "a local teacher directory or GGUF file"),
            ("generate.prompts", cfg.generate.prompts, "a prompts file"),
        ):
            if not value:
                raise HpdError(
                    f"{dotted} is empty and data.builtin is empty (no built-in task); set {dotted} to "
                    f"{what}, or use a built-in task"
                )
    if data.builtin == "chat" and not cfg.teacher.path:
        raise HpdError(
            'data.builtin="chat" is prompts for a given instruct teacher; set teacher.path to its '
            "directory or GGUF file (or use --config smollm2)"
        )
    if distill.student_init == "teacher-shape":
        check_heads(distill.n_embd, distill.n_head)
    if distill.layer_choice != "even" and (distill.student_init != "teacher-layers" or distill.student_path):
        raise HpdError(
            f"distill.layer_choice={distill.layer_choice!r} chooses which of the teacher's layers a "
            'student_init="teacher-layers" student keeps; set that, or leave layer_choice="even"'
        )
    if distill.teacher_source == "online" and rounds.count:
        raise HpdError(
            'refresh rounds train from teacher caches; use distill.teacher_source="cache" with rounds.count > 0'
        )
    try:
        encoding = encodings.get(score.encoding)
    except ValueError as e:
        raise HpdError(f"score.encoding: {e}") from None
    if score.top_k == 1 and encoding.name != "fp16" and not encoding.sampled:
        raise HpdError(f'score.encoding={encoding.name} needs top_k >= 2; use encoding="fp16" for k=1')
    if encoding.sampled and score.engine == "vllm":
        raise HpdError(
            "score.encoding=sampled draws from the teacher's whole distribution, which vLLM does not "
            'return (only its top-k); use score.engine="transformers" or a top-k encoding'
        )
    if score.engine == "vllm" and score.temperature != 1.0:
        raise HpdError(
            'score.engine="vllm" scores at temperature 1 only (vLLM reports raw log-probs); '
            'set score.temperature=1 or use engine="transformers"'
        )
    methods = compare_methods(cfg)
    unknown = [m for m in methods if m not in METHODS and m != "hpd->opd"]
    if unknown or not methods:
        raise HpdError(
            f"compare.methods has unknown {', '.join(unknown) or 'entries'}; choose from {', '.join(METHODS)}, hpd->opd"
        )
    c = cfg.compare
    if "hpd->opd" in methods and (c.opd_rounds < 1 or c.steps - c.opd_rounds * rounds.steps < 1):
        raise HpdError(
            f"hpd->opd needs compare.opd_rounds >= 1 and compare.steps ({c.steps}) above "
            f"opd_rounds x rounds.steps ({c.opd_rounds} x {rounds.steps})"
        )
    linked = linked_runs(cfg)
    if linked and distill.teacher_source == "online":
        raise HpdError(
            'several teachers train from their caches; use distill.teacher_source="cache" with teachers.runs'
        )
    if linked and teachers.mode == "ensemble" and encoding.sampled:
        raise HpdError(
            'teachers.mode="ensemble" mixes the teachers\' top-k and tails, which sampled targets do not '
            'keep; use a top-k score.encoding (compact, idsort-q8) or teachers.mode="route"'
        )
    if linked and teachers.weight + sum(w for _, w in linked) <= 0:
        raise HpdError("teachers.weight and the weights in teachers.runs sum to 0; give some teacher a weight above 0")
    _check_value(cfg)
    if cfg.eval.heldout:  # read now: a bad row found after hours of teacher work costs those hours
        from hpd.stages.metrics import heldout_rows

        heldout_rows(cfg.eval.heldout, cfg.eval.examples)


def _check_value(cfg: Settings) -> None:
    """[value]: value-guided distillation's settings, and that the run has what they act on."""
    from hpd.stages.losses import REWARD_METHODS
    from hpd.stages.tasks import TASKS
    from hpd.stages.value_functions import check_reward_model

    value, rounds = cfg.value, cfg.rounds
    targets = value_targets(cfg)
    if not targets or not targets <= {"generate", "refresh"}:
        raise HpdError(f'value.judge={value.judge!r} must name generate, refresh or both ("generate,refresh")')
    used = [k for k, off in (("select", "none"), ("weighting", "none"), ("advantage", 0.0)) if getattr(value, k) != off]
    if not value.function:
        if used:
            raise HpdError(
                f"value.{used[0]} needs values to act on; set value.function (verifier, reward_model or teacher)"
            )
        return
    if "refresh" in targets and not (rounds.count and rounds.refresh_share > 0):
        raise HpdError(
            "value.judge names refresh, but the run has no refreshed samples; set rounds.count > 0 and "
            'rounds.refresh_share > 0, or value.judge="generate"'
        )
    if value.function == "teacher" and cfg.distill.teacher_source == "online":
        raise HpdError(
            'value.function="teacher" reads the teacher\'s log-probs from the cache; use distill.teacher_source="cache"'
        )
    if value.function == "reward_model":
        if not value.reward_model:
            raise HpdError(
                'value.function="reward_model" needs value.reward_model: a local '
                "AutoModelForSequenceClassification directory with one output"
            )
        check_reward_model(value.reward_model)
    builtin = TASKS.get(cfg.data.builtin)
    if value.function == "verifier" and not cfg.generate.prompts and not hasattr(builtin, "is_correct"):
        raise HpdError(
            f'value.function="verifier" needs answers to check: data.builtin="math", or '
            f"generate.prompts with HumanEval-style test and entry_point fields (the "
            f"{cfg.data.builtin or 'given'} prompts have none)"
        )
    if value.advantage and not (
        ("refresh" in targets and rounds.method in REWARD_METHODS)
        or ("generate" in targets and cfg.distill.method in REWARD_METHODS)
    ):
        raise HpdError(
            f"value.advantage shifts the teacher reward of opd and the hpd family; judge sequences they "
            f"train on (value.judge=refresh with rounds.method={rounds.method}, or generate with "
            f"distill.method={cfg.distill.method}: make one of them opd or an hpd method)"
        )
    one_each = cfg.generate.mode == "dataset" or cfg.generate.samples_per_prompt == 1
    if value.select == "top" and targets == {"generate"} and one_each:
        raise HpdError(
            'value.select="top" keeps the best of each prompt\'s samples, and the offline sequences '
            'have one per prompt; use generate.mode="teacher" with generate.samples_per_prompt > 1, '
            'or value.select="threshold"'
        )


def value_targets(cfg: Settings) -> set[str]:
    """The sequence sets value.judge names: "generate" (offline), "refresh" (every round's samples)."""
    return {x.strip() for x in cfg.value.judge.split(",") if x.strip()}


def compare_methods(cfg: Settings) -> list[str]:
    """compare.methods as a list."""
    return [m.strip() for m in cfg.compare.methods.split(",") if m.strip()]


def linked_runs(cfg: Settings) -> list[tuple[str, float]]:
    """teachers.runs as (run name, weight) pairs: "name" or "name:weight", comma-separated."""
    out = []
    for item in filter(None, (x.strip() for x in cfg.teachers.runs.split(","))):
        name, _, weight = item.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = float("nan")
        if not name or not math.isfinite(w) or w < 0:
            raise HpdError(f"teachers.runs entry {item!r} must be a run name, optionally with :WEIGHT (a number >= 0)")
        check_run_name(name, "teachers.runs entry")
        if name == cfg.run.name or name in (n for n, _ in out):
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


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Settings:
    """The settings of a run: the defaults, then `path` (a TOML file or a preset's name), then `overrides`
    (SECTION.KEY=VALUE), every value checked."""
    cfg = Settings()
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


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def dumps(cfg: Settings, docs: bool = False) -> str:
    """The settings as TOML (what a run saves as its config.toml); with `docs`, each section and key with its
    documentation as comments (`hpd config`)."""
    out = []
    for name in cfg.sections():
        section = cfg.section(name)
        head = f"[{name}]"
        if docs:
            head = "\n".join(f"# {line}" for line in _wrap(type(section).__doc__ or "")) + "\n" + head
        lines = [head]
        for f in dataclasses.fields(section):
            line = f"{f.name} = {_toml(getattr(section, f.name))}"
            if docs:
                line += "\n" + "\n".join(f"    # {part}" for part in _wrap(f.metadata["doc"], 110))
            lines.append(line)
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _wrap(text: str, width: int = 114) -> list[str]:
    import textwrap

    return textwrap.wrap(" ".join(text.split()), width) or [""]
