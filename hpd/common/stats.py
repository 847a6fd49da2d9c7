"""The statistics every verdict is read from (`hpd compare`'s report, the README's benches): paired by seed (or by
problem), with a 95% interval.

paired_t       arm minus reference, paired by seed: mean, the 95% confidence interval of Student's t with n - 1
               degrees of freedom, and the verdict: "better" / "worse" when the interval excludes 0, "no difference
               detected" when it holds 0. Where every seed differs by the same amount (no spread to read), the
               interval is unbounded unless the exact sign test separates them (6 seeds or more).
mcnemar        two models on the same problems, pass or fail each: the exact McNemar test (a binomial on the
               problems only one of them passes), and a paired bootstrap interval of the difference in pass rates.
"""

from __future__ import annotations

import math
import random
import statistics

# Two-sided 95% quantiles of Student's t, by degrees of freedom (beyond 30: the normal's 1.96 is within 2%).
T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t95(df: int) -> float:
    if df in T95:
        return T95[df]
    below = max(k for k in T95 if k <= df)
    return T95[below] if df <= 30 else 1.96


def interval95(mean: float, sd: float, n: int) -> tuple[float, float]:
    """The 95% confidence interval of a mean of n paired differences with standard deviation sd (Student's t, n - 1
    degrees of freedom); unbounded for a single difference."""
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else float("inf")
    return mean - half, mean + half


def differences_t(d: list[float], higher_is_better: bool = False) -> dict:
    """Paired differences (arm - reference, one per seed): their mean, 95% interval and verdict."""
    n = len(d)
    mean = statistics.mean(d) if d else float("nan")
    low, high = interval95(mean, statistics.stdev(d) if n > 1 else 0.0, n)
    alike = n > 1 and mean != 0 and math.isclose(min(d), max(d), rel_tol=1e-9)  # equal but for rounding
    if alike and 2 * 0.5**n >= 0.05:
        # every seed differs by the same amount (a coarse measure: one question in 16): the spread is 0, so t's
        # interval has no width and proves nothing; the exact sign test (all n alike: p = 2 / 2^n) needs 6 seeds
        low, high = -math.inf, math.inf
    if low > 0 or high < 0:
        good = (low > 0) == higher_is_better
        verdict = "better" if good else "worse"
    else:
        verdict = "no difference detected"
    return {"mean": mean, "ci95": [low, high], "seeds": n, "verdict": verdict}


def paired_t(arm: dict, reference: dict, higher_is_better: bool = False) -> dict:
    """`arm`, `reference`: {seed: value}. The difference arm - reference over the seeds both have."""
    seeds = sorted(set(arm) & set(reference))
    return differences_t([arm[s] - reference[s] for s in seeds], higher_is_better)


def mcnemar(a: list[bool], b: list[bool], resamples: int = 10000, seed: int = 0) -> dict:
    """Model a against model b on the same problems (pass or fail each, in the same order)."""
    if len(a) != len(b):
        raise ValueError("both models must be judged on the same problems")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    # exact two-sided binomial test of only_a against n / 2
    k = min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    rng = random.Random(seed)
    diffs = []
    m = len(a)
    for _ in range(resamples):
        idx = [rng.randrange(m) for _ in range(m)]
        diffs.append(sum(a[i] - b[i] for i in idx) / m)
    diffs.sort()
    low, high = diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]
    mean = (sum(a) - sum(b)) / m
    verdict = "better" if low > 0 else "worse" if high < 0 else "no difference detected"
    return {
        "difference": mean,
        "ci95": [low, high],
        "only_a": only_a,
        "only_b": only_b,
        "p_mcnemar": p,
        "problems": m,
        "verdict": verdict,
    }
