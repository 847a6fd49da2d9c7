"""generate: user data files read with `datasets`, teacher sampling with correct padding, chat templates."""

import json
from pathlib import Path

import datasets
import torch

from hpd.stages import hf_models, sampling
from hpd.stages.batching import encode_pair
from hpd.storage.sequences import SequenceStore

from conftest import copy_home, make_runner

ROWS = [
    {"prompt": "1+2:", "response": "3"},
    {"prompt": "12+30+4:", "response": "46"},
    {"prompt": "999+1:", "response": "1000"},
    {"prompt": "5:", "response": "5"},
]


def _sequences(runner):
    store = SequenceStore(Path(runner.manifest("generate")["outputs"]["sequences"]))
    return [store.get(i) for i in range(len(store))]


def test_user_jsonl_and_parquet_give_the_same_sequences(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    results = []
    for run, src in [("jsonl", jsonl), ("parquet", parquet)]:
        r = make_runner(home, f'generate.prompts="{src}"', run=run)
        r.run()
        results.append(_sequences(r))
    assert [(list(a), p) for a, p in results[0]] == [(list(a), p) for a, p in results[1]]
    tok = hf_models.load_causal_lm(make_runner(home).manifest("teacher")["outputs"]["model_dir"])[1]
    for (ids, plen), row in zip(results[0], ROWS):
        assert tok.decode(ids[:plen]) == row["prompt"]
        assert tok.decode(ids[plen:]) == row["response"] + "<eos>"


def test_batched_left_padded_sampling_equals_one_at_a_time(teacher_dir):
    model, tok = hf_models.load_causal_lm(teacher_dir)
    prompts = [tok(r["prompt"])["input_ids"] for r in ROWS]
    batched = sampling.sample(model, tok, prompts, max_new_tokens=12, greedy=True, batch_size=8)
    single = [sampling.sample(model, tok, [p], max_new_tokens=12, greedy=True)[0] for p in prompts]
    assert batched == single
    assert all(len(x) <= 12 for x in batched)


def test_teacher_samples_per_prompt(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in ROWS))
    overrides = [
        f'generate.prompts="{jsonl}"',
        'generate.mode="teacher"',
        "generate.samples_per_prompt=3",
        "generate.max_new_tokens=16",
        "generate.shard_size=2",
    ]
    r = make_runner(home, *overrides, run="sampled")
    r.run("data"), r.run("teacher"), r.run("generate")
    seqs = _sequences(r)
    assert len(seqs) == 3 * len(ROWS)
    tok = hf_models.load_causal_lm(r.manifest("teacher")["outputs"]["model_dir"])[1]
    for i, (ids, plen) in enumerate(seqs):
        assert tok.decode(ids[:plen]) == ROWS[i // 3]["prompt"]
        resp = list(ids[plen:])
        assert 1 <= len(resp) <= 16 and (tok.eos_token_id not in resp[:-1])
    # Seeded: the same config samples the same sequences again, in another home.
    again = make_runner(tmp_path / "home2", *overrides, run="sampled")
    again.run()
    assert again.manifest("generate")["outputs"]["fingerprint"] == r.manifest("generate")["outputs"]["fingerprint"]


def test_chat_template_separates_prompt_and_response(teacher_dir):
    _, tok = hf_models.load_causal_lm(teacher_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}:{% endif %}{% endfor %}"
    p_ids, r_ids = encode_pair(tok, "1+2", "3|0003")
    assert tok.decode(p_ids) == "1+2:" and tok.decode(r_ids) == "3|0003"
    assert torch.equal(torch.tensor(p_ids + r_ids), torch.tensor(tok("1+2:3|0003")["input_ids"]))


def test_length_batches_cover_every_sequence_within_the_budget():
    from hpd.stages.batching import length_batches

    lengths = [5, 40, 7, 40, 12, 3, 90, 8]
    assert length_batches(lengths, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]  # by count, in order
    batches = length_batches(lengths, 3, batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget: alone
    for b in batches[1:]:
        assert len(b) * max(lengths[i] for i in b) <= 80
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    # by count, sorted: longest first, alike lengths together
    assert length_batches(lengths, 3, sort=True) == [[6, 1, 3], [4, 7, 2], [0, 5]]


def test_sorted_static_cache_sampling_gives_the_same_greedy_replies_in_the_prompts_order(tmp_path):
    """Sorting prompts by length and a static KV cache change how replies are batched and cached, not which replies
    a prompt gets: greedy replies are the plain loop's, each at its own prompt's index."""
    from tiny_llama import make_llama

    model, tok = hf_models.load_causal_lm(make_llama(tmp_path / "llama"))
    prompts = [tok(t)["input_ids"] for t in ("the cat", "a dog sat on the mat and", "hi", "one two three four")]
    plain = sampling.sample(model, tok, prompts, max_new_tokens=6, greedy=True, batch_size=1)
    for kw in ({"sort": True}, {"sort": True, "static_cache": True}):
        got = sampling.sample(model, tok, prompts, max_new_tokens=6, greedy=True, batch_size=2, **kw)
        assert got == plain, kw


def test_a_stop_string_ends_each_reply_where_it_is_written(teacher_dir):
    """`stop` ends a reply as the end-of-sequence token does (HumanEval stops a chat model at its code block's close):
    each greedy reply is the plain one up to and including the first place the string is written, the rest as
    they were. The stop string is what the longest reply writes first (the tiny teacher, trained for seconds,
    writes "1+++..." or "+++..."), so it is written before that reply's end at least once."""
    model, tok = hf_models.load_causal_lm(teacher_dir)
    prompts = [tok(r["prompt"])["input_ids"] for r in ROWS]
    plain = sampling.sample(model, tok, prompts, max_new_tokens=24, greedy=True, batch_size=4)
    longest = max(plain, key=len)
    assert len(longest) > 2
    stop = tok.decode(longest[:2])
    got = sampling.sample(model, tok, prompts, max_new_tokens=24, greedy=True, batch_size=4, stop=(stop,))
    cut = 0
    for short, full in zip(got, plain):
        text = tok.decode(full)
        if stop in text:  # cut at the first token that completes the string
            end = next(i for i in range(1, len(full) + 1) if stop in tok.decode(full[:i]))
            assert short == full[:end] and tok.decode(short).endswith(stop)
            cut += end < len(full)
        else:
            assert short == full
    assert cut >= 1, [tok.decode(x) for x in plain]  # the string was written, and the reply ended there
