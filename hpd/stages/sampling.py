"""A model continues prompts: in memory (`sample`), or shard by shard into a resumable sequence store
(`sample_to_store`, what generate in teacher mode and the refresh rounds do)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .batching import length_batches, pad_left


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    batch_tokens: int = 0,
    sort: bool = False,
    static_cache: bool = False,
    compiled: bool = False,
    stop: tuple[str, ...] = (),
    desc: str = "sampling",
) -> list[list[int]]:
    """Continue each prompt; returns the response ids (in the prompts' order), cut after the first
    end-of-sequence token. batch_tokens > 0 batches by prompt plus new tokens instead of by count; `sort` batches
    by count longest first (alike lengths: little padding); `static_cache` preallocates the KV cache; `compiled`
    also compiles the decoding step with torch.compile (transformers does that by itself on GPUs only). `stop`:
    strings that end a response as the end-of-sequence token does (the response keeps them), so a batch ends when
    every row has written one instead of running to max_new_tokens."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    out: list[list[int] | None] = [None] * len(prompts)
    batches = length_batches([len(p) + max_new_tokens for p in prompts], batch_size, batch_tokens, sort)
    for idx in tqdm(batches, desc=desc, leave=False, disable=len(batches) <= 1):
        ids, mask = (t.to(model.device) for t in pad_left([prompts[i] for i in idx], pad))
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_k=None,
            top_p=None,
            pad_token_id=pad,
            eos_token_id=eos,
            **({"stopping_criteria": StoppingCriteriaList([_Written(tokenizer, stop, ids.shape[1])])} if stop else {}),
            **({"cache_implementation": "static"} if static_cache or compiled else {}),
            **({"compile_config": _cpu_compile()} if compiled else {}),
        )
        for i, row in zip(idx, gen[:, ids.shape[1] :].tolist()):
            row = row[: row.index(eos) + 1] if eos in row else row
            out[i] = _through_stop(tokenizer, row, stop) if stop else row
    return out


class _Written(StoppingCriteria):
    """Done: the rows whose response (from `start` on) holds one of `stops`. transformers' own stop_strings match
    on the vocabulary's pieces and fail on some tokenizers (a character-level one); decoding the responses works
    on any, for the cost of a decode per step."""

    def __init__(self, tokenizer, stops: tuple[str, ...], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _through_stop(tokenizer, row: list[int], stops: tuple[str, ...]) -> list[int]:
    """The shortest prefix of `row` whose text holds a stop string (the row itself when none does): a finished row
    is padded after its stop. Holding one only grows with the prefix, so a bisection finds it."""

    def holds(n: int) -> bool:
        return any(s in tokenizer.decode(row[:n], skip_special_tokens=True) for s in stops)

    if not holds(len(row)):
        return row
    lo, hi = 1, len(row)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return row[:lo]


def _cpu_compile():
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers' own switch for compiling off a GPU
    return config


def sample_to_store(
    ctx,
    model,
    tokenizer,
    prompts: list[list[int]],
    final: Path,
    meta: dict,
    *,
    samples_per_prompt: int,
    prompts_per_shard: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    desc: str,
    engine: str = "transformers",
    batch_tokens: int = 0,
    sort: bool = False,
    static_cache: bool = False,
) -> dict:
    """N sampled responses per prompt, published as a sequence store in shards; returns its manifest. An
    interrupted run resumes after its last written shard and samples exactly what it would have (each shard
    has its own seed), which is also why ranks can share the shards out (hpd/common/ranks.py)."""
    from hpd.storage import sequences as seqstore
    from hpd.storage.shard_writer import ShardedWrite

    n_per = samples_per_prompt
    num_shards = -(-len(prompts) // prompts_per_shard)
    out = ShardedWrite(
        ctx,
        lambda rank: seqstore.SequenceWriter(final, {**meta, "shard_size": prompts_per_shard * n_per}, rank),
        num_shards,
    )
    if engine == "vllm":
        from . import vllm_engine

        llm = vllm_engine.load(model.name_or_path, scoring=False, seed=seed)
    for shard in tqdm(list(out.todo()), desc=desc, disable=num_shards < 2 or ctx.rank > 0):
        lo, hi = shard * prompts_per_shard, min((shard + 1) * prompts_per_shard, len(prompts))
        torch.manual_seed(seed * 100003 + shard)
        prompt_ids = [prompts[i] for i in range(lo, hi) for _ in range(n_per)]
        if engine == "vllm":
            responses = vllm_engine.sample(
                llm,
                prompt_ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed * 100003 + shard,
                eos_token_id=tokenizer.eos_token_id,
            )
        else:
            responses = sample(
                model,
                tokenizer,
                prompt_ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                batch_size=batch_size,
                batch_tokens=batch_tokens,
                sort=sort,
                static_cache=static_cache,
                desc=f"sampling shard {shard}",
            )
        first = lo * n_per
        out.write(
            shard,
            seqstore.rows_table(
                range(first, first + len(prompt_ids)),
                [i for i in range(lo, hi) for _ in range(n_per)],
                [len(p) for p in prompt_ids],
                [p + r for p, r in zip(prompt_ids, responses)],
            ),
        )
    return out.finish()
