"""Bad input: a one-line error, a non-zero exit, and nothing published that could pass for finished work."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import BertConfig, BertForMaskedLM

from pipeline.cli import cli

from conftest import TINY, copy_home


@pytest.fixture(scope="module")
def home(tiny_home, tmp_path_factory):
    return copy_home(tiny_home, tmp_path_factory.mktemp("bad") / "home")


def _hpd(home, *args, overrides=()):
    sets = []
    for o in [*TINY, *overrides]:
        sets += ["--set", o]
    return CliRunner().invoke(cli, [*args, *sets], env={"HPD_HOME": str(home)})


def _assert_clean_failure(result, home, run, stage, message):
    assert result.exit_code == 2, result.output
    # Stages that succeeded first may have drawn progress bars; the error itself is one line, the last.
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert sum("error" in line.lower() for line in lines) == 1, result.stderr
    assert message in lines[-1], lines[-1]
    stage_dir = home / "runs" / run / stage
    assert not (stage_dir / "manifest.json").exists()
    assert not (stage_dir / "sequences").exists()


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _prompts_case(home, tmp_path, run, rows, suffix=".jsonl"):
    src = _jsonl(tmp_path / f"p{suffix}", rows)
    return _hpd(home, "run", "--until", "generate",
                overrides=[f'run.name="{run}"', f'generate.prompts="{src}"'])


def test_missing_prompts_file(home):
    r = _hpd(home, "run", "--until", "generate", overrides=['run.name="missing"', 'generate.prompts="/no/such.jsonl"'])
    _assert_clean_failure(r, home, "missing", "generate", "/no/such.jsonl does not exist")


def test_malformed_jsonl_names_the_line(home, tmp_path):
    rows = [{"prompt": "1+2:", "response": "3"}, {"prompt": "2+2:", "response": "4"}, '{"prompt": "3+', 
            {"prompt": "4+4:", "response": "8"}]
    r = _prompts_case(home, tmp_path, "malformed", rows)
    _assert_clean_failure(r, home, "malformed", "generate", "line 3 is not valid JSON")


def test_empty_prompt(home, tmp_path):
    r = _prompts_case(home, tmp_path, "empty", [{"prompt": "1+2:", "response": "3"}, {"prompt": " ", "response": "4"}])
    _assert_clean_failure(r, home, "empty", "generate", "row 2: the prompt is empty")


def test_sequence_longer_than_context(home, tmp_path):
    r = _prompts_case(home, tmp_path, "long", [{"prompt": "1+2:", "response": "3"},
                                               {"prompt": "1+" * 40 + "1:", "response": "41"}])
    _assert_clean_failure(r, home, "long", "generate", "row 2: prompt + response is 85 tokens, longer than the teacher's context of 64")


def test_missing_field(home, tmp_path):
    r = _prompts_case(home, tmp_path, "field", [{"question": "1+2:", "response": "3"}])
    _assert_clean_failure(r, home, "field", "generate", "has no field 'prompt'")


def test_k_larger_than_vocabulary(home):
    r = _hpd(home, "run", overrides=['run.name="bigk"', "score.top_k=1000"])
    _assert_clean_failure(r, home, "bigk", "score", "score.top_k=1000 must be between 1 and the teacher's vocabulary size (18)")
    assert not any(p.name.startswith(".tmp-") for p in (home / "caches").iterdir())


def test_teacher_that_is_not_a_causal_lm(home, tmp_path):
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(**small)).save_pretrained(bert)  # a real model directory, but a masked LM
    r = _hpd(home, "run", overrides=['run.name="bert"', f'teacher.path="{bert}"'])
    _assert_clean_failure(r, home, "bert", "teacher", "holds a 'BertForMaskedLM' model, which is not a causal LM")
    bare = tmp_path / "bare"
    BertConfig(**small).save_pretrained(bare)  # no architectures recorded: judged by its type
    r = _hpd(home, "run", overrides=['run.name="bare"', f'teacher.path="{bare}"'])
    _assert_clean_failure(r, home, "bare", "teacher", "holds a 'bert' model, which is not a causal LM")
    r = _hpd(home, "run", overrides=['run.name="nodir"', f'teacher.path="{tmp_path}"'])
    _assert_clean_failure(r, home, "nodir", "teacher", "has no config.json")


def test_unknown_config_key_and_stage(home):
    r = _hpd(home, "run", overrides=["score.topk=3"])
    assert r.exit_code == 2 and "unknown config key score.topk" in r.stderr
    r = _hpd(home, "run", "nosuchstage")
    assert r.exit_code == 2 and "unknown stage 'nosuchstage'" in r.stderr
