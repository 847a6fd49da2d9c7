"""The built-in dialogue task end to end at tiny scale: real conversations, a trained byte-level BPE
tokenizer, a top-k cache of a real vocabulary (k < V, so the tail bucket matters), ROUGE-L evaluation."""

import json

import pytest

from hpd.storage.logit_cache import LogitCache

from conftest import hpd_cli

pytestmark = pytest.mark.unit  # seconds, no pipeline run (make test-unit)

SMALL = [
    "data.train_examples=400",
    "data.heldout_examples=20",
    "data.vocab_size=512",
    "teacher.n_layer=1",
    "teacher.n_embd=32",
    "teacher.n_head=2",
    "teacher.steps=6",
    "teacher.batch_size=16",
    "teacher.warmup_steps=1",
    "teacher.eval_examples=10",
    "generate.num_prompts=64",
    "generate.shard_size=32",
    "score.top_k=16",
    "score.shard_size=32",
    "distill.steps=3",
    "distill.batch_size=8",
    "distill.warmup_steps=1",
    "distill.eval_examples=8",
    "distill.n_layer=1",
    "distill.n_embd=16",
    "eval.examples=8",
    "eval.max_new_tokens=8",
]


def test_dialogue_run_scores_a_truncated_cache_and_reports_rouge(tmp_path):
    res = hpd_cli(tmp_path, "run", "--config", "dialogue", overrides=SMALL, tiny=False)
    assert res.exit_code == 0, res.output + str(res.exception)
    status = json.loads(
        hpd_cli(tmp_path, "status", "--json", "--config", "dialogue", overrides=SMALL, tiny=False).output
    )
    outputs = {s["stage"]: s["outputs"] for s in status["stages"]}
    assert all(s["state"] == "done" for s in status["stages"])
    cache = LogitCache(outputs["score"]["cache"].replace("@home", str(tmp_path)))
    assert cache.k == 16 and cache.key["top_k"] == 16 and outputs["teacher"]["vocab_size"] >= 512
    report = outputs["eval"]["report"]
    assert 0 <= report["student"]["rouge_l"] <= 1 and report["student"]["kl_to_teacher_nats"] > 0
    assert "heldout_accuracy" not in outputs["distill"]["report"]
    # tasks without an answer to check show the held-out NLL in the plain status
    plain = hpd_cli(tmp_path, "status", "--config", "dialogue", overrides=SMALL, tiny=False)
    assert plain.exit_code == 0 and "held-out NLL" in plain.output
