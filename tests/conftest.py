"""Shared fixtures. Everything is real (HF models saved and loaded from disk, the `tokenizers` library,
`datasets`, Arrow files); only the scale is small so the suite runs in minutes on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from hpd.pipeline.runs import open_run  # noqa: E402
from hpd.pipeline.stage import Runner  # noqa: E402

# Tests run the `tiny` preset (hpd/pipeline/presets/tiny.toml): the default run small enough to train, generate
# and score in a few seconds. Only the scale is faked.
TINY = "tiny"


# The integration tests that `make test-compat` runs again on the oldest supported transformers (with every unit
# test): those that exercise what differs between transformers versions (GGUF loading, the output head at response
# positions, the Trainer's checkpoints and resumption, generation) and the whole pipeline once. The full suite on
# the pinned version (`make test`) runs everything.
COMPAT = {"test_pipeline", "test_gguf", "test_hf_models", "test_distill", "test_generate", "test_refresh"}


def pytest_collection_modifyitems(items):
    """Every test a module does not mark `unit` is an integration test: `pytest -m unit` is the fast half."""
    for item in items:
        if "unit" not in item.keywords:
            item.add_marker(pytest.mark.integration)
        if item.module.__name__ in COMPAT:
            item.add_marker(pytest.mark.compat)


def hpd_cli(home: Path, *args: str, overrides=(), env: dict | None = None, tiny: bool = True):
    """`hpd ARGS` on the tiny config (run "tiny"; `overrides` come after, so they may rename it; tiny=False: only
    the overrides) in this process, through click's test runner: exit code, stdout and stderr apart. The one way
    the tests call the CLI inline."""
    from click.testing import CliRunner

    from hpd.pipeline.cli import cli

    sets = [a for o in overrides for a in ("--set", o)]
    return CliRunner().invoke(
        cli, [*args, *(["--config", TINY] if tiny else []), *sets], env={"HPD_HOME": str(home), **(env or {})}
    )


def hpd_process(
    home: Path, *args: str, overrides=(), kill_at: str | None = None, ranks: int = 1
) -> subprocess.CompletedProcess:
    """`hpd ARGS` on the tiny config (run "tiny") in a process of its own, so that HPD_KILL_AT can SIGKILL it;
    with ranks > 1, as that many processes under torchrun (gloo on CPU)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "hpd.pipeline.cli", *args, "--config", TINY]
    for o in overrides:
        cmd += ["--set", o]
    env = {
        **os.environ,
        "HPD_HOME": str(home),
        **({"HPD_KILL_AT": kill_at} if kill_at else {}),
        **({"OMP_NUM_THREADS": "1"} if ranks > 1 else {}),
    }
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def make_runner(home: Path, *overrides: str, run: str = "tiny", observers=()) -> Runner:
    return open_run(
        TINY, [f"run.name={run!r}".replace("'", '"'), *overrides], home=home, log=lambda s: None, observers=observers
    )


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory) -> Path:
    """A home with one finished tiny run (data, teacher, generate, score, distill). Tests must not modify it."""
    home = tmp_path_factory.mktemp("home")
    make_runner(home).run()
    return home


@pytest.fixture(scope="session")
def tiny_runner(tiny_home) -> Runner:
    return make_runner(tiny_home)


@pytest.fixture(scope="session")
def teacher_dir(tiny_runner) -> Path:
    return Path(tiny_runner.manifest("teacher")["outputs"]["model_dir"])


def copy_home(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst
