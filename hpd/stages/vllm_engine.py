"""The optional vLLM engine for the teacher-side stages: `engine = "vllm"` in [generate], [score] or [refresh]
(`pip install '.[vllm]'`, a CUDA GPU). The transformers engine stays the default and the tested path; this
one gives the same outputs through vLLM's own batching and kernels:

- sampling (generate in teacher mode, refresh): each shard's prompts go to `LLM.generate` as token ids, with
  the shard's seed, so a resumed or distributed run samples what it would have;
- scoring: vLLM's prompt log-probs (`SamplingParams(prompt_logprobs=k)`) give, per position, the top-k and the
  sequence token's own log-prob. Prefix caching is off while scoring, since a cached prefix returns no prompt
  log-probs. vLLM reports log-probs of the raw logits, so only score.temperature = 1 is accepted, and the tail
  mass is 1 - sum(top-k) (vLLM does not return it), which loses precision when the top-k hold nearly all of it.
"""

from __future__ import annotations

import math

import numpy as np

from hpd.common.errors import HpdError


def unavailable() -> str | None:
    """Why the vLLM engine cannot run here, or None when it can."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install '.[vllm]')"
    except Exception as e:  # noqa: BLE001 - an install that breaks at import (e.g. a mismatched torchvision)
        return f"vLLM is installed but cannot be imported ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    import torch

    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and there is none"
    return None


def load(model_dir: str, *, scoring: bool, top_k: int = 0, seed: int = 0):
    reason = unavailable()
    if reason:
        raise HpdError(f'engine="vllm": {reason}; use engine="transformers"')
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        tokenizer=str(model_dir),
        seed=seed,
        enable_prefix_caching=not scoring,
        max_logprobs=max(top_k, 20),
        skip_tokenizer_init=False,
    )


def sample(
    llm, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int, eos_token_id: int | None
) -> list[list[int]]:
    """One sampled continuation per prompt (token ids), cut after the first end-of-sequence token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, seed=seed)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    responses = []
    for out in outs:
        row = list(out.outputs[0].token_ids)
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        responses.append(row)
    return responses


def score(llm, seqs: list[np.ndarray], prompt_lens: list[int], *, top_k: int, temperature: float) -> list[dict]:
    """What cache_rows.score_batch returns, from vLLM's prompt log-probs."""
    assert temperature == 1.0, "vLLM reports raw log-probs: config.validate allows temperature 1 only"
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=1.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs], params, use_tqdm=False)
    scored = []
    for s, p, out in zip(seqs, prompt_lens, outs):
        # prompt_logprobs[t] describes token t given tokens < t; the cache's entry at t - 1 describes token t
        positions = out.prompt_logprobs[p : len(s)]
        ids = np.zeros((len(positions), top_k), np.int64)
        top = np.zeros((len(positions), top_k), np.float32)
        target, tail = np.zeros(len(positions), np.float32), np.zeros(len(positions), np.float32)
        for i, (tok, entry) in enumerate(zip(s[p:], positions)):
            ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= top_k))[:top_k]
            ids[i] = [t for _, t, _ in ranked]
            top[i] = [lp for _, _, lp in ranked]
            target[i] = entry[int(tok)].logprob
            rest = 1.0 - float(np.exp(top[i].astype(np.float64)).sum())
            tail[i] = math.log(rest) if rest > 0 else -math.inf
        scored.append(
            {"start": p - 1, "topk_ids": ids, "topk_logprobs": top, "target_logprob": target, "tail_logmass": tail}
        )
    return scored
