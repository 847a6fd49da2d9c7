"""Opening a run: the one way from a config (a TOML file or a preset, and overrides) to a runner over its stage
graph. The `hpd` command line, `hpd compare`, the benches and your own code all start here:

    run = open_run("smollm2", ["distill.method=fkl"])
    run.run(until="score")              # the teacher cache alone (`make teacher-cache`)
    cache = run.outputs("score")        # a stages.artifacts.Cache
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hpd.common.errors import HpdError

from . import config as config_mod
from .graph import build
from .stage import Runner, context_from_config


def open_run(
    config: str | Path | None = None,
    overrides=(),
    *,
    home: str | Path | None = None,
    log=None,
    observers=(),
    _via: tuple[str, ...] = (),
) -> Runner:
    """A runner for the run `config` and `overrides` describe (`run.name`, `run.seed`, ... among them). `home`
    replaces run.home (and HPD_HOME); `log` replaces printing; `observers` hear what stages measure of
    themselves (observer(stage, figures): seconds, memory), for benches and profiling. (`_via`: the runs whose
    teachers.runs led here, to refuse a loop rather than open runs forever.)"""
    cfg = config_mod.load(config, list(overrides))
    ctx = context_from_config(cfg)
    if home is not None:
        ctx = replace(ctx, home=Path(home).resolve())
    if log is not None:
        ctx = replace(ctx, log=log)
    via = (*_via, cfg.run.name)
    linked = {}  # [teachers] runs: each opened as it was configured when it last ran
    for name, _ in config_mod.linked_runs(cfg):
        if name in via:
            loop = " -> ".join((*via[via.index(name) :], name))
            raise HpdError(
                f"teachers.runs forms a loop ({loop}): a run cannot learn from itself through other runs; "
                f"remove one of these links"
            )
        saved = ctx.home / "runs" / name / "config.toml"
        linked[name] = open_run(saved, home=ctx.home, log=ctx.log, _via=via) if saved.is_file() else None
    return Runner(build(cfg), cfg, replace(ctx, observers=tuple(observers)), linked)
