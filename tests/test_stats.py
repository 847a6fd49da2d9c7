"""The verdicts' statistics against hand computations: Student's t interval paired by seed, McNemar's exact test."""

import math

import pytest

from hpd.common.stats import mcnemar, paired_t, t95

pytestmark = pytest.mark.unit


def test_paired_t_interval_by_hand():
    arm = {0: 1.0, 1: 2.0, 2: 3.0, 3: 3.0, 4: 5.0}
    ref = {0: 0.5, 1: 1.0, 2: 1.0, 3: 2.5, 4: 2.0, 9: 100.0}  # seed 9 has no pair: left out
    d = [0.5, 1.0, 2.0, 0.5, 3.0]  # mean 1.4, half-width 1.35: the interval is above 0
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.776 * sd / math.sqrt(5)  # t with 4 degrees of freedom
    r = paired_t(arm, ref)
    assert r["seeds"] == 5 and r["mean"] == pytest.approx(mean)
    assert r["ci95"] == pytest.approx([mean - half, mean + half])
    assert r["verdict"] == "worse"  # lower is better by default, and the interval is above 0
    assert paired_t(arm, ref, higher_is_better=True)["verdict"] == "better"


def test_an_interval_holding_zero_is_no_difference_detected():
    r = paired_t({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert r["ci95"][0] < 0 < r["ci95"][1] and r["verdict"] == "no difference detected"
    assert t95(2) == 4.303 and t95(27) == 2.060 and t95(100) == 1.96


def test_mcnemar_exact_by_hand():
    # 10 problems: 6 only a passes, 1 only b passes, 3 both
    a = [True] * 6 + [False] + [True] * 3
    b = [False] * 6 + [True] + [True] * 3
    r = mcnemar(a, b)
    p = 2 * (math.comb(7, 0) + math.comb(7, 1)) / 2**7  # two-sided binomial, 1 of 7 discordant
    assert (r["only_a"], r["only_b"]) == (6, 1) and r["p_mcnemar"] == pytest.approx(p)
    assert r["difference"] == pytest.approx(0.5) and r["ci95"][0] <= 0.5 <= r["ci95"][1]
    assert mcnemar(a, a)["p_mcnemar"] == 1.0 and mcnemar(a, a)["verdict"] == "no difference detected"
    with pytest.raises(ValueError, match="same problems"):
        mcnemar(a, b[:-1])


def test_plateau_reads_the_last_fifth_of_the_learning_curve():
    from bench.real_students import plateau

    flat = [{"student_step": s, "curve_kl": kl} for s, kl in ((40, 2.0), (80, 1.2), (160, 1.0), (200, 0.99))]
    r = plateau(flat, 200)
    assert r["measure"] == "curve_kl" and r["at_80pct"] == 1.0 and r["plateau"] is True
    assert r["gain_last_20pct"] == pytest.approx(0.01)
    falling = flat[:-1] + [{"student_step": 200, "curve_kl": 0.9}]
    assert plateau(falling, 200)["plateau"] is False  # 10% better over the last fifth: not yet flat
    assert plateau(flat[:1], 200)["plateau"] is None  # one point says nothing
    # across tokenizers the curve has no per-token KL: the held-out NLL of the teacher's replies is read instead
    nll = [{"student_step": e["student_step"], "curve_nll": e["curve_kl"] + 1} for e in falling]
    r = plateau(nll, 200)
    assert r["measure"] == "curve_nll" and r["at_80pct"] == 2.0 and r["final"] == 1.9 and r["plateau"] is False


def test_humaneval_is_paired_over_the_seeds_both_arms_finished():
    """A comparison read while it runs: SeqKD has two seeds, fkl one; McNemar pairs fkl's seed with SeqKD's same seed
    (and the student before distillation once per fkl seed), never problems of different seeds."""
    from bench.real_students import summarise

    def arm(method, seed, passed):
        student = {"response_nll_nats": 1.0 + seed, "humaneval_pass@1": sum(passed) / 4, "humaneval_passed": passed}
        return {
            "method": method,
            "seed": seed,
            "eval": {"student": student, "initial": {"humaneval_passed": [0] * 4}},
            "student": {},
            "log": [],
        }

    results = [arm("sft", 0, [1, 0, 0, 0]), arm("sft", 1, [1, 1, 1, 1]), arm("fkl", 0, [1, 1, 0, 0])]
    paired = summarise(results, "X")["humaneval_paired"]
    assert paired["fkl vs sft"]["only_a"] == 1 and paired["fkl vs sft"]["only_b"] == 0  # seed 0 against seed 0
    assert paired["fkl vs before"]["only_a"] == 2 and paired["sft vs before"]["only_a"] == 5


def test_seeds_that_all_differ_by_the_same_amount_prove_nothing_until_the_sign_test_does():
    """A coarse measure (one question in 16) can give every seed the same difference: t's interval then has no width.
    The exact sign test's two-sided p for n alike signs is 2 / 2^n: below 0.05 from 6 seeds."""
    for n in (2, 5):
        r = paired_t(dict.fromkeys(range(n), 0.0), dict.fromkeys(range(n), 0.0625))
        assert r["ci95"] == [-math.inf, math.inf] and r["verdict"] == "no difference detected"
    r = paired_t(dict.fromkeys(range(6), 0.0), dict.fromkeys(range(6), 0.0625))
    assert r["ci95"] == [-0.0625, -0.0625] and r["verdict"] == "better"  # lower is better by default
    assert paired_t({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})["verdict"] == "no difference detected"
    r = paired_t({0: 0.3, 1: 0.2}, {0: 0.2, 1: 0.1})  # 0.09999999999999998 and 0.1: the same difference
    assert r["ci95"] == [-math.inf, math.inf] and r["verdict"] == "no difference detected"
