import dataclasses
import json
import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpd.common.settings import DataSettings
from hpd.stages.tasks import arithmetic

pytestmark = pytest.mark.unit  # seconds, no pipeline run (make test-unit)


def _check_trace(prompt: str, response: str) -> None:
    """Recompute every column from the operands: terms are a permutation of digits + carry, sums are right."""
    nums = [int(x) for x in prompt.rstrip(":").split("+")]
    steps, total = response.split("|")
    carry = 0
    for col, step in enumerate(steps.split(",")):
        lhs, rhs = step.split("=")
        terms = sorted(int(t) for t in lhs.split("+"))
        assert terms == sorted([(n // 10**col) % 10 for n in nums] + [carry])
        assert int(rhs) == sum(terms)
        carry = sum(terms) // 10
    assert int(total) == sum(nums)


def test_traces_are_correct():
    rng = random.Random(1)
    for _ in range(300):
        ex = arithmetic.make_example(rng, 3, 3)
        _check_trace(ex["prompt"], ex["response"])
        assert arithmetic.is_correct(ex["response"], ex["answer"])


def test_one_problem_has_many_valid_traces():
    """The teacher has real choices: one problem is written in many step orders, all of them correct."""
    traces = {arithmetic.make_example(random.Random(s), 3, 3, nums=[347, 582, 916])["response"] for s in range(60)}
    for t in traces:
        _check_trace("347+582+916:", t)
    assert len(traces) > 20
    assert {t.split("|")[1] for t in traces} == {"1845"}


def test_answer_extraction_variants():
    assert arithmetic.extract_answer("1+2=03|0123") == "0123"
    assert arithmetic.extract_answer("1+2=03|0123<eos>junk") == "0123"
    assert arithmetic.extract_answer("1+2=03| 123 ") == "123"
    assert arithmetic.extract_answer("1+2=03,4+5") is None
    assert arithmetic.is_correct("x|0123", "123") and not arithmetic.is_correct("x|0124", "0123")


def test_split_files_are_disjoint(tmp_path):
    held = arithmetic.write_split(tmp_path / "h.jsonl", 50, 2, 3, 3)
    train = arithmetic.write_split(tmp_path / "t.jsonl", 500, 1, 3, 3, exclude=held)
    assert not held & train and len(train) == 500
    rows = [json.loads(x) for x in open(tmp_path / "t.jsonl")]
    assert {r["prompt"] for r in rows} == train


def test_builtin_teacher_is_an_ordinary_hf_directory(teacher_dir, tiny_runner):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    assert (teacher_dir / "model.safetensors").is_file()
    ids = tok("123+456+789:")["input_ids"]
    assert tok.decode(ids) == "123+456+789:" and len(ids) == 12
    assert model.config.vocab_size == len(tok)
    report = tiny_runner.manifest("teacher")["outputs"]["report"]
    assert 0 <= report["heldout_accuracy"] <= 1
    assert 0 < report["response_entropy_nats"] < report["uniform_entropy_nats"]


def test_an_operand_mix_draws_each_problem_from_it(tmp_path):
    cfg = DataSettings(operands=3, digits=3, train_examples=200, heldout_examples=50, operand_mix="2,4")
    arithmetic.write_data(tmp_path, cfg, seed=0)
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    counts = {r["prompt"].count("+") + 1 for r in rows}
    assert counts == {2, 4} and all(_check_trace(r["prompt"], r["response"]) is None for r in rows)
    with pytest.raises(ValueError, match="operand_mix"):
        arithmetic.write_data(tmp_path, dataclasses.replace(cfg, operand_mix="2,x"), seed=0)
