"""The built-in math task: column addition of several numbers with a scratchpad whose steps vary.

    prompt    347+582+916:
    response  2+7+0+6=15,1+8+4+4=17,1+5+3+9=18|1845

Columns are worked from the units up. Each column lists its terms (one digit per operand plus the carry
coming in) in a uniformly random order, then their two-digit sum; the total follows `|`. The order is a
genuine choice, so a teacher that learned the task spreads its next-token mass over the terms not yet
written (about a quarter of response positions are such choices), while the sums are deterministic and
require carrying information across steps. That mix is what gives distillation something to transfer.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from hpd.common.settings import DataSettings

CHARS = "0123456789+:=,|"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def _column_width(operands: int) -> int:
    return len(str(operands * 9 + operands - 1))


def make_example(rng: random.Random, operands: int, digits: int, nums: list[int] | None = None) -> dict:
    nums = nums or [rng.randrange(10**digits) for _ in range(operands)]
    prompt = "+".join(f"{n:0{digits}d}" for n in nums) + ":"
    steps, carry = [], 0
    for col in range(digits):
        terms = [(n // 10**col) % 10 for n in nums] + [carry]
        rng.shuffle(terms)
        total = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={total:0{_column_width(operands)}d}")
        carry = total // 10
    answer = f"{sum(nums):0{len(str(operands * (10**digits - 1)))}d}"
    return {"prompt": prompt, "response": ",".join(steps) + "|" + answer, "answer": answer}


def write_split(
    path: Path, n: int, seed: int, operands: int | list[int], digits: int, exclude: set[str] = frozenset()
) -> set:
    """Write n distinct problems as JSONL (prompt, response, answer); returns their prompts. `operands` a list:
    each problem draws its number of operands from it (a mixed task, e.g. for a generalist teacher)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    with open(path, "w") as f:
        while len(seen) < n:
            ex = make_example(rng, rng.choice(operands) if isinstance(operands, list) else operands, digits)
            if ex["prompt"] in seen or ex["prompt"] in exclude:
                continue
            seen.add(ex["prompt"])
            f.write(json.dumps(ex) + "\n")
    return seen


def write_data(out: Path, cfg: DataSettings, seed: int) -> dict:
    """train.jsonl / heldout.jsonl with disjoint problems; returns the counts."""
    if min(cfg.operands, cfg.digits) < 1 or cfg.operands > 9:
        raise ValueError("data.operands must be 1-9 and data.digits at least 1")
    operands = cfg.operands
    if cfg.operand_mix:
        try:
            operands = [int(x) for x in cfg.operand_mix.split(",")]
        except ValueError:
            operands = []
        if not operands or not all(2 <= x <= 9 for x in operands):
            raise ValueError(f"data.operand_mix={cfg.operand_mix!r} must be operand counts 2-9, comma-separated")
    held = write_split(out / "heldout.jsonl", cfg.heldout_examples, seed * 1000 + 2, operands, cfg.digits)
    write_split(out / "train.jsonl", cfg.train_examples, seed * 1000 + 1, operands, cfg.digits, exclude=held)
    return {"train": cfg.train_examples, "heldout": cfg.heldout_examples}


def extract_answer(response: str) -> str | None:
    """The digits after the last `|`, or None when the response never reached an answer."""
    m = re.search(r"\|\s*(\d+)\s*$", response.split("<eos>")[0].strip())
    return m.group(1) if m else None


def is_correct(response: str, answer: str | dict) -> bool:
    answer = answer["answer"] if isinstance(answer, dict) else answer
    got = extract_answer(response)
    return got is not None and int(got) == int(answer)


def build_tokenizer(train_path=None, cfg=None):
    """A character-level tokenizer built with the `tokenizers` library, wrapped as an HF fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
