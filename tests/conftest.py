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

# A run small enough to train, generate and score in a few seconds.
TINY = [
    "data.train_examples=600", "data.heldout_examples=40",
    "teacher.n_layer=1", "teacher.n_embd=32", "teacher.n_head=2", "teacher.steps=8", "teacher.batch_size=32",
    "teacher.warmup_steps=1", "teacher.eval_examples=20",
    "generate.num_prompts=240", "generate.shard_size=100",
    "score.shard_size=50", "score.batch_size=32",
    "distill.steps=4", "distill.batch_size=16", "distill.eval_examples=10", "distill.warmup_steps=1",
    "distill.n_layer=1", "distill.n_embd=16", 'distill.method="hpd"',  # the paper's method: its diagnostics are tested
]


def hpd_cli(home: Path, *args: str, overrides=(), env: dict | None = None, tiny: bool = True):
    """`hpd ARGS` on the tiny config (run "tiny"; `overrides` come after, so they may rename it; tiny=False: only
    the overrides) in this process, through click's test runner: exit code, stdout and stderr apart. The one way
    the tests call the CLI inline."""
    from click.testing import CliRunner

    from hpd.pipeline.cli import cli

    base = [*TINY, 'run.name="tiny"'] if tiny else []
    sets = [a for o in [*base, *overrides] for a in ("--set", o)]
    return CliRunner().invoke(cli, [*args, *sets], env={"HPD_HOME": str(home), **(env or {})})


def hpd_process(home: Path, *args: str, overrides=(), kill_at: str | None = None,
                ranks: int = 1) -> subprocess.CompletedProcess:
    """`hpd ARGS` on the tiny config (run "tiny") in a process of its own, so that HPD_KILL_AT can SIGKILL it;
    with ranks > 1, as that many processes under torchrun (gloo on CPU)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "hpd.pipeline.cli", *args]
    for o in [*TINY, 'run.name="tiny"', *overrides]:
        cmd += ["--set", o]
    env = {**os.environ, "HPD_HOME": str(home), **({"HPD_KILL_AT": kill_at} if kill_at else {}),
           **({"OMP_NUM_THREADS": "1"} if ranks > 1 else {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def make_runner(home: Path, *overrides: str, run: str = "tiny", observers=()) -> Runner:
    return open_run(None, [*TINY, f"run.name={run!r}".replace("'", '"'), *overrides], home=home, log=lambda s: None,
                    observers=observers)


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
