"""Text to token ids (through a chat template when the tokenizer has one), and token ids to padded batches."""

from __future__ import annotations

import numpy as np
import torch

from hpd.common.errors import HpdError


def encode_pair(tokenizer, prompt: str, response: str | None) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and (if given) the response, through the chat template when there is one."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        p_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        if response is None:
            return p_ids, []
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(p_text):
            raise HpdError(
                "the tokenizer's chat template does not render the prompt as a prefix of the "
                "conversation; responses cannot be separated from prompts"
            )
        return p_ids, tokenizer(full[len(p_text) :], add_special_tokens=False)["input_ids"]
    p_ids = tokenizer(prompt)["input_ids"]
    if response is None:
        return p_ids, []
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    return p_ids, r_ids


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(np.array(s, dtype=np.int64))
        mask[i, : len(s)] = 1
    return ids, mask


def length_batches(lengths: list[int], batch_size: int, batch_tokens: int = 0, sort: bool = False) -> list[list[int]]:
    """Indices of each batch. By count: runs of batch_size, consecutive, or with `sort` longest first (batches of
    alike lengths: little padding). With a token budget: longest first, as many sequences as keep the padded batch
    (count x longest) within batch_tokens, so a batch of short prompts is wide and one of long prompts narrow, and
    little of either is padding. A sequence longer than the budget gets a batch of its own."""
    n = len(lengths)
    if not batch_tokens:
        order = sorted(range(n), key=lambda i: -lengths[i]) if sort else list(range(n))
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    batches, current = [], []
    for i in sorted(range(n), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])
