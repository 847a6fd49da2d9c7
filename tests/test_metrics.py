"""Evaluators on hand-made cases, against straightforward references, and the eval stage end to end."""

import json
import random
from pathlib import Path

import pytest
import torch

from hpd.common.errors import HpdError
from hpd.stages import hf_models, metrics
from hpd.stages.tasks import TASKS, arithmetic

from conftest import copy_home, make_runner


@pytest.mark.parametrize(
    "response, answer, correct",
    [
        ("2+7+0+6=15,1+8+4+4=17,1+5+3+9=18|1845", "1845", True),
        ("2+7+0+6=15|1845  \n", "1845", True),  # trailing whitespace
        ("...|1845<eos>3+4=7|99", "1845", True),  # anything after the end-of-sequence token is ignored
        ("...|01845", "1845", True),  # a leading zero is the same number
        ("...| 1845", "1845", True),  # a space after the bar
        ("...|1844", "1845", False),
        ("...=18|", "1845", False),  # never wrote the total
        ("2+7+0+6=15,1+8+4+4=17", "1845", False),  # stopped before the answer
        ("1845", "1845", False),  # no bar: not an answer in this format
        ("...|1845x", "1845", False),  # trailing junk makes it unreadable
        ("...|12|1845", "1845", True),  # the last bar holds the answer
    ],
)
def test_math_answer_extraction(response, answer, correct):
    assert arithmetic.is_correct(response, {"answer": answer}) is correct


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _rouge_l_reference(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def test_rouge_l_known_values():
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)  # LCS 2: precision 1/2, recall 1
    assert metrics.rouge_l("Hello there", "hello there") == pytest.approx(1.0)
    assert metrics.rouge_l("good morning", "see you later") == 0.0
    rng = random.Random(0)
    words = "a b c d e f".split()
    for _ in range(50):
        pred = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        ref = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        assert metrics.rouge_l(pred, ref) == pytest.approx(_rouge_l_reference(pred, ref))


def _problem():
    return metrics.humaneval_problems(1)[0]  # HumanEval/0, has_close_elements


def test_humaneval_canonical_solution_passes():
    p = _problem()
    assert p["task_id"] == "HumanEval/0" and len(metrics.humaneval_problems()) == 164
    r = metrics.check_humaneval(p, p["canonical_solution"], timeout=5.0, execute_code=True)
    assert r["passed"] and r["result"] == "passed" and r["task_id"] == "HumanEval/0"


def test_humaneval_broken_solution_fails():
    r = metrics.check_humaneval(_problem(), "    return False\n", timeout=5.0, execute_code=True)
    assert not r["passed"] and r["result"] == "failed: AssertionError"


def test_humaneval_looping_solution_is_killed_by_the_time_limit():
    r = metrics.check_humaneval(_problem(), "    while True:\n        pass\n", timeout=1.0, execute_code=True)
    assert not r["passed"] and r["result"] == "timed out"


def test_humaneval_runs_nothing_without_the_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv("HPD_ALLOW_CODE_EVAL", raising=False)
    mark = tmp_path / "ran"
    with pytest.raises(HpdError, match="HumanEval/0 runs the completion.*off by default"):
        metrics.check_humaneval(_problem(), f"    open({str(mark)!r}, 'w')\n", timeout=5.0)
    with pytest.raises(HpdError, match="eval.humaneval runs the model's HumanEval completions"):
        metrics.humaneval_pass_at_1(None, None, [_problem()], timeout=5.0, max_new_tokens=8)
    assert not mark.exists()


def test_completion_is_cut_where_the_function_ends():
    text = "    return 1\n\ndef helper():\n    pass\n"
    assert metrics.truncate_completion(text) == "    return 1\n"
    assert metrics.truncate_completion("    return 2\n") == "    return 2\n"
    assert metrics.truncate_completion("    return 3\n```\n\nThis returns 3.\n") == "    return 3\n"


def test_a_chat_model_is_asked_for_the_function_and_continues_its_body():
    """A chat model gets a user turn holding the problem and its own reply opened with the problem's code in a
    Python block (it then writes the body, as a base model continuing the code does); a base model the code."""
    from tiny_llama import make_tokenizer

    prompt = _problem()["prompt"]
    tok = make_tokenizer()  # ChatML, as SmolLM2's and Qwen's
    assert "<|im_start|>" in tok.chat_template
    base = make_tokenizer()
    base.chat_template = None
    assert metrics.humaneval_prompt_ids(base, prompt) == base(prompt)["input_ids"]
    text = tok.decode(metrics.humaneval_prompt_ids(tok, prompt))
    user, reply = text.split("<|im_start|>assistant\n")
    assert user.startswith("<|im_start|>user\nComplete the following Python function.") and prompt in user
    assert reply == "```python\n" + prompt  # the reply opens with the code: what comes next is the body


def test_a_chat_reply_that_closes_its_code_block_and_explains_passes():
    """What a chat model writes after that opening: the body, the block's close, then prose. The body is judged,
    not the prose (before the reply was opened with the code, every chat reply failed on its prose)."""
    p = _problem()
    reply = p["canonical_solution"] + "```\n\nThis function compares every pair of numbers.\n"
    r = metrics.check_humaneval(p, metrics.truncate_completion(reply), timeout=5.0, execute_code=True)
    assert r["passed"]
    prose = "Here is the function:\n```python\n" + p["prompt"] + p["canonical_solution"] + "```\n"
    assert not metrics.check_humaneval(p, metrics.truncate_completion(prose), timeout=5.0, execute_code=True)["passed"]


def test_teacher_forced_nll_and_kl_match_a_float64_reference(tiny_runner, teacher_dir, monkeypatch):
    student_dir = tiny_runner.manifest("distill")["outputs"]["student_dir"]
    student, tok = hf_models.load_causal_lm(student_dir)
    teacher, _ = hf_models.load_causal_lm(teacher_dir)
    rows = metrics.read_rows(tiny_runner.manifest("data")["outputs"]["heldout"], 6)
    got = metrics.teacher_forced(student, tok, rows, teacher)
    nll = kl = 0.0
    n = 0
    for r in rows:
        ids, plen = metrics.encode_example(tok, r["prompt"], r["response"])
        x = torch.tensor([ids])
        q = torch.log_softmax(student(x).logits[0].double(), -1)
        p = torch.log_softmax(teacher(x).logits[0].double(), -1)
        for t in range(plen - 1, len(ids) - 1):
            nll -= q[t, ids[t + 1]].item()
            kl += (p[t].exp() * (p[t] - q[t])).sum().item()
            n += 1
    assert got["response_nll_nats"] == pytest.approx(nll / n, rel=1e-4)
    assert got["kl_to_teacher_nats"] == pytest.approx(kl / n, rel=1e-3) and kl > 0
    assert metrics.teacher_forced(teacher, tok, rows, teacher)["kl_to_teacher_nats"] == pytest.approx(0, abs=1e-6)
    monkeypatch.setattr(metrics, "LOGITS_BYTES", 4 * teacher.config.vocab_size * 8)  # 8 tokens: a row a batch
    again = metrics.teacher_forced(student, tok, rows, teacher)
    assert again["response_nll_nats"] == pytest.approx(nll / n, rel=1e-4)
    assert again["kl_to_teacher_nats"] == pytest.approx(kl / n, rel=1e-3)


class _MatchTask:
    """Correct when the response equals the row's target (to check the accuracy bookkeeping itself)."""

    @staticmethod
    def is_correct(text, row):
        return text == row["target"]


def test_greedy_accuracy_and_avg_at_k_bookkeeping(tiny_runner, teacher_dir):
    teacher, tok = hf_models.load_causal_lm(teacher_dir)
    rows = metrics.read_rows(tiny_runner.manifest("data")["outputs"]["heldout"], 8)
    greedy = metrics.generate_texts(teacher, tok, [r["prompt"] for r in rows])
    for i, (r, g) in enumerate(zip(rows, greedy)):
        r["target"] = g[0] if i % 4 else g[0] + "?"  # 6 of 8 targets are the greedy answer
    torch.manual_seed(0)
    report = metrics.answer_accuracy(teacher, tok, rows, _MatchTask, samples=3, temperature=1e-4)
    assert report == {"accuracy": 0.75, "avg@3": 0.75}  # near-zero temperature samples the greedy answer


def test_a_judgement_samples_the_same_answers_whatever_the_global_generator(tiny_runner, teacher_dir):
    """avg@k's draws come from the judge's own seed (common random numbers for every model and bench), and the
    caller's generator is left where it was."""
    from hpd.common.settings import EvalSettings
    from hpd.stages import evaluate

    teacher, tok = hf_models.load_causal_lm(teacher_dir)
    rows = metrics.read_rows(tiny_runner.manifest("data")["outputs"]["heldout"], 6)
    task = TASKS["math"]
    cfg = EvalSettings(samples=3, temperature=1.5)
    torch.manual_seed(1)
    first = evaluate.judge(teacher, tok, rows, cfg, task)
    after_first = torch.rand(1)
    torch.manual_seed(2)
    second = evaluate.judge(teacher, tok, rows, cfg, task)
    assert first == second
    torch.manual_seed(evaluate.JUDGE_SEED)
    direct = metrics.answer_accuracy(teacher, tok, rows, task, samples=3, temperature=1.5)
    assert first["avg@3"] == direct["avg@3"] and first["accuracy"] == direct["accuracy"]
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # the judge forked the generator: the caller's draws unchanged


def test_eval_stage_reports_student_and_teacher(tiny_home, tmp_path):
    r = make_runner(copy_home(tiny_home, tmp_path / "home"), "eval.examples=12", "eval.samples=2")
    r.run("eval")
    out = r.manifest("eval")["outputs"]
    report = json.loads(Path(out["report_path"]).read_text())
    s, t = report["student"], report["teacher"]
    assert s["examples"] == 12 and {"accuracy", "avg@2", "response_nll_nats", "kl_to_teacher_nats"} <= set(s)
    assert s["kl_to_teacher_nats"] > 0 and "kl_to_teacher_nats" not in t and 0 <= t["accuracy"] <= 1
    with pytest.raises(HpdError, match="eval.heldout .* does not exist"):  # at load, before any stage
        make_runner(r.ctx.home, "eval.examples=12", "eval.samples=2", 'eval.heldout="/nonexistent.jsonl"')


@pytest.mark.unit
def test_empty_held_out_responses_are_no_references(tmp_path):
    def rows(*responses):
        path = tmp_path / "h.jsonl"
        path.write_text(
            "".join(
                json.dumps({"prompt": f"{i}+1:", **({} if r is None else {"response": r})}) + "\n"
                for i, r in enumerate(responses)
            )
        )
        return str(path)

    assert all("response" not in r for r in metrics.heldout_rows(rows("", "  ", None)))  # the teacher's replies
    assert [r["response"] for r in metrics.heldout_rows(rows("2", "3"))] == ["2", "3"]
    with pytest.raises(HpdError, match=r"h.jsonl row 2 has no response \(or an empty one\) while other rows"):
        metrics.heldout_rows(rows("2", "", "4"))
    with pytest.raises(HpdError, match="row 1: the response is a int, not text"):
        metrics.heldout_rows(rows(7))


def test_eval_on_empty_responses_judges_against_the_teachers_replies(tiny_home, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"prompt": f"{a}+{a}+{a}:", "answer": str(3 * a), "response": ""}) + "\n" for a in (111, 222)
        )
    )
    r = make_runner(copy_home(tiny_home, tmp_path / "home"), f'eval.heldout="{heldout}"', "eval.samples=1")
    r.run("eval")
    report = r.outputs("eval").report
    assert report["references"] == "teacher" and report["student"]["examples"] == 2
    assert report["student"]["response_nll_nats"] < 20  # scored on the teacher's replies, not on end-of-text alone


def test_prompts_longer_than_the_context_are_one_line_errors(tiny_runner, teacher_dir):
    from hpd.stages import hf_models

    model, tok = hf_models.load_causal_lm(teacher_dir)
    with pytest.raises(HpdError, match="leaves the model no room to answer in its context of"):
        metrics.generate_texts(model, tok, ["1+1:", "1+" * 200 + "1:"])


def test_teacher_forced_batches_stay_within_the_log_prob_budget():
    """A large vocabulary: the batches teacher_forced makes keep each [tokens, vocabulary] fp32 tensor within
    LOGITS_BYTES (a 151,936-token head at 32 rows of 300 tokens would be 5.8 GB a tensor); a small one keeps the
    batches it asked for; a budget asked for is never raised."""
    from hpd.stages import metrics

    lengths = [300] * 32
    assert metrics._token_budget(lengths, 151_936, 32, 0) == metrics.LOGITS_BYTES // (4 * 151_936) == 441
    assert metrics._token_budget(lengths, 151_936, 32, 8192) == 441
    assert metrics._token_budget(lengths, 18, 32, 0) == 0  # 32 x 300 x 18 floats: the plain batches
    assert metrics._token_budget(lengths, 18, 32, 600) == 600
