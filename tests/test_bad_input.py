"""Bad input: a one-line error, a non-zero exit, and nothing published that could pass for finished work."""

import json
import shutil
from pathlib import Path

import pytest
from transformers import BertConfig, BertForMaskedLM

from conftest import copy_home, hpd_cli


@pytest.fixture(scope="module")
def home(tiny_home, tmp_path_factory):
    return copy_home(tiny_home, tmp_path_factory.mktemp("bad") / "home")


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
    return hpd_cli(home, "run", "--until", "generate", overrides=[f'run.name="{run}"', f'generate.prompts="{src}"'])


def test_missing_prompts_file(home):
    r = hpd_cli(
        home, "run", "--until", "generate", overrides=['run.name="missing"', 'generate.prompts="/no/such.jsonl"']
    )
    _assert_clean_failure(r, home, "missing", "generate", "/no/such.jsonl does not exist")


def test_malformed_jsonl_names_the_line(home, tmp_path):
    rows = [
        {"prompt": "1+2:", "response": "3"},
        {"prompt": "2+2:", "response": "4"},
        '{"prompt": "3+',
        {"prompt": "4+4:", "response": "8"},
    ]
    r = _prompts_case(home, tmp_path, "malformed", rows)
    _assert_clean_failure(r, home, "malformed", "generate", "line 3 is not valid JSON")


def test_empty_prompt(home, tmp_path):
    r = _prompts_case(home, tmp_path, "empty", [{"prompt": "1+2:", "response": "3"}, {"prompt": " ", "response": "4"}])
    _assert_clean_failure(r, home, "empty", "generate", "row 2: the prompt is empty")


def test_sequence_longer_than_context(home, tmp_path):
    r = _prompts_case(
        home, tmp_path, "long", [{"prompt": "1+2:", "response": "3"}, {"prompt": "1+" * 40 + "1:", "response": "41"}]
    )
    _assert_clean_failure(
        r, home, "long", "generate", "row 2: prompt + response is 85 tokens, longer than the teacher's context of 64"
    )


def test_missing_field(home, tmp_path):
    r = _prompts_case(home, tmp_path, "field", [{"question": "1+2:", "response": "3"}])
    _assert_clean_failure(r, home, "field", "generate", "has no field 'prompt'")


def test_k_larger_than_vocabulary(home):
    r = hpd_cli(home, "run", overrides=['run.name="bigk"', "score.top_k=1000"])
    _assert_clean_failure(
        r, home, "bigk", "score", "score.top_k=1000 must be between 1 and the teacher's vocabulary size (18)"
    )
    assert not any(p.name.startswith(".tmp-") for p in (home / "caches").iterdir())


def test_vllm_engine_where_it_cannot_run_and_an_unknown_engine(home):
    from hpd.stages import vllm_engine

    reason = vllm_engine.unavailable()
    if reason is not None:  # the usual CPU machine: the choice is refused before any cache is written
        r = hpd_cli(home, "run", overrides=['run.name="vllm"', 'score.engine="vllm"'])
        _assert_clean_failure(r, home, "vllm", "score", f'engine="vllm": {reason}; use engine="transformers"')
        assert not any(p.name.startswith(".tmp-") for p in (home / "caches").iterdir())
    r = hpd_cli(home, "run", overrides=['run.name="eng"', 'generate.engine="tgi"'])
    assert (
        r.exit_code == 2
        and "generate.engine='tgi' is unknown; choose one of transformers, vllm" in r.stderr.strip().splitlines()[-1]
    )


def test_teacher_that_is_not_a_causal_lm(home, tmp_path):
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(**small)).save_pretrained(bert)  # a real model directory, but a masked LM
    r = hpd_cli(home, "run", overrides=['run.name="bert"', f'teacher.path="{bert}"'])
    _assert_clean_failure(r, home, "bert", "teacher", "holds a 'BertForMaskedLM' model, which is not a causal LM")
    bare = tmp_path / "bare"
    BertConfig(**small).save_pretrained(bare)  # no architectures recorded: judged by its type
    r = hpd_cli(home, "run", overrides=['run.name="bare"', f'teacher.path="{bare}"'])
    _assert_clean_failure(r, home, "bare", "teacher", "holds a 'bert' model, which is not a causal LM")
    r = hpd_cli(home, "run", overrides=['run.name="nodir"', f'teacher.path="{tmp_path}"'])
    _assert_clean_failure(r, home, "nodir", "teacher", "has no config.json")


def test_unknown_config_key_and_stage(home):
    r = hpd_cli(home, "run", overrides=["score.topk=3"])
    assert r.exit_code == 2 and "unknown config key score.topk" in r.stderr
    r = hpd_cli(home, "run", "nosuchstage")
    assert r.exit_code == 2 and "unknown stage 'nosuchstage'" in r.stderr


def test_empty_dataset(home, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = hpd_cli(home, "run", "--until", "generate", overrides=['run.name="nodata"', f'generate.prompts="{empty}"'])
    _assert_clean_failure(r, home, "nodata", "generate", "has no rows")


def test_text_that_is_not_utf8(home, tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "1+2:", "response": "3"}\n{"prompt": "caf\xe9 1+1:", "response": "2"}\n')
    r = hpd_cli(home, "run", "--until", "generate", overrides=['run.name="latin"', f'generate.prompts="{p}"'])
    _assert_clean_failure(r, home, "latin", "generate", "line 2 is not UTF-8 text")


def test_over_long_sequences_are_cut_when_configured(home, tmp_path):
    src = _jsonl(
        tmp_path / "long.jsonl",
        [{"prompt": "1+2:", "response": "3"}, {"prompt": "1+" * 20 + "1:", "response": "21" * 20}],
    )
    r = hpd_cli(
        home,
        "run",
        "--until",
        "generate",
        overrides=['run.name="cut"', f'generate.prompts="{src}"', 'generate.too_long="truncate"'],
    )
    assert r.exit_code == 0, r.output
    assert 'warning: generate.too_long="truncate": 1 of 2 sequences cut to the teacher\'s context of 64' in r.output
    out = json.loads((home / "runs/cut/generate/manifest.json").read_text())["outputs"]
    assert out["truncated"] == 1 and out["count"] == 2
    r = hpd_cli(
        home,
        "run",
        "--until",
        "generate",
        overrides=['run.name="cut2"', f'generate.prompts="{src}"', 'generate.too_long="sometimes"'],
    )
    _assert_clean_failure(
        r, home, "cut2", "generate", "generate.too_long='sometimes' is unknown; choose one of refuse, truncate"
    )


def test_student_with_another_tokenizer(home, tmp_path, teacher_dir):
    from transformers import AutoTokenizer

    from hpd.stages import student_models

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.add_tokens(["<extra>"])
    student = student_models.new_gpt2(tok, n_positions=64, n_layer=1, n_embd=16, n_head=2)
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    r = hpd_cli(
        home,
        "run",
        overrides=['run.name="othertok"', f'distill.student_path="{tmp_path / "student"}"', "rounds.count=1"],
    )
    _assert_clean_failure(r, home, "othertok", "distill", "across tokenizers a student trains from offline caches")


@pytest.mark.parametrize(
    "override, message",
    [
        ('distill.method="kd"', "distill.method='kd' is unknown; choose one of sft"),
        ("distill.learning_rate=-1e-3", "config distill.learning_rate must be > 0, got -0.001"),
        ("distill.alpha=1.5", "config distill.alpha must be between 0 and 1, got 1.5"),
        ("rounds.refresh_share=-0.1", "config rounds.refresh_share must be between 0 and 1"),
        ('generate.mode="online"', "generate.mode='online' is unknown; choose one of dataset, teacher"),
        ('distill.student_init="clone"', "distill.student_init='clone' is unknown; choose one of gpt2, teacher-layers"),
        (
            'distill.student_init="teacher-shape" distill.n_head=3',
            "distill.n_embd=16 is not a multiple of distill.n_head=3",
        ),
        ('distill.layer_choice="influence"', "distill.layer_choice='influence' chooses which of the teacher's"),
    ],
)
def test_invalid_config_values(home, override, message):
    r = hpd_cli(home, "run", overrides=['run.name="badcfg"', *override.split(" ")])
    _assert_clean_failure(r, home, "badcfg", "distill", message)
    assert not list((home / "runs" / "badcfg").glob("*/manifest.json"))  # refused before any stage ran


def test_cache_root_not_writable(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    shutil.rmtree(home / "caches")
    # chmod cannot stop root (CI may run as root); sysfs refuses new files to everyone
    (home / "caches").symlink_to("/sys/kernel", target_is_directory=True)
    r = hpd_cli(home, "run", overrides=['run.name="ro"'])
    _assert_clean_failure(r, home, "ro", "score", "caches is not writable")
    assert not (home / "runs" / "ro").exists() or not list((home / "runs" / "ro").glob("*/manifest.json"))


def test_disk_full_during_a_shard_write(tiny_home, tmp_path):
    from hpd.common import faults

    home = copy_home(tiny_home, tmp_path / "home")
    shutil.rmtree(home / "caches")
    for stage in ("score", "distill", "eval"):
        (home / "runs" / "tiny" / stage / "manifest.json").unlink()
    faults._full.clear()
    r = hpd_cli(home, "run", overrides=['run.name="tiny"'], env={"HPD_DISK_FULL_AT": "shard:3"})
    _assert_clean_failure(r, home, "tiny", "score", "the disk is full; free space")
    assert not [p for p in (home / "caches").iterdir() if not p.name.startswith(".")]  # nothing published
    r = hpd_cli(home, "run", overrides=['run.name="tiny"'])  # space freed: resumes after the written shards
    assert r.exit_code == 0, r.output
    assert "resuming: 2 of 5" in r.output


def test_model_directory_without_weights(home, tmp_path, teacher_dir):
    bare = tmp_path / "noweights"
    shutil.copytree(teacher_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    r = hpd_cli(home, "run", overrides=['run.name="noweights"', f'teacher.path="{bare}"'])
    _assert_clean_failure(r, home, "noweights", "teacher", "has a config but no weights")


def test_teacher_with_nan_logits(home, tmp_path, teacher_dir):
    import torch

    from hpd.stages import hf_models

    model, tok = hf_models.load_causal_lm(teacher_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[3, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    r = hpd_cli(home, "run", overrides=['run.name="nan"', f'teacher.path="{tmp_path / "nan"}"'])
    _assert_clean_failure(r, home, "nan", "score", "the teacher's logits are NaN or inf")


def test_a_diverging_student_stops_at_the_first_non_finite_loss_and_publishes_nothing(home):
    # A learning rate no run survives: the weights overflow within a few steps and the loss turns NaN or inf.
    r = hpd_cli(home, "run", overrides=['run.name="diverge"', "distill.learning_rate=1e30", 'distill.method="rkl"'])
    _assert_clean_failure(r, home, "diverge", "distill", "the rkl loss")
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "nothing was published" in last, last
    assert not (home / "runs" / "diverge" / "distill" / "student").exists()


def test_no_path_publishes_a_model_with_non_finite_weights(tmp_path, teacher_dir):
    import torch

    from hpd.common.errors import HpdError
    from hpd.stages import hf_models
    from hpd.stages.training import publish_model

    model, tok = hf_models.load_causal_lm(teacher_dir)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    (tmp_path / "job").mkdir()
    with pytest.raises(HpdError, match="non-finite weights"):
        publish_model(model, tok, tmp_path / "job", tmp_path / "final", {"report.json": {}})
    assert not (tmp_path / "final").exists()


def test_a_non_finite_gradient_with_a_finite_loss_stops_training(tmp_path, teacher_dir):
    import torch
    from datasets import Dataset
    from transformers import Trainer

    from hpd.common.errors import HpdError
    from hpd.stages import hf_models
    from hpd.stages.training import ResponseCollator, train, training_arguments

    model, tok = hf_models.load_causal_lm(teacher_dir)
    next(model.parameters()).register_hook(lambda g: g * float("nan"))  # the loss stays finite, one gradient not
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "prompt_len": [1] * 8})
    args = training_arguments(tmp_path / "ckpt", steps=2, batch_size=4, learning_rate=1e-3, warmup_steps=0, seed=0)
    with pytest.raises(HpdError, match=r"step 1: the test loss gave a non-finite gradient"):
        train(
            Trainer(model=model, args=args, train_dataset=data, data_collator=ResponseCollator(tok.pad_token_id)),
            what="the test loss",
        )
    assert all(torch.isfinite(p).all() for p in model.parameters())  # stopped before the optimizer step
