"""The optional vLLM engine (hpd/stages/vllm_engine.py) against the transformers engine on the tiny teacher.
These run only where vLLM and a CUDA GPU are present (`pip install '.[vllm]'` on a GPU machine)."""

import numpy as np
import pytest

from hpd.stages import hf_models, vllm_engine
from hpd.stages.cache_rows import score_batch
from hpd.storage.sequences import SequenceStore

REASON = vllm_engine.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"vLLM engine not testable here: {REASON}")


def _sequences(tiny_runner):
    store = SequenceStore(tiny_runner.manifest("generate")["outputs"]["sequences"])
    return store.range(0, 16)


def test_vllm_scoring_matches_transformers(tiny_runner, teacher_dir):
    _, plens, seqs = _sequences(tiny_runner)
    model, tok = hf_models.load_causal_lm(teacher_dir)
    want = score_batch(model, seqs, list(plens), top_k=8, temperature=1.0, pad_id=tok.pad_token_id)
    got = vllm_engine.score(
        vllm_engine.load(teacher_dir, scoring=True, top_k=8), seqs, list(plens), top_k=8, temperature=1.0
    )
    for w, g in zip(want, got):
        assert g["start"] == w["start"]
        np.testing.assert_allclose(g["target_logprob"], w["target_logprob"], atol=2e-3)
        np.testing.assert_allclose(g["topk_logprobs"], w["topk_logprobs"], atol=2e-3)
        assert (g["topk_ids"][:, 0] == w["topk_ids"][:, 0]).mean() > 0.99


def test_vllm_sampling_continues_every_prompt(tiny_runner, teacher_dir):
    _, plens, seqs = _sequences(tiny_runner)
    prompts = [s[:p].tolist() for s, p in zip(seqs, plens)]
    _, tok = hf_models.load_causal_lm(teacher_dir)
    llm = vllm_engine.load(teacher_dir, scoring=False, seed=0)
    a = vllm_engine.sample(llm, prompts, max_new_tokens=20, temperature=1.0, seed=3, eos_token_id=tok.eos_token_id)
    b = vllm_engine.sample(llm, prompts, max_new_tokens=20, temperature=1.0, seed=3, eos_token_id=tok.eos_token_id)
    assert a == b and all(0 < len(r) <= 20 for r in a)
