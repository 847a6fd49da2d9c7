"""distill: a student trained from the cache, joined by sequence id, resumable, with clear mismatch errors."""

import json
import math
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpd.common.errors import HpdError
from hpd.stages.distill import CacheCollator
from hpd.storage.logit_cache import LogitCache
from hpd.storage.sequences import SequenceStore

from conftest import copy_home, hpd_process, make_runner


def test_distill_publishes_an_hf_student_with_a_training_log(tiny_runner):
    out = tiny_runner.manifest("distill")["outputs"]
    student = Path(out["student_dir"])
    model = AutoModelForCausalLM.from_pretrained(student)
    tok = AutoTokenizer.from_pretrained(student)
    assert (student / "model.safetensors").is_file() and len(tok) == model.config.vocab_size
    teacher_params = out["teacher_report"]["parameters"]
    assert out["report"]["method"] == "hpd" and out["report"]["parameters"] < teacher_params
    assert 0 <= out["report"]["heldout_accuracy"] <= 1
    log = json.loads((student / "training_log.json").read_text())
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 4 and all(0 <= e["sample_term_active"] <= 1 and "sample_outside_topk" in e for e in steps)
    assert all(e["tokens"] > 0 and e["tokens_per_s"] > 0 for e in steps)


def test_collator_joins_by_sequence_id_not_position(tiny_runner):
    cache = LogitCache(Path(tiny_runner.manifest("score")["outputs"]["cache"]))
    store = SequenceStore(Path(tiny_runner.manifest("generate")["outputs"]["sequences"]))
    ids = random.Random(0).sample(range(len(store)), 6)
    rows = [{"seq_id": i, "input_ids": store.get(i)[0].tolist(), "prompt_len": store.get(i)[1]} for i in ids]
    batch = CacheCollator(0, cache)(rows)
    for b, i in enumerate(ids):
        one = cache.batch([i], length=batch["input_ids"].shape[1])
        assert torch.equal(batch["teacher"].target_logprob[b], one.target_logprob[0])
        assert torch.equal(batch["teacher"].topk_ids[b], one.topk_ids[0])
    rows[2]["seq_id"] = ids[3]  # a row paired with another sequence's cache entry
    with pytest.raises(HpdError, match="does not match the training sequences"):
        CacheCollator(0, cache)(rows)
    rows[2]["seq_id"] = 10**6  # a sequence the cache does not have
    with pytest.raises(HpdError, match="not in cache"):
        CacheCollator(0, cache)(rows)


def test_students_of_other_tokenizers_train_from_one_cache_without_rescoring(tiny_home, tmp_path, teacher_dir):
    """Across tokenizers (hpd/stages/token_bridge.py): a student whose tokenizer has one more token, and a fresh
    GPT-2 with a byte-level BPE of its own and a ChatML chat template (the math teacher's tokenizer has none), both
    train from the tiny run's cache, which neither rescores; each is published with its own tokenizer and
    judged without the per-token KL to a teacher of other tokens."""
    from hpd.stages import student_models

    from tiny_llama import make_tokenizer

    home = copy_home(tiny_home, tmp_path / "home")
    extra = tmp_path / "extra-token"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.add_tokens(["<extra>"])
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(extra)
    tok.save_pretrained(extra)
    bpe = tmp_path / "bpe"
    other = make_tokenizer(320, corpus=[f"{a} plus {b} is {a + b}" for a in range(30) for b in range(9)])
    student_models.new_gpt2(other, n_positions=128, n_layer=1, n_embd=16, n_head=2).save_pretrained(bpe)
    other.save_pretrained(bpe)
    cache = Path(make_runner(tiny_home).manifest("score")["outputs"]["cache"]).name
    caches_before = sorted(p.name for p in (home / "caches").iterdir())
    for name, path, share in (("extra", extra, 1.0), ("bpe", bpe, 0.9)):
        r = make_runner(home, f'distill.student_path="{path}"', 'distill.method="fkl"', run=name)
        r.run()
        assert Path(r.manifest("score")["outputs"]["cache"]).name == cache  # the teacher's cache, not rescored
        assert sorted(p.name for p in (home / "caches").iterdir()) == caches_before
        out = r.manifest("distill")["outputs"]
        assert out["report"]["teacher_target_share"] >= share
        assert (
            AutoTokenizer.from_pretrained(out["student_dir"]).get_vocab()
            == AutoTokenizer.from_pretrained(path).get_vocab()
        )
        log = json.loads((Path(out["student_dir"]) / "training_log.json").read_text())
        assert all(math.isfinite(e["loss"]) and e["tokens"] > 0 for e in log if "loss" in e)
        report = r.outputs("eval").report
        assert "kl_to_teacher_nats" not in report["student"] and report["student"]["response_nll_nats"] > 0
    with pytest.raises(HpdError, match="across tokenizers a student trains from offline caches"):
        make_runner(home, f'distill.student_path="{bpe}"', "rounds.count=1", run="bpe-rounds").run()
    assert (
        make_runner(home, f'distill.student_path="{bpe}"', "rounds.count=1", run="bpe-rounds").manifest("distill")
        is None
    )
    with pytest.raises(HpdError, match="distill.method='kd' is unknown"):
        make_runner(home, 'distill.method="kd"', run="other").run("distill")


def test_student_with_padded_vocabulary_is_accepted(tiny_home, tmp_path, teacher_dir):
    """Same tokenizer, more embedding rows (like 151,936 vs 152,064): fine."""
    home = copy_home(tiny_home, tmp_path / "home")
    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    model.resize_token_embeddings(model.config.vocab_size + 14)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(padded)
    r = make_runner(home, f'distill.student_path="{padded}"', 'distill.method="fkl"', run="padded")
    r.run()
    assert AutoModelForCausalLM.from_pretrained(r.manifest("distill")["outputs"]["student_dir"]).config.vocab_size == 32


def test_a_teacher_head_padded_past_the_student_trains_through_the_bridge(tiny_home, tmp_path, teacher_dir):
    """The same tokenizer, the teacher's head padded past it (Qwen2.5's 152,064 rows against a student's 151,936):
    the cache's ids past the student's head are tail mass (the tokenizer's real vocabulary decides, not the heads'
    sizes), and the student trains finite."""
    home = copy_home(tiny_home, tmp_path / "home")
    padded = tmp_path / "padded-teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    rows = model.config.vocab_size
    model.resize_token_embeddings(rows + 14, mean_resizing=False)
    with torch.no_grad():  # the padded rows get real mass, so the cache's top-k holds some of them
        model.get_output_embeddings().weight[rows:] = model.get_output_embeddings().weight[:14] * 3
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(padded)
    r = make_runner(
        home,
        f'teacher.path="{padded}"',
        f'distill.student_path="{teacher_dir}"',
        'distill.method="fkl"',
        "score.top_k=24",
        run="padded-teacher",
    )
    r.run()
    cache = LogitCache(Path(r.manifest("score")["outputs"]["cache"]))
    ids = np.concatenate([cache.rows(i).topk_ids.ravel() for i in range(8)])
    assert (ids >= rows).any()  # the cache does hold padded rows
    out = r.manifest("distill")["outputs"]
    assert out["report"]["teacher_target_share"] == 1.0
    log = json.loads((Path(out["student_dir"]) / "training_log.json").read_text())
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
    assert AutoModelForCausalLM.from_pretrained(out["student_dir"]).config.vocab_size == rows


def test_gradient_accumulation_comes_from_the_trainer(tiny_home, tmp_path):
    r = make_runner(
        copy_home(tiny_home, tmp_path / "home"),
        "distill.gradient_accumulation_steps=2",
        'distill.method="jsd"',
        run="accum",
    )
    r.run()
    log = json.loads((Path(r.manifest("distill")["outputs"]["student_dir"]) / "training_log.json").read_text())
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 4 and all(e["tokens"] > 0 for e in steps)
    assert max(e["epoch"] for e in steps) > 2 * 4 * 16 / 240 - 0.01  # two micro-batches per optimizer step


def _step_losses(runner) -> list[float]:
    log = json.loads((Path(runner.manifest("distill")["outputs"]["student_dir"]) / "training_log.json").read_text())
    return [e["loss"] for e in log if "loss" in e]


def test_online_teacher_trains_like_the_cache_without_a_score_stage(tiny_home, tmp_path):
    """k = vocabulary (18) in fp16: the cache holds the full distribution, so the online teacher's
    full-vocabulary logits must give the same losses step by step (same data, init and schedule)."""
    home = copy_home(tiny_home, tmp_path / "home")
    same = ['distill.method="fkl"', 'score.encoding="fp16"']
    cached = make_runner(home, *same, run="cached")
    cached.run()
    measured = {}
    online = make_runner(
        home,
        *same,
        'distill.teacher_source="online"',
        run="online",
        observers=[lambda stage, figures: measured.setdefault(stage, figures)],
    )
    assert "score" not in online.order and online.stages["distill"].inputs == ("data", "teacher", "generate")
    online.run()
    assert not (home / "runs" / "online" / "score").exists()
    a, b = _step_losses(cached), _step_losses(online)
    assert len(a) == 4 and a[0] > 0.01
    assert b == pytest.approx(a, rel=2e-3, abs=1e-4)
    rep = online.manifest("distill")["outputs"]["report"]
    assert rep["teacher_source"] == "online" and rep["mixture"]["offline"]["cache"] is None
    # what the stage measured of itself reaches observers (benches), not its report
    m = measured["distill"]
    assert m["train_seconds"] > 0 and m["peak_rss_mb"] >= m["rss_start_mb"] > 0 and m["input_tokens"] > 0
    assert "train_seconds" not in rep


def test_online_teacher_is_refused_with_rounds_and_unknown_sources(tiny_home):
    with pytest.raises(HpdError, match="refresh rounds train from teacher caches"):
        make_runner(tiny_home, 'distill.teacher_source="online"', "rounds.count=1")
    with pytest.raises(HpdError, match="teacher_source='gpu' is unknown"):
        make_runner(tiny_home, 'distill.teacher_source="gpu"')


CHECKPOINTED = ["distill.steps=6", "distill.checkpoint_steps=3"]


def _reference_and_copy(tiny_home, tmp_path):
    """An uninterrupted distill with checkpoints, and a fresh copy of the home to break."""
    reference = make_runner(copy_home(tiny_home, tmp_path / "ref"), *CHECKPOINTED)
    reference.run("distill")
    return reference, copy_home(tiny_home, tmp_path / "home")


def test_sigkilled_distill_resumes_from_its_checkpoint(tiny_home, tiny_runner, tmp_path):
    reference, home = _reference_and_copy(tiny_home, tmp_path)
    proc = hpd_process(home, "run", "distill", overrides=CHECKPOINTED, kill_at="checkpoint:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (home / "runs" / "tiny" / "distill" / ".tmp-student" / "checkpoints" / "checkpoint-3").is_dir()
    # A kill in the middle of the next save leaves a checkpoint without its trainer state: never resumed from.
    ckpts = home / "runs" / "tiny" / "distill" / ".tmp-student" / "checkpoints"
    shutil.copytree(ckpts / "checkpoint-3", ckpts / "checkpoint-6")
    (ckpts / "checkpoint-6" / "trainer_state.json").unlink()
    (ckpts / "checkpoint-6" / "model.safetensors").unlink()
    runner = make_runner(home, *CHECKPOINTED)
    assert runner.state("distill")[0] == "interrupted"
    logs = []
    runner.ctx.log = logs.append
    runner.run("distill")
    assert "[distill] resuming from checkpoint-3 of 6 steps" in logs  # the broken checkpoint-6 was passed over
    assert (
        runner.manifest("distill")["outputs"]["fingerprint"] == reference.manifest("distill")["outputs"]["fingerprint"]
    )


def test_no_checkpoint_is_written_at_the_last_step(tiny_home, tiny_runner, tmp_path):
    """Resuming from a checkpoint at the last step would train one step too many; none is written there."""
    reference, home = _reference_and_copy(tiny_home, tmp_path)
    proc = hpd_process(home, "run", "distill", overrides=CHECKPOINTED, kill_at="checkpoint:2")
    assert proc.returncode == 0, proc.stderr[-2000:]  # step 6 saved nothing, so nothing killed it
    runner = make_runner(home, *CHECKPOINTED)
    assert (
        runner.manifest("distill")["outputs"]["fingerprint"] == reference.manifest("distill")["outputs"]["fingerprint"]
    )


def test_checkpoints_of_another_config_are_dropped_not_resumed(tiny_home, tmp_path):
    """A crashed run leaves checkpoints; rerun with another student shape, they must not be loaded."""
    home = copy_home(tiny_home, tmp_path / "home")
    proc = hpd_process(
        home, "run", "distill", overrides=["distill.steps=6", "distill.checkpoint_steps=3"], kill_at="checkpoint:1"
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    runner = make_runner(home, "distill.steps=6", "distill.checkpoint_steps=3", "distill.n_embd=24")
    runner.run("distill")
    student = AutoModelForCausalLM.from_pretrained(runner.manifest("distill")["outputs"]["student_dir"])
    assert student.config.n_embd == 24


def test_gradient_checkpointing_trains_the_same_student(tiny_home, tmp_path):
    """distill.gradient_checkpointing recomputes the layers' activations in the backward pass: the same numbers
    (nothing random in a layer here), so the same student, for less memory."""
    plain = make_runner(copy_home(tiny_home, tmp_path / "plain"), "distill.steps=3", 'distill.baseline=""')
    saved = make_runner(
        copy_home(tiny_home, tmp_path / "saved"),
        "distill.steps=3",
        'distill.baseline=""',
        "distill.gradient_checkpointing=true",
    )
    for r in (plain, saved):
        r.run("distill")
    a, b = (
        AutoModelForCausalLM.from_pretrained(r.manifest("distill")["outputs"]["student_dir"]) for r in (plain, saved)
    )
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert plain.config_fingerprint("distill") != saved.config_fingerprint("distill")  # set, it is part of the key


def test_a_layer_kept_student_keeps_the_layers_of_most_block_influence_on_the_runs_sequences(tiny_home, tmp_path):
    """layer_choice = "influence": the teacher's layers are weighed on the run's first training sequences and the
    student is made of the most influential, which its config.json names (checked against block_influence on
    the same sequences, and against the layers even spacing would keep)."""
    from hpd.stages import distill, hf_models, student_models
    from hpd.storage.sequences import SequenceStore

    r = make_runner(
        copy_home(tiny_home, tmp_path / "home"),
        "teacher.n_layer=4",  # the tiny preset's teacher has one layer: nothing to choose from
        'distill.student_init="teacher-layers"',
        'distill.layer_choice="influence"',
        "distill.n_layer=2",
        "distill.steps=1",
        'distill.baseline=""',
        run="influence",
    )
    r.adopt("tiny", ["data"])
    r.run(until="distill")
    config = json.loads((Path(r.outputs("distill").student_dir) / "config.json").read_text())
    teacher, _ = hf_models.load_causal_lm(r.outputs("teacher").model_dir)
    store = SequenceStore(Path(r.outputs("generate").sequences))
    influence = student_models.block_influence(teacher, store.range(0, distill.INFLUENCE_SEQUENCES)[2])
    most = sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:2])
    assert config["n_layer"] == 2 and config["hpd_kept_layers"] == most, influence
    assert most != [0, 3]  # what even spacing keeps: here the choice differs
