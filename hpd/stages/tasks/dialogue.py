"""The built-in dialogue task: real English conversations from the `chitchat-dataset` package (MIT).

    prompt    A: what's your favourite food?\nB: pizza, hands down\nA:
    response   same! what toppings?

Prompt = the last few messages of a conversation (speakers alternate A/B), response = the next message.
Held-out examples come from conversations never seen in training. The tokenizer is a byte-level BPE
trained on the training split with the `tokenizers` library, so its vocabulary (8k by default) and its
teacher's distributions look like a real LLM's, only smaller: this is the task cache compression is
measured on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from hpd.common.settings import DataSettings

SPECIALS = ["<pad>", "<eos>"]


def load_conversations() -> list[list[str]]:
    import chitchat_dataset

    convs = [[m.strip() for m in c] for c in chitchat_dataset.ConversationDataset()]
    return [[m for m in c if m] for c in convs if sum(1 for m in c if m) >= 2]


def _examples(conv: list[str], history: int, max_prompt_chars: int, max_response_chars: int):
    for i in range(1, len(conv)):
        response = conv[i][:max_response_chars]
        lines = [f"{'AB'[j % 2]}: {conv[j]}" for j in range(max(0, i - history), i)]
        prompt = "\n".join(lines) + f"\n{'AB'[i % 2]}:"
        yield {"prompt": prompt[-max_prompt_chars:].lstrip(), "response": " " + response}


def write_data(out: Path, cfg: DataSettings, seed: int) -> dict:
    """train.jsonl / heldout.jsonl from disjoint conversations; returns the counts."""
    convs = load_conversations()
    random.Random(seed).shuffle(convs)
    ex = lambda conv: list(
        _examples(
            conv,
            cfg.history_messages,
            cfg.max_prompt_chars,  # noqa: E731
            cfg.max_response_chars,
        )
    )
    heldout, used = [], 0
    while len(heldout) < cfg.heldout_examples and used < len(convs):
        heldout += ex(convs[used])
        used += 1
    train = []
    for conv in convs[used:]:  # conversations after the held-out ones: never shared with them
        if len(train) >= cfg.train_examples:
            break
        train += ex(conv)
    splits = {"heldout": heldout[: cfg.heldout_examples], "train": train[: cfg.train_examples]}
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {s: len(r) for s, r in splits.items()}


def build_tokenizer(train_path: str | Path, cfg: DataSettings):
    """Byte-level BPE trained on the training split's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(train_path) as f:
            for line in f:
                r = json.loads(line)
                yield r["prompt"] + r["response"]

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left")
