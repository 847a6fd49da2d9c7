"""Rewrites the measured sections of README.md from bench/results/ (run by `make bench` after the benches)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import jinja2

from hpd.common.stats import interval95, paired_t
from hpd.pipeline.config import load as load_config
from hpd.stages.heads import GPU_CHUNK_ELEMENTS
from hpd.stages.losses import LOSS_CHUNK_ELEMENTS
from hpd.stages.tasks import arithmetic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEMPLATES = Path(__file__).resolve().parent / "templates"

# The prose of each section is a markdown template in bench/templates/ (Jinja2); Python computes only the figures it
# names. StrictUndefined: a template that names a figure its results file does not have fails the render, and with it
# `python -m bench.readme --check` (a test), instead of printing a blank.
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)
# {{ x|f(".1%") }}: Python's format spec; an unbounded interval's end (no spread to read it from) as the sign of infinity
_ENV.filters["f"] = lambda x, spec: ("-" if x < 0 else "+") + "∞" if math.isinf(x) else format(x, spec)


def _paired_verdict(d: dict) -> str:
    """A paired difference's verdict, or what one seed gives instead (its interval is unbounded: nothing to read)."""
    return d["verdict"] if d.get("seeds", 2) > 1 else "one seed so far, no interval to read"


_ENV.globals.update(
    min=min,
    max=max,
    mean=statistics.mean,
    met=lambda ok: "met" if ok else "not met",
    ordinal=lambda n: _ordinal(n),
    verdict=_paired_verdict,
)


def render(name: str, **figures) -> str:
    """Section `name`'s template filled with `figures`."""
    return _ENV.get_template(f"{name}.md").render(**figures)


def say(phrase: str, *figures) -> str:
    """A phrase several sections share (a macro of bench/templates/phrases.md) filled with `figures`."""
    return str(getattr(_ENV.get_template("phrases.md").module, phrase)(*figures))


def _interval(d: tuple) -> dict:
    """A paired difference (mean, sd, seeds, seeds where it is better) with its 95% interval (Student's t, n - 1
    degrees of freedom), as phrases.md's `paired` reads it."""
    mean, sd, n, better = d
    lo, hi = interval95(mean, sd, n)
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "better": better, "beyond": lo > 0 or hi < 0}


# The results files the section being rendered has read (parsed; None for a bench's table): each section ends with
# where its figures come from.
_SOURCES: dict[Path, object] = {}


def _settings(config: str, overrides=()):
    """A preset's settings as a bench ran them; the code opt-in is given because a code preset's checks ask for it
    (reading its settings runs nothing)."""
    return load_config(config, [*overrides, "code.execute=true"])


def _result(path: Path, source: bool = True) -> dict | None:
    """A bench's results file, or None where that bench has not been run (its README section is left empty); with
    source=False it is only looked at (to choose a file), so the section does not list it among its sources."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    if source:
        _SOURCES[path] = r
    return r


def _text(path: Path) -> str:
    """A table a bench wrote beside its results file."""
    _SOURCES[path] = None
    return path.read_text()


def make_distill() -> str:
    r = _result(RESULTS / "default_task.json")
    fresh = _result(RESULTS / "fresh_clone.json")
    d = r["paired_student_minus_baseline"]
    above = r["seeds_above_80pct_of_teacher"]
    return render(
        "make-distill",
        r=r,
        t=r["teacher"],
        a=r["arms"]["student"],
        b=r["arms"]["baseline"],
        d=d,
        n=r["seeds"],
        above=(above["student"], above["baseline"]),
        nll_lower=sum(x < 0 for x in d["response_nll_nats"]["values"]),
        ci={k: _interval((x["mean"], x["sd"], r["seeds"], 0)) for k, x in d.items()},  # paired t, n - 1 df
        fresh=fresh,
        # the fresh clone prints the same table, then the export's lines: it differs when the table is not in it
        fresh_differs=bool(fresh and fresh.get("printed") and r["printed"].strip() not in fresh["printed"]),
        v=_verdict(r),
    )


def _verdict(r: dict) -> dict:
    """What the teacher's distribution bought over SFT in this run, read off the per-seed results."""
    n, t, runs = r["seeds"], r["teacher"]["accuracy"], r["runs"]
    failed = [i for i, x in enumerate(runs) if x["baseline"]["accuracy"] < 0.8 * t]
    learned = [i for i in range(n) if i not in failed]
    d = r["paired_student_minus_baseline"]["accuracy"]
    lo, hi = interval95(d["mean"], d["sd"], n)
    return {
        "m": r["method"],
        "b": r["baseline"],
        "n": n,
        "failed": failed,
        "learned": learned,
        "student_reached": sum(x["student"]["accuracy"] >= 0.8 * t for x in runs),
        "closer": sum(
            x["baseline"]["response_nll_nats"] < x["student"]["response_nll_nats"] for x in (runs[i] for i in learned)
        ),
        "d": d,
        "lo": lo,
        "hi": hi,
        "separable": lo > 0 or hi < 0,
        "student_kl": r["arms"]["student"]["kl_to_teacher_nats"]["mean"],
        "teacher_nll": r["teacher"]["response_nll_nats"],
    }


def history() -> str:
    """Figures no make target measures again, each with the commit and date it was measured at."""
    smaller = RESULTS / "default_2048"  # `hpd compare` at 2,048 sequences
    acc = None
    if (smaller / "fkl.json").exists() and (smaller / "sft.json").exists():
        acc = {
            arm: [x["eval"]["student"]["accuracy"] for x in _result(smaller / f"{arm}.json")] for arm in ("fkl", "sft")
        }
    return render("history", acc=acc)


def default_task() -> str:
    r = _result(RESULTS / "default_task.json")
    stages = ", ".join(f"{k} {v:.0f} s" if v >= 10 else f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
    return render("default-task", r=r, t=r["teacher"], c=r["cache"], cfg=r["config"], stages=stages)


def real_teacher() -> str:
    r = _result(RESULTS / "real_teacher.json")
    if r is None:
        return render("real-teacher", r=None)
    return render(
        "real-teacher",
        r=r,
        c=r["config"],
        g=r["generate"],
        sc=r["score"],
        stages=", ".join(f"{k} {v:.0f} s" for k, v in r["stage_seconds"].items()),
        overhead_row=_overhead_row("smollm2"),
        cached_vs_online=_real_cached_vs_online(),
        cache_formats=_real_cache_formats(),
        targets=_real_targets(),
    )


def _overhead_row(config: str) -> str:
    o = _result(RESULTS / f"score_overhead_{config}.json")
    if o is None:
        return ""
    rounds = len(o["arms"]["bare"]["seconds"]["runs"]) if "arms" in o else o.get("repeats", 0)
    return render("overhead-row", o=o, rounds=rounds)


def _spread(x: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x['median'])} ({fmt.format(x['min'])}-{fmt.format(x['max'])})"


def performance() -> str:
    """Memory and speed at real vocabularies: the head inside the loss, the lean score stage, sampling, bf16."""
    heads = [h for h in (_result(RESULTS / f"head_memory_{x}.json") for x in ("smollm2", "qwen0.5b")) if h]
    overheads = [
        (label, o)
        for name, label in (
            ("smollm2", "SmolLM2-135M"),
            ("smollm2_qwen0.5b", "Qwen2.5-Coder-0.5B"),
            ("math", "the math teacher"),
        )
        if (o := _result(RESULTS / f"score_overhead_{name}.json")) and "arms" in o
    ]
    s = _result(RESULTS / "sampling_speed.json")
    sampling = {}
    if s:
        arms = s["arms"]
        before = arms["token budget 6144"]["tokens_per_s"]["median"]
        best = max(arms, key=lambda a: arms[a]["tokens_per_s"]["median"])
        sampling = {
            "plain": arms["plain loop, batch 32"]["tokens_per_s"]["median"],
            "before": before,
            "best": best,
            "gain": arms[best]["tokens_per_s"]["median"] / before,
        }
    b = _result(RESULTS / "bf16_cpu.json")
    return render(
        "performance",
        heads=heads,
        overheads=overheads,
        real_overhead=any(_result(RESULTS / f"score_overhead_{n}.json") for n in ("smollm2", "smollm2_qwen0.5b")),
        s=s,
        **sampling,
        b=b,
        kl=b and b["bucket_kl_fp32_to_bf16"],
        spread=_spread,
    )


def _speedup_bound(r: dict) -> float:
    """The most a cache can speed training up, from measured steps: a cached step costs at least a plain SFT step
    of the same student (no teacher signal at all), so the speed-up is at most online / SFT."""
    m = r["median"]
    return m["online"]["seconds_per_step"] / m["sft"]["seconds_per_step"]


def _pair_cached_vs_online(config: str) -> str:
    """A real pair's training from its cache against its teacher online (bench/real_cached_vs_online.py --config)."""
    r = _result(RESULTS / f"real_cached_vs_online_{config}.json")
    if r is None:
        return ""
    labels = {"cached": "from the cache", "online": "teacher online, same process", "sft": "plain SFT (no teacher)"}
    d = _settings(r["config"], r["overrides"]).distill
    return render(
        "pair-cached-vs-online",
        r=r,
        accum=d.gradient_accumulation_steps,
        arms=[a for a in labels if a in {x["arm"] for x in r["warmup"]}],
        labels=labels,
        batch=d.batch_size,
        gpu=_complete(_result(RESULTS / "gpu_check.json")) if config == "qwen-coder" else None,
    )


def _real_cached_vs_online() -> str:
    r = _result(RESULTS / "real_cached_vs_online.json")
    if r is None:
        return ""
    return render(
        "real-cached-vs-online", r=r, m=r["median"], bound=_speedup_bound(r), memory_floor=_memory_floor(r["median"])
    )


COMPACT = "compact:0.125"  # the shipped compact step (hpd/storage/encodings.py)


def _k64(r: dict, encoding: str) -> dict:
    return next(
        x for x in r["results"] if x["zstd_level"] == r["zstd_level"] and x["k"] == 64 and x["encoding"] == encoding
    )


def _shard_bytes(r: dict, row: dict) -> float:
    """Bytes per token in shards alone: what grows with the cache (the vocabulary order is stored once)."""
    return row["bytes_per_token"] - row.get("order_bytes", 0) / r["scored_tokens"]


def _real_targets() -> str:
    """The real teacher's targets, each with its measurement and whether it was met."""
    formats = _result(RESULTS / "cache_formats_smollm2.json")
    if formats:
        k64 = _k64(formats, COMPACT)
        formats = {
            "r": formats,
            "k64": k64,
            "plain": _k64(formats, "idsort-q8:0.0625"),
            "shards": _shard_bytes(formats, k64),
        }
    cvo = _result(RESULTS / "real_cached_vs_online.json")
    compared = _result(RESULTS / "compare_smollm2" / "results.json")
    nll: dict = {}
    for x in compared or []:
        nll.setdefault(x["method"], []).append(x["eval"]["student"]["response_nll_nats"])
    return render(
        "real-targets",
        compact=COMPACT,
        formats=formats,
        overhead=_result(RESULTS / "score_overhead_smollm2.json"),
        cvo=cvo,
        bound=cvo and _speedup_bound(cvo),
        gradient=_result(RESULTS / "hpd_gradient_smollm2.json"),
        compare=sorted(((m, statistics.mean(v)) for m, v in nll.items()), key=lambda x: x[1]),
    )


def _memory_floor(m: dict) -> str:
    """Why a memory target may be out of reach: the cached arm cannot need less than SFT of the same student."""
    cached, online, sft = (m[a]["training_memory_mb"] for a in ("cached", "online", "sft"))
    return "" if cached > 1.05 * sft else render("memory-floor", cached=cached, online=online, sft=sft)


def _real_cache_formats() -> str:
    r = _result(RESULTS / "cache_formats_smollm2.json")
    if r is None:
        return ""
    k64 = _k64(r, COMPACT)
    return render(
        "real-cache-formats",
        r=r,
        rows=[x for x in r["results"] if x["zstd_level"] == r["zstd_level"] and x["k"] in (16, 32, 64, 128)],
        k64=k64,
        plain=_k64(r, "idsort-q8:0.0625"),
        shards=_shard_bytes(r, k64),
    )


def cache_formats() -> str:
    r = _result(RESULTS / "cache_formats.json")
    row = next(
        x
        for x in r["results"]
        if x["k"] == 64 and x["encoding"].startswith("idsort") and x["zstd_level"] == r["zstd_level"]
    )
    return render(
        "cache-formats",
        r=r,
        row=row,
        c=r["container_decode_tokens_per_s"],
        ld=r["loader"],
        cb=r["column_bytes_per_token_k64"],
        compact=_k64(r, COMPACT),
        table=_text(RESULTS / "cache_formats.md"),
    )


def hpd_gradient() -> str:
    path = RESULTS / "hpd_gradient.md"
    if not path.exists():
        return ""
    real = _result(RESULTS / "hpd_gradient_smollm2.json")
    figures = {}
    if real:
        c = {name: x["cosine_mean"] for name, x in real.items() if "@" in name}
        figures = {
            "real_vocab": real.get("vocab_size") or _result(RESULTS / "cache_formats_smollm2.json")["vocab_size"],
            "n_layer": load_config("smollm2").distill.n_layer,
            "real_table": _text(RESULTS / "hpd_gradient_smollm2.md"),
            "c": c,
            "order": sorted(c, key=c.get, reverse=True),
        }
    dialogue = _result(RESULTS / "hpd_gradient.json") or {}
    return render(
        "hpd-gradient",
        table=_text(path),
        vocab=dialogue.get("vocab_size") or _result(RESULTS / "cache_formats.json")["vocab_size"],
        tail=_tail_share("cache_formats.json"),
        real=real,
        **figures,
    )


def _tail_share(results_file: str) -> str:
    """The teacher's mass outside its top-64 and top-16, as the cache-format bench measured it."""
    r = _result(RESULTS / results_file)
    return f"{r['tail_mass_mean']['64'] * 100:.0f}-{r['tail_mass_mean']['16']:.0%}"


def refresh_rounds() -> str:
    r = _result(RESULTS / "refresh_rounds.json")
    if r is None:
        return ""
    last = r["rounds"]
    runs = {(x["arm"], x["seed"]): x for x in r["runs"]}

    def paired(arm, key):  # arm minus offline after the last round, paired by seed, with its 95% interval
        d = [runs[(arm, s)]["rounds"][last][key] - runs[("offline", s)]["rounds"][last][key] for s in range(r["seeds"])]
        better = sum((x > 0) == _higher_is_better(key) for x in d if x != 0)
        return {**_interval((statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0.0, len(d), better)), "d": d}

    diffs = [
        {"arm": a, "acc": paired(a, "heldout_accuracy"), "nll": paired(a, "nll")} for a in ("hpd+refresh", "hpd->opd")
    ]
    per_round = {
        key: statistics.mean(y[key] for x in r["runs"] if x["arm"] != "offline" for y in x["rounds"][1:])
        for key in ("refresh_seconds", "rescore_seconds", "distill_seconds")
    }
    return render(
        "refresh-rounds",
        r=r,
        c=r["config"],
        t=r["teacher_cost"],
        table=_text(RESULTS / "refresh_rounds.md"),
        diffs=diffs,
        per_round=per_round,
    )


def compare() -> str:
    parts = []
    for task in ("math", "dialogue", "smollm2"):
        d = RESULTS / f"compare_{task}"
        if not (d / "report.md").exists():
            continue
        md = _text(d / "report.md").replace("](", f"](../bench/results/compare_{task}/")
        results = _result(d / "results.json")
        seeds = len({r["seed"] for r in results})
        parts.append(
            {
                "task": task,
                "label": "the real teacher, SmolLM2-135M-Instruct" if task == "smollm2" else task,
                "command": {
                    "math": f"hpd compare --set compare.seeds={seeds}",
                    "dialogue": f"hpd compare --config dialogue --set compare.seeds={seeds}",
                    "smollm2": "hpd compare --config smollm2",
                }[task],
                "table": md.split("\n", 2)[2],
                "verdict": {"math": _math_verdict, "dialogue": _dialogue_verdict, "smollm2": _real_verdict}[task](
                    results
                ),
            }
        )
    return render("compare", parts=parts)


def _students(results: list[dict]) -> dict:
    """{method: {seed: the student's eval report}} of a comparison's results."""
    by: dict = {}
    for r in results:
        by.setdefault(r["method"], {})[r["seed"]] = r["eval"]["student"]
    return by


def _by_seed(results: list[dict], key: str) -> dict:
    """{method: {seed: the student's `key`}} of a comparison's results."""
    return {m: {s: x[key] for s, x in seeds.items()} for m, seeds in _students(results).items()}


def _opd_split(results: list[dict]) -> dict:
    """The hpd->opd arm's steps: HPD in the offline distill stage, then the OPD round's."""
    r = next(x for x in results if x["method"] == "hpd->opd")
    first = max(e["student_step"] for e in r["log"] if e.get("stage") == "distill" and "student_step" in e)
    return {"hpd_steps": first, "opd_steps": r["student"]["student_steps"] - first}


def _ordinal(n: int) -> str:
    return f"{n}{'st' if n == 1 else 'nd' if n == 2 else 'rd' if n == 3 else 'th'}"


def _math_verdict(results: list[dict]) -> str:
    acc = _by_seed(results, "accuracy")
    nll, kl = _by_seed(results, "response_nll_nats"), _by_seed(results, "kl_to_teacher_nats")
    mean = {m: statistics.mean(v.values()) for m, v in acc.items()}
    ranked = sorted(mean, key=mean.get, reverse=True)
    best = ranked[0]
    second = ranked[1]

    def below(m, d):  # m's mean below hpd's on measure d
        return statistics.mean(d[m].values()) < statistics.mean(d["hpd"].values())

    others = [m for m in ranked if m != "hpd"]
    return render(
        "math-verdict",
        place=ranked.index("hpd") + 1,
        n=len(ranked),
        mean=mean,
        best=best,
        second=second,
        better_both=[m for m in others if below(m, nll) and below(m, kl)],
        worse_both=[m for m in others if not below(m, nll) and not below(m, kl)],
        opd=_opd_split(results),
        seeds=len(acc["hpd"]),
        vs_hpd=paired_t(acc[best], acc["hpd"], higher_is_better=True),
        vs_second=paired_t(acc[best], acc[second], higher_is_better=True),
    )


def _dialogue_verdict(results: list[dict]) -> str:
    nll_by = _by_seed(results, "response_nll_nats")
    nll = {m: statistics.mean(v.values()) for m, v in nll_by.items()}
    kl = {m: statistics.mean(v.values()) for m, v in _by_seed(results, "kl_to_teacher_nats").items()}
    rouge = {m: statistics.mean(v.values()) for m, v in _by_seed(results, "rouge_l").items()}
    ranked = sorted(nll, key=nll.get)
    online = None
    q = _result(RESULTS / "cached_vs_online_quality.json")
    if q:
        runs = [r["eval"]["response_nll_nats"] for r in q["dialogue"] if r["arm"] == "online"]
        online = {"nll": statistics.mean(runs), "seeds": len(runs)}
    rest = [m for m in ranked if m not in ("hpd", "sft", "hpd->opd")]
    return render(
        "dialogue-verdict",
        teacher=next(r["eval"]["teacher"] for r in results if r["eval"].get("teacher")),
        rouge_low=min(rouge.values()),
        rouge_high=max(rouge.values()),
        ranked=ranked,
        nll=nll,
        by_kl=sorted(kl, key=kl.get),
        place=ranked.index("hpd") + 1,
        behind=[m for m in rest if nll[m] < nll["hpd"]],
        ahead=[m for m in rest if nll[m] >= nll["hpd"]],
        opd=_opd_split(results),
        top_k=load_config("dialogue").score.top_k,
        vocab=_result(RESULTS / "cache_formats.json")["vocab_size"],
        lead=paired_t(nll_by[ranked[0]], nll_by["hpd"]),
        online=online,
    )


def _real_verdict(results: list[dict]) -> str:
    """Does the regime study's pick for a truncated cache of a large vocabulary (hpd_fkl) hold on a real LLM?"""
    nll_by, kl_by = _by_seed(results, "response_nll_nats"), _by_seed(results, "kl_to_teacher_nats")
    nll = {m: statistics.mean(v.values()) for m, v in nll_by.items()}
    kl = {m: statistics.mean(v.values()) for m, v in kl_by.items()}
    ranked, by_kl = sorted(nll, key=nll.get), sorted(kl, key=kl.get)
    pick = "hpd_fkl"
    others = [(m, (paired_t(nll_by[pick], nll_by[m]), paired_t(kl_by[pick], kl_by[m]))) for m in ranked if m != pick]
    cfg = load_config("smollm2")
    fmt = _result(RESULTS / "cache_formats_smollm2.json") or {}
    kls = [r["eval"]["student"]["kl_to_teacher_nats"] for r in results]
    return render(
        "real-verdict",
        pick=pick,
        dialogue_k=load_config("dialogue").score.top_k,
        dialogue_vocab=_result(RESULTS / "cache_formats.json")["vocab_size"],
        top_k=cfg.score.top_k,
        vocab=fmt.get("vocab_size") or results[0]["eval"]["teacher"].get("vocab_size", 0),
        outside=fmt["tail_mass_mean"]["64"] if fmt else None,
        ranked=ranked,
        by_kl=by_kl,
        first_nll=ranked[0],
        first_kl=by_kl[0],
        beaten=[m for m, (x, _) in others if x["verdict"] == "better"],
        nll=nll,
        kl=kl,
        teacher=next(r["eval"]["teacher"] for r in results if r["eval"].get("teacher")),
        others=others,
        d=cfg.distill,
        student=results[0]["eval"]["student"]["parameters"],
        steps=cfg.compare.steps,
        prompts=cfg.data.train_examples,
        minutes=sum(r.get("train_seconds") or r["student"].get("train_seconds", 0) for r in results) / 60,
        kl_low=min(kls),
        kl_high=max(kls),
        seeds=len(nll_by[pick]),
        hpd_vs_sft_in_study=_hpd_vs_sft_in_study(),
        hpd_sft=paired_t(nll_by["hpd"], nll_by["sft"]),
        preset_method=cfg.distill.method,
        study_seeds=max(
            (
                x["seeds"]
                for s in _result(RESULTS / "study" / "summary.json") or []
                if s["task"] == "dialogue"
                for x in s["table"].values()
            ),
            default=0,
        ),
    )


def _hpd_vs_sft_in_study() -> str:
    """In how many of the regime study's settings of each built-in task HPD trailed (or led) SFT by held-out NLL
    beyond the paired 95% interval."""
    runs, tasks = _study_runs(), []
    for task in ("math", "dialogue"):
        gaps = [_paired(runs[k], "hpd", "sft") for k in runs if k[0] == task]
        if gaps:
            worse = sum(_separable(g) and g[0] > 0 for g in gaps)
            tasks.append((task, worse, sum(_separable(g) and g[0] < 0 for g in gaps), len(gaps)))
    return say("hpd_vs_sft", tasks)


def _outside_topk(quality: dict) -> str:
    """The cached dialogue runs' share of HPD samples outside the top-k, first and last logged (recorded by the
    quality runs; older results files lack it)."""
    runs = [r["outside_topk"] for r in quality["dialogue"] if r["arm"] == "cached" and "outside_topk" in r]
    if not runs:
        return ""
    first, last = statistics.mean(r[0][1] for r in runs), statistics.mean(r[-1][1] for r in runs)
    return say("outside_topk", first, runs[0][0][0], last, runs[0][-1][0], len(runs))


def _trained_teacher_parameters(task: str) -> int:
    """The built-in teacher's size, as the cached-vs-online bench measured it: the smallest of that task's teachers
    (the others are larger random ones)."""
    t = _result(RESULTS / "cached_vs_online_timing.json") or {}
    return min((r["teacher_parameters"] for k, r in t.items() if k.startswith(task)), default=0)


def cached_vs_online() -> str:
    md, timing = RESULTS / "cached_vs_online.md", RESULTS / "cached_vs_online_timing.json"
    if not md.exists():
        return ""
    t = _result(timing)
    big = {k: r for k, r in t.items() if r["size_ratio"] >= 8}
    met = {  # the sizes where each target is met: at least 2x the tokens/s, at most 0.6x the training memory
        "speed": [k for k, r in big.items() if r["speedup"] >= 2],
        "memory": [k for k, r in big.items() if r["training_mb_ratio"] <= 0.6],
    }
    overheads = [
        (name, o["overhead_compute"])
        for name, cfg in (
            (f"math ({_trained_teacher_parameters('math') / 1e6:.2f}M teacher)", "math"),
            (f"dialogue ({_trained_teacher_parameters('dialogue') / 1e6:.2f}M)", "dialogue"),
            ("SmolLM2-135M", "smollm2"),
        )
        if (o := _result(RESULTS / f"score_overhead_{cfg}.json"))
    ]
    m = _result(RESULTS / "cached_vs_online.json")["summary"]["math"]
    quality = _result(RESULTS / "cached_vs_online_quality.json")
    dialogue = {  # cached minus online, paired by seed
        key: paired_t(
            *(
                {r["seed"]: r["eval"][key] for r in quality["dialogue"] if r["arm"] == arm}
                for arm in ("cached", "online")
            )
        )
        for key in ("response_nll_nats", "kl_to_teacher_nats")
    }
    math_acc = {
        arm: {r["seed"]: r["eval"]["accuracy"] for r in quality["math"] if r["arm"] == arm}
        for arm in ("cached", "online")
    }
    math_key = min((k for k in t if k.startswith("math")), key=lambda k: t[k]["teacher_parameters"])
    return render(
        "cached-vs-online",
        big=big,
        met_at=met,
        dialogue_sizes=[(k, r) for k, r in t.items() if k.startswith("dialogue")],
        math=t[math_key],
        math_vocab=len(arithmetic.SPECIALS) + len(arithmetic.CHARS),  # the math task's character vocabulary
        overheads=overheads,
        met_overhead=[n for n, x in overheads if x <= 0.10],
        m=m,
        math_same=paired_t(math_acc["cached"], math_acc["online"], higher_is_better=True),
        math_seeds=len(math_acc["cached"]),
        dialogue_k=load_config("dialogue").score.top_k,
        dialogue_vocab=_result(RESULTS / "cache_formats.json")["vocab_size"],
        dialogue=dialogue,
        outside=_outside_topk(quality),
        body=_text(md).split("\n", 2)[2].replace("\n## ", "\n#### "),
    )


# The reliability matrix: every fault the suite injects, and the test that injects it (tests/).
RELIABILITY = [
    (
        "Crash (SIGKILL)",
        [
            ("teacher training, after a checkpoint", "test_crash_resume: resumes from the checkpoint"),
            ("generate, between shards", "test_faults: same sequence fingerprint"),
            ("score, between shards", "test_crash_resume: identical cache, resumes after the kept shards"),
            ("distill, after a checkpoint", "test_distill: the uninterrupted student, bit for bit"),
            ("refresh and rescore, between shards", "test_refresh: same samples, same shard checksums"),
            ("round training, after a checkpoint", "test_refresh: the uninterrupted student, bit for bit"),
            ("eval, between student and teacher", "test_faults: the same report"),
            ("anywhere, at random moments", "`make soak` (below)"),
        ],
    ),
    (
        "Corruption",
        [
            (
                "a flipped byte, a truncated shard, a deleted shard",
                "test_faults: each named when opened and by `hpd cache verify`; distill refuses",
            ),
            ("a hand-edited manifest (a value, or broken JSON)", "test_faults: the manifest's own checksum"),
            ("a damaged sequence shard", "test_faults: distill refuses, naming the shard"),
            ("a damaged shard while a writer resumes", "test_logit_cache: only intact shards are kept"),
        ],
    ),
    (
        "Bad input (one line, exit 2, nothing published)",
        [
            (
                "missing file; malformed JSONL; missing field; empty file; empty prompt; non-UTF-8 text",
                "test_bad_input",
            ),
            (
                "sequence longer than the context: refused, or cut with a warning (`generate.too_long`)",
                "test_bad_input",
            ),
            ("teacher and student with different tokenizers; k larger than the vocabulary", "test_bad_input"),
            (
                "unknown loss; negative learning rate; alpha outside [0, 1]; share outside [0, 1]; unknown key or "
                "stage",
                "test_bad_input",
            ),
            ("not a causal LM; no config.json; config but no weights; NaN logits from the teacher", "test_bad_input"),
            (
                "cache root not writable; disk full in the middle of a shard (resumes once space is back)",
                "test_bad_input",
            ),
            (
                "run names that are paths (`../x`, `/x`, empty); `teachers.runs` naming each other in a loop; an "
                "ensemble's run scored on other sequences (all before any stage)",
                "test_config, test_teachers",
            ),
            (
                "held-out rows with empty responses (no references, or refused naming the row); a truncated GGUF file "
                "(expected vs found bytes, no lock left)",
                "test_metrics, test_gguf",
            ),
            (
                "`hpd cache merge` to a sampled encoding, of one cache twice, with `--k 0`",
                "test_merge: refused before anything is written",
            ),
        ],
    ),
    (
        "Numerical failure",
        [
            (
                "a non-finite loss or gradient (a diverging student)",
                "test_bad_input: stops at that step, names the method, publishes nothing",
            ),
            ("a model with NaN or inf weights, by any path", "test_bad_input: never published"),
            (
                "every method on every cache encoding, sampled ones with empty slots",
                "test_sampled_targets: finite, and the float64 reference",
            ),
            (
                "a value function giving NaN or inf; a selection that keeps nothing",
                "test_values: refused naming the sequence; trains on the rest",
            ),
        ],
    ),
    (
        "Untrusted code",
        [
            (
                "a prompt's `test` that writes outside its directory, forks a shell, opens a socket, eats memory or "
                "loops",
                "test_sandbox: blocked (bubblewrap, and the fallback layer), counted as failed",
            ),
            (
                "code execution without the opt-in (`code.execute`, `HPD_ALLOW_CODE_EVAL=1`)",
                "test_sandbox: one line before any stage",
            ),
        ],
    ),
    (
        "Concurrency",
        [
            ("two runs build the same cache at once", "test_cache_tools: one builds, the other waits and reuses"),
            ("two experiments read one cache at once", "test_cache_tools: identical tensors"),
            (
                "`hpd cache gc` while a run reads a cache",
                "test_faults: kept while read; removed once the reader is dead",
            ),
        ],
    ),
]


def reliability() -> str:
    return render(
        "reliability", matrix=RELIABILITY, n=sum(len(c) for _, c in RELIABILITY), soak=_result(RESULTS / "soak.json")
    )


def _separable(d) -> bool:
    """A paired difference (mean, sd, n, ...) whose 95% interval (Student's t, n - 1 degrees of freedom) excludes 0."""
    return _interval(d)["beyond"]


def study() -> str:
    summary = _result(RESULTS / "study" / "summary.json")
    settings = []
    for st in summary or []:

        def cell(d, m, ref):
            x = d.get(f"vs_{ref}", {}).get("response_nll_nats")
            return None if not x or ref == m else {"d": x, "sep": _separable(x)}

        settings.append(
            {
                **st,
                "label": "accuracy" if st["quality"] == "accuracy" else "ROUGE-L",
                "fmt": ".1%" if st["quality"] == "accuracy" else ".4f",
                "rows": [
                    {
                        "m": m,
                        "t": st["table"][m],
                        "cells": [cell(st["diffs"][m], m, ref) for ref in ("hpd", "fkl", st["best"])],
                    }
                    for m in st["ranking"]
                ],
            }
        )
    return render("study", summary=summary, settings=settings)


def _study_runs() -> dict:
    """(task, regime) -> method -> seed -> the student's held-out figures, from each study setting's results."""
    out = {}
    for path in sorted((RESULTS / "study").glob("*-*/results.json")):
        task, regime = path.parent.name.split("-")
        for r in _result(path):
            out.setdefault((task, regime), {}).setdefault(r["method"], {})[r["seed"]] = r["eval"]["student"]
    return out


def _paired(runs: dict, a: str, b: str, key: str = "response_nll_nats") -> tuple:
    """a minus b, seed by seed: (mean, std, seeds, seeds where a is lower)."""
    d = [runs[a][s][key] - runs[b][s][key] for s in runs[a] if s in runs[b]]
    return statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0.0, len(d), sum(x < 0 for x in d)


def _span(values, fmt="{:.2f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


REAL_PRESETS = ("smollm2", "smollm2-half", "qwen-coder")


def _preset_method(name: str) -> str:
    return _settings(name).distill.method


def _real_fkl_vs_hpd_fkl() -> list[dict]:
    """fkl minus hpd_fkl on each real comparison's primary measure, paired by seed: the evidence for the real
    presets' loss (a pair whose results lack either arm is left out)."""
    sources = [
        (
            "SmolLM2-135M-Instruct, its 6-layer student",
            RESULTS / "compare_smollm2" / "results.json",
            "response_nll_nats",
        ),
        ("SmolLM2 cut to half (pair B)", RESULTS / _pair_b_stem() / "results.json", "kl_to_teacher_nats"),
        ("Qwen2.5-Coder-1.5B into 0.5B (pair A)", RESULTS / "real_students_A" / "results.json", "kl_to_teacher_nats"),
    ]
    out = []
    for name, path, key in sources:
        by = _by_seed(_result(path) or [], key)
        if {"fkl", "hpd_fkl"} <= set(by):
            out.append({"pair": name, "measure": key, **paired_t(by["fkl"], by["hpd_fkl"])})
    return out


def study_recommendation() -> str:
    """The regime study's recommendation table and its reading, every figure from the study's results."""
    runs = _study_runs()
    summary = _result(RESULTS / "study" / "summary.json")
    if not runs or summary is None:
        return render("study-recommendation", ready=False)
    nll = "response_nll_nats"
    mean = {k: {m: statistics.mean(x[nll] for x in by.values()) for m, by in v.items()} for k, v in runs.items()}
    rank = {k: sorted(v, key=v.get) for k, v in mean.items()}
    dia = [k for k in runs if k[0] == "dialogue"]
    maths = [k for k in runs if k[0] == "math"]
    pick = load_config("dialogue").distill.method
    real = _result(RESULTS / "compare_smollm2" / "results.json")
    lead = None
    if real:
        by = _students(real)
        first = min(("fkl", pick), key=lambda m: statistics.mean(x[nll] for x in by[m].values()))
        other = "fkl" if first == pick else pick
        lead = {
            "lead": first,
            "other": other,
            "n": _paired(by, first, other),
            "steps": real[0]["student"]["student_steps"],
        }
    ml, mp = ("math", "limited"), ("math", "plenty")
    top3 = rank[dia[0]][:3]
    gaps = [_paired(runs[k], a, b) for k in dia for a in top3 for b in ("hpd", "jsd", "sft") if a in runs[k]]
    math_pairs = [(k, m) for k in maths for m in runs[k] if m != rank[k][0]]
    expect = [_paired(runs[k], "hpd_expect", "hpd") for k in runs]
    fwd = {t: [-_paired(runs[k], "hpd_fkl", "hpd")[0] for k in runs if k[0] == t] for t in ("math", "dialogue")}
    beats = [_paired(runs[k], pick, "hpd") for k in runs]
    return render(
        "study-recommendation",
        ready=True,
        seeds=max(len(by) for v in runs.values() for by in v.values()),
        dialogue_k=load_config("dialogue").score.top_k,
        dialogue_vocab=_result(RESULTS / "cache_formats.json")["vocab_size"],
        math_vocab=len(arithmetic.SPECIALS) + len(arithmetic.CHARS),
        pick=pick,
        pick_presets=[c for c in ("dialogue", *REAL_PRESETS) if _preset_method(c) == pick],
        real_presets=[c for c in REAL_PRESETS if _preset_method(c) == "fkl"],
        real_pairs=_real_fkl_vs_hpd_fkl(),
        rank=rank,
        mean=mean,
        dia=dia,
        dia_vs={o: [-_paired(runs[k], pick, o)[0] for k in dia] for o in ("hpd", "fkl", "jsd")},
        dia_pairs={"hpd": [_paired(runs[k], pick, "hpd") for k in dia]},
        dia_fkl=[(k, _paired(runs[k], pick, "fkl")) for k in dia],
        real=lead,
        ml=ml,
        mp=mp,
        ml_fkl_best=_paired(runs[ml], "fkl", rank[ml][0]),
        ml_hpdfkl=_paired(runs[ml], "hpd_fkl", "fkl"),
        mp_fkl_hpdfkl=_paired(runs[mp], "fkl", "hpd_fkl"),
        behind=lambda k, m: mean[k][m] - mean[k][rank[k][0]],
        hpd_ranks=[len(rank[k]) - rank[k].index("hpd") for k in runs],  # 1 = last
        n_settings=len(runs),
        settings=list(runs),
        hpd_behind_math=[mean[k]["hpd"] - mean[k][rank[k][0]] for k in maths],
        hpd_behind_dia=[mean[k]["hpd"] - mean[k][rank[k][0]] for k in dia],
        hpd_behind_sft_math=all(mean[k]["hpd"] > mean[k]["sft"] for k in maths),
        top3=top3,
        gaps_mean=[-g[0] for g in gaps],
        gaps_sd=[g[1] for g in gaps],
        gaps_same=sum(g[3] == g[2] for g in gaps),
        math_spread=[statistics.stdev(x[nll] for x in by.values()) for k in maths for by in runs[k].values()],
        math_acc_spread=[
            statistics.stdev(x["accuracy"] for x in by.values()) * 100 for k in maths for by in runs[k].values()
        ],
        math_pairs=len(math_pairs),
        math_nll_beyond=sum(_separable(_paired(runs[k], m, rank[k][0])) for k, m in math_pairs),
        math_acc_beyond=sum(_separable(_paired(runs[k], m, rank[k][0], "accuracy")) for k, m in math_pairs),
        expect_lower=sum(x[3] for x in expect),
        expect_n=sum(x[2] for x in expect),
        expect_gain=[-x[0] for x in expect],
        fwd=fwd,
        forward_matters=all(
            -_paired(runs[k], "hpd_expect", "hpd")[0] < -_paired(runs[k], "hpd_fkl", "hpd")[0] for k in runs
        ),
        push=[-_paired(runs[k], "hpd_fkl", "fkl")[0] for k in dia],
        gate=[_paired(runs[k], "hpd_fkl", "fkl")[0] for k in maths],
        winners={rank[k][0] for k in runs},
        beats_lower=sum(x[3] for x in beats),
        beats_n=sum(x[2] for x in beats),
        beats_sep=sum(_separable(x) for x in beats),
        top2_both=all(pick in rank[k][:2] for k in dia),
        math_default=load_config(None).distill.method,
        span=_span,
        sep=lambda x: "beyond the 95% interval" if _separable(x) else "no difference detected",
    )


def _paired_rows(rows: list[dict], a: str, b: str, key: str) -> tuple:
    """Arm a minus arm b over the seeds both have: (mean, sd, seeds, seeds where a is better)."""
    x = {r["seed"]: r[key] for r in rows if r["arm"] == a}
    y = {r["seed"]: r[key] for r in rows if r["arm"] == b}
    d = [x[s] - y[s] for s in x if s in y]
    better = sum((v > 0) if _higher_is_better(key) else (v < 0) for v in d)
    return statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0.0, len(d), better


def _higher_is_better(key: str) -> bool:
    """Whether a larger value of measure `key` is the better (accuracies, pass rates; not NLL or KL)."""
    return key.endswith("accuracy") or key.startswith("avg@") or "pass@" in key


def _vs(rows, a, b) -> str:
    acc, nll = _paired_rows(rows, a, b, "accuracy"), _paired_rows(rows, a, b, "response_nll_nats")
    return say("versus", _interval(acc), _interval(nll))


def _stuck(rows: list[dict], seeds: int) -> str:
    """Seeds whose student stayed near 0% accuracy (it never crossed the task's learning transition)."""
    n = {}
    for x in rows:
        n[x["arm"]] = n.get(x["arm"], 0) + (x["accuracy"] < 0.05)
    said = [f"{arm} {k} of {seeds}" for arm, k in n.items() if k]
    return (
        (
            " Seeds whose student stayed near 0% accuracy (it never crossed the task's learning transition "
            "in its steps, as `make distill`'s SFT seed 0 does): " + ", ".join(said) + "."
        )
        if said
        else ""
    )


def multi_teacher() -> str:
    r = _result(RESULTS / "multi_teacher.json")
    if r is None:
        return render("multi-teacher", r=None)
    route, ens = r["routing"]["rows"], r["ensemble"]["rows"]
    routed, gen, both = "add2 + add4 routed", "generalist", "ensemble of 1 and 2"

    primary = r.get("primary", "accuracy")  # files before the bench named it: its verdicts re-read on accuracy
    label = {"accuracy": "accuracy", "response_nll_nats": "held-out NLL"}[primary]

    def judged(rows, a, b, whom: str) -> str:  # beats / trails b on the primary measure beyond the 95% interval
        x = _paired_rows(rows, a, b, primary)
        return say(
            "judged",
            ("beats" if (x[0] > 0) == _higher_is_better(primary) else "trails") if _separable(x) else "",
            whom,
            label,
        )

    return render(
        "multi-teacher",
        r=r,
        method=r.get("method") or load_config(None).distill.method,
        operands={t: load_config(None, r["teachers"][f"mt-{t}"]["settings"]).data.operands for t in ("add2", "add4")},
        vs={
            "add2": _vs(route, routed, "add2 alone"),
            "add4": _vs(route, routed, "add4 alone"),
            "generalist": _vs(route, routed, gen),
            "t1": _vs(ens, both, "teacher 1 alone"),
            "t2": _vs(ens, both, "teacher 2 alone"),
        },
        judged={
            "add2": judged(route, routed, "add2 alone", "the add2-only student"),
            "add4": judged(route, routed, "add4 alone", "the add4-only student"),
            "generalist": judged(route, routed, gen, "the student of the generalist (the same teacher compute)"),
            "t1": judged(ens, both, "teacher 1 alone", "teacher 1's student"),
            "t2": judged(ens, both, "teacher 2 alone", "teacher 2's student"),
        },
        stuck=_stuck(route + ens, r["seeds"]),
    )


VALUE_METRICS = (
    ("accuracy", "accuracy", "{:.1%}"),
    ("avg@4", "avg@4", "{:.1%}"),
    ("response_nll_nats", "held-out NLL", "{:.3f}"),
    ("kl_to_teacher_nats", "KL to teacher", "{:.3f}"),
)


def _value_vs(rows: list[dict], a: str, b: str) -> str:
    """a minus b, paired by seed, on every metric (marked where the 95% interval excludes 0)."""
    items = [
        (label, _interval(_paired_rows(rows, a, b, key)), _higher_is_better(key)) for key, label, _ in VALUE_METRICS
    ]
    return say("value_versus", items)


def _value_judged(rows: list[dict], a: str, b: str) -> str:
    """beats / trails b on the bench's primary measure (bench/value_guided.py PRIMARY) beyond its 95% interval, or no
    difference detected; the other measures are in the lines above the verdict, not in it."""
    from bench.value_guided import PRIMARY

    label = next(label for key, label, _ in VALUE_METRICS if key == PRIMARY)
    x = _paired_rows(rows, a, b, PRIMARY)
    verb = ("beats" if (x[0] > 0) == _higher_is_better(PRIMARY) else "trails") if _separable(x) else ""
    return say("judged", verb, b, label)


def _drift(rows: list[dict], arms: list[str], reference: str) -> str:
    """The arms whose avg@4 rose and whose KL to the teacher rose with it, both beyond their 95% intervals."""
    moved = [
        a
        for a in arms
        if _separable(x := _paired_rows(rows, a, reference, "avg@4"))
        and x[0] > 0
        and _separable(y := _paired_rows(rows, a, reference, "kl_to_teacher_nats"))
        and y[0] > 0
    ]
    return say("drift", moved)


def value_guided() -> str:
    r = _result(RESULTS / "value_guided.json")
    if r is None or "seqkd" not in r or "refresh" not in r:
        return render("value-guided", r=None)
    seqkd, rnd = r["seqkd"], r["refresh"]
    settings = r["settings"]
    seqkd_cfg = load_config(None, settings["common"] + settings["seqkd"])
    round_cfg = load_config(None, settings["common"] + settings["round"])

    def trained_on(part, what) -> dict:
        cells = {}
        for arm in part["summary"]:
            rows = [row["samples"] for row in part["rows"] if row["arm"] == arm]
            kept = sorted({x["kept"] for x in rows})
            if not rows[0]["judged"] or arm == "offline":  # (a round without samples)
                cells[arm] = "offline sequences only"
            else:
                span = f"{kept[0]:,}" if len(kept) == 1 else f"{kept[0]:,}-{kept[-1]:,}"
                cells[arm] = f"{span} of {rows[0]['judged']:,} {what}"
        return cells

    seqkd_arms = [a for a in seqkd["summary"] if a != "plain"]
    return render(
        "value-guided",
        r=r,
        seqkd=seqkd,
        rnd=rnd,
        seqkd_cfg=seqkd_cfg,
        round_cfg=round_cfg,
        per_prompt=seqkd_cfg.generate.samples_per_prompt,
        sampled=seqkd["teacher_samples"],
        teacher=seqkd["teacher_samples"].get("teacher", {}),
        metrics=[(k, label, fmt[2:-1]) for k, label, fmt in VALUE_METRICS],
        seqkd_cells=trained_on(seqkd, "samples"),
        round_cells=trained_on(rnd, "student samples"),
        seqkd_arms=seqkd_arms,
        round_arms=[a for a in rnd["summary"] if a.startswith("refresh +")],
        value_vs=_value_vs,
        value_judged=_value_judged,
        drift=_drift(seqkd["rows"], seqkd_arms, "plain"),
        stuck=_stuck(seqkd["rows"] + rnd["rows"], r["seeds"]),
    )


def response_head() -> str:
    r = _result(RESULTS / "response_head.json")
    if r is None:
        return render("response-head", r=None)
    return render("response-head", r=r, m=r["median_step_seconds"], rel=r["relative_to_full"])


def gpu_check() -> str:
    r = _complete(_result(RESULTS / "gpu_check.json"))
    if r is None:
        return render("gpu-check", r=None)
    d, side = r["distill_bf16"], r["teacher_side"]
    online_extra_us = 1e6 / d["online"]["tokens_per_s"]["median"] - 1e6 / d["cached"]["tokens_per_s"]["median"]
    return render(
        "gpu-check",
        r=r,
        d=d,
        side=side,
        before=_result(RESULTS / "gpu_check_loss_chunk_4m.json"),
        online_extra_us=online_extra_us,
        breakeven=(1e6 / side["scored_tokens_per_s"]["median"]) / online_extra_us,
        cpu_chunk=LOSS_CHUNK_ELEMENTS,
        gpu_chunk=GPU_CHUNK_ELEMENTS,
        k=lambda x: f"{x['median'] / 1e3:.1f}k ({x['min'] / 1e3:.1f}-{x['max'] / 1e3:.1f}k)",
    )


def _best_within(r: dict, budget: float, method: str = "fkl") -> tuple[str, dict]:
    """The arm with the best `method` cosine at no more bytes per token than `budget`."""
    within = {a: x for a, x in r["arms"].items() if x["bytes_per_token"] <= budget + 1e-9}
    arm = max(within, key=lambda a: within[a][method]["cosine_mean"])
    return arm, within[arm]


def _budgets(r: dict) -> list[tuple]:
    """For each top-k arm's bytes/token and each of fkl, hpd: (the top-k arm, its figures, the method, the best
    sampled arm within that budget, its figures, whether it beats the top-k's cosine)."""
    out = []
    sampled = {"arms": {a: x for a, x in r["arms"].items() if "sampled" in x["encoding"] and "iid" not in a}}
    for ref in ("top-16 compact", "top-64 compact"):
        own = r["arms"][ref]
        for method in ("fkl", "hpd"):
            arm, x = _best_within(sampled, own["bytes_per_token"], method)
            out.append((ref, own, method, arm, x, x[method]["cosine_mean"] > own[method]["cosine_mean"]))
    return out


def sampled_targets() -> str:
    r = _result(RESULTS / "sampled_targets.json")
    if r is None or "tokens" not in r:
        return render("sampled-targets", r=None)
    real = _result(RESULTS / "sampled_targets_smollm2_fresh.json")
    real = real if real is not None and "tokens" in real else None
    sampled_only = {"arms": {a: x for a, x in r["arms"].items() if "sampled" in x["encoding"]}}
    verdicts = []
    for ref in ("top-16 idsort-q8", "top-16 compact"):
        budget = r["arms"][ref]["bytes_per_token"]
        arm, best = _best_within(sampled_only, budget)
        verdicts.append({"encoding": r["arms"][ref]["encoding"], "budget": budget, "arm": arm, "best": best})
    students = ""
    for name, what in (
        ("sampled_students.json", "the dialogue teacher"),
        ("sampled_students_smollm2.json", "the real teacher, the preset's layer-kept student"),
    ):
        st = _result(RESULTS / name)
        if st is not None:
            students += _students_table(st, what)
    return render(
        "sampled-targets",
        r=r,
        real=real,
        verdicts=verdicts,
        iid=r["arms"].get("sampled-counts 16 (iid draws)"),
        budgets=[
            (name, _budgets(res)) for name, res in (("dialogue teacher", r), ("real teacher (SmolLM2)", real)) if res
        ],
        students=students,
    )


def _students_table(st: dict, what: str) -> str:
    """A students-from-caches results file as a table: each arm minus top-16, paired by seed with its 95% interval,
    and the verdict on the bench's primary measure (KL to the teacher where the file predates naming one)."""
    diffs = {}
    for arm, m in st["summary"].items():
        for k in ("response_nll_nats", "kl_to_teacher_nats"):
            d = m[k]["minus_reference"]  # measure.paired_summary's: mean, sd, seeds, seeds better
            diffs.setdefault(arm, {})[k] = _interval((d["mean"], d["sd"], d["seeds"], d["better"]))
    return render("students-table", st=st, what=what, diffs=diffs, primary=st.get("primary", "kl_to_teacher_nats"))


def versions() -> str:
    r = _result(RESULTS / "versions.json")
    return render("versions", r=r, minutes=lambda seconds: f"{int(seconds // 60)} min {int(seconds % 60)} s")


def _best_loss(s: dict) -> str | None:
    """The best distilled student of a pair's summary by its primary measure; a tie (pass@1 over 40 problems moves
    in steps of 2.5%) goes to the lower KL to the teacher, then the lower held-out NLL."""
    sign = -1 if s["primary"] == "humaneval_pass@1" else 1
    losses = [k for k in s["methods"] if k != "sft"]

    def rank(k: str) -> tuple:
        m = s["methods"][k]
        later = (m[x]["mean"] for x in ("kl_to_teacher_nats", "response_nll_nats") if x in m)
        return (sign * m[s["primary"]]["mean"], *later)

    return min(losses, key=rank) if losses else None


def _pair_targets(pair: str, s: dict) -> dict | None:
    """The code pairs' targets, each read from the results: for pair X the best distilled student (by the primary
    measure) against SeqKD; for pair A the gap it closes and what it forgets."""
    methods, paired = s["methods"], s.get("humaneval_paired", {})
    if not any(k != "sft" for k in methods):  # only SeqKD finished so far
        return None
    best = _best_loss(s)
    m, before, teacher = methods[best], s.get("initial") or {}, s.get("teacher") or {}
    t = {"best": best, "nll": m["response_nll_nats"].get("minus_sft"), "he": paired.get(f"{best} vs sft")}
    if "humaneval_pass@1" in m and "humaneval_pass@1" in methods.get("sft", {}):  # both at 0%: "not worse" says little
        t["he_none_pass"] = m["humaneval_pass@1"]["mean"] == methods["sft"]["humaneval_pass@1"]["mean"] == 0
    if pair == "X" and "teacher_target_share" in m:
        t["share"] = m["teacher_target_share"]
    if pair == "A" and "humaneval_pass@1" in before and "humaneval_pass@1" in teacher:
        gap = teacher["humaneval_pass@1"] - before["humaneval_pass@1"]
        if gap > 0:
            t["closed"] = (m["humaneval_pass@1"]["mean"] - before["humaneval_pass@1"]) / gap
        else:  # the teacher no better than the student before on these problems: there is no gap to close
            t["no_gap"] = {"teacher": teacher["humaneval_pass@1"], "before": before["humaneval_pass@1"]}
    if pair == "A" and "retention_nll_nats" in before and "retention_nll_nats" in m:
        t["lost"] = m["retention_nll_nats"]["mean"] - before["retention_nll_nats"]
    return t


REAL_MEASURES = {
    "kl_to_teacher_nats": ("KL to teacher", ".3f"),
    "response_nll_nats": ("NLL on teacher replies", ".3f"),
    "accuracy": ("arithmetic accuracy", ".1%"),
    "rouge_l": ("ROUGE-L", ".3f"),
    "humaneval_pass@1": ("HumanEval pass@1", ".1%"),
    "retention_nll_nats": ("retention NLL", ".3f"),
}


def _curve_table(methods: dict) -> dict | None:
    """The learning curves of a pair's summary as one table: each method's held-out measure at each student step,
    the mean over its seeds (None for a summary written before curves were kept)."""
    if not all("curves" in m for m in methods.values()):
        return None
    rows: dict[int, dict[str, list[float]]] = {}
    for name, m in methods.items():
        for c in m["curves"].values():
            for step, value in c["points"]:
                rows.setdefault(step, {}).setdefault(name, []).append(value)
    measure = next(c["measure"] for m in methods.values() for c in m["curves"].values())
    return {
        "measure": measure,
        "steps": {s: {k: statistics.mean(v) for k, v in row.items()} for s, row in sorted(rows.items())},
        "minutes": {k: m["train_seconds"] / 60 for k, m in methods.items()},
    }


def real_students() -> str:
    """Students from real teachers (bench/real_students.py): pair B (prune then distil), pair A (Qwen2.5-Coder) and
    pair X (across tokenizers)."""
    pairs = []
    for pair, stem, title in (
        ("B", "real_students_B", "Pair B: prune then distil"),
        # the same comparison trained to the plateau the probes found (bench/real_students.py --budget plateau)
        ("B", "real_students_B_plateau", "Pair B at the plateau budget: prune then distil, trained longer"),
        ("A", "real_students_A", "Pair A: Qwen2.5-Coder-1.5B teaches 0.5B"),
        ("X", "real_students_X", "Pair X: across tokenizers, Qwen2.5-Coder-0.5B's cache teaches SmolLM2-135M"),
    ):
        r = _result(RESULTS / f"{stem}.json")
        if r is None:
            continue
        s = r["summary"]
        methods = s["methods"]
        recovery = arithmetic = None
        if pair == "B":  # the larger arithmetic set every model answered (bench/real_students.py --arithmetic)
            arithmetic = _result(RESULTS / f"{stem}_arithmetic.json")
        if pair == "B" and "kl_recovered" in next(iter(methods.values())):  # what a cut student won back
            best = min(methods, key=lambda k: methods[k]["kl_to_teacher_nats"]["mean"])
            if arithmetic and best in arithmetic["summary"]["methods"]:  # the target read on the larger set
                a = arithmetic["summary"]
                t_acc, b_acc = a["teacher"], a["methods"][best]["mean"]
            else:
                t_acc = (s.get("teacher") or {}).get("accuracy")
                b_acc = methods[best]["accuracy"]["mean"] if "accuracy" in methods[best] else None
            share = b_acc / t_acc if t_acc and b_acc is not None else None
            recovery = {"best": best, "m": methods[best], "share": share, "larger_set": bool(arithmetic)}
        primary = s["primary"]
        pairs.append(
            {
                "r": r,
                "title": title,
                "measures": [k for k in REAL_MEASURES if k in next(iter(methods.values()))],
                "seeds": max(len(m["seeds"]) for m in methods.values()),
                # read for its figures only: the code opt-in a code-judging preset's check asks for is not a run's
                "cfg": _settings(r["config"], r.get("overrides", [])),
                "sets": dict(o.split("=", 1) for o in r.get("overrides", []) if "=" in o),
                "plateau_kl": all(
                    x.get("measure", "curve_kl") == "curve_kl" for m in methods.values() for x in m["plateau"]
                ),
                "recovery": recovery,
                # how far the plateau is: the preset's method trained longer (bench/real_students.py --plateau-probe)
                "probes": (_result(RESULTS / f"{stem}_probe.json") or {}).get("probes"),
                "stem": stem,
                "arithmetic": arithmetic,
                "targets": _pair_targets(pair, s) if pair in ("A", "X") else None,
                "cached_vs_online": _pair_cached_vs_online(r["config"]) if pair == "A" else "",
                "claims": [
                    f"`{k}` {_paired_verdict(methods[k][primary]['minus_sft'])}"
                    for k in ("hpd", "hpd_fkl")
                    if k in methods and "minus_sft" in methods[k].get(primary, {})
                ],
                "curves": _curve_table(methods),
                "figure": (RESULTS / stem / "learning_curves.png").exists(),
                # the alignment's coverage, for the methods that train on the teacher's distribution (not SeqKD)
                "shares": {
                    k: m["teacher_target_share"]
                    for k, m in methods.items()
                    if "teacher_target_share" in m and k != "sft"
                },
            }
        )
    return render("real-students", pairs=pairs, names=REAL_MEASURES)


def headline() -> str:
    """The front page's table: one measured line per question a newcomer asks, each from its results file, with
    the page that has the rest."""
    r = _result(RESULTS / "real_cached_vs_online.json")
    cvo = None
    if r:
        runs = r["runs"]
        cvo = {
            arm: {
                k: statistics.median(x[k] for x in runs if x["arm"] == arm)
                for k in ("seconds_per_step", "training_memory_mb")
            }
            for arm in ("cached", "online")
        }
        cvo["runs"] = sum(x["arm"] == "cached" for x in runs)
    f = _result(RESULTS / "cache_formats_smollm2.json")
    b = _result(RESULTS / f"{_pair_b_stem()}.json")
    pruned = None
    if b:
        m = b["summary"]["methods"]
        best = min(m, key=lambda k: m[k]["kl_to_teacher_nats"]["mean"])
        steps = next(o.split("=")[1] for o in b["overrides"] if o.startswith("compare.steps="))
        pruned = {
            "best": best,
            "seeds": len(m[best]["seeds"]),
            "steps": steps,
            "recovered": m[best].get("kl_recovered", float("nan")),
        }
    return render(
        "headline",
        d=_result(RESULTS / "default_task.json"),
        cvo=cvo,
        n_layer=load_config("smollm2").distill.n_layer,
        formats=f,
        compact=f and _k64(f, COMPACT),
        pruned=pruned,
        coder=_headline_coder(_result(RESULTS / "real_students_A.json")),
        across=_headline_across(_result(RESULTS / "real_students_X.json")),
        gpu=_complete(_result(RESULTS / "gpu_check.json")),
    )


def _pair_b_stem() -> str:
    """Pair B's comparison at the budget the smollm2-half preset trains with (what a user of the preset gets); the
    main comparison where none ran at that budget."""
    steps = f"compare.steps={_settings('smollm2-half').compare.steps}"
    for stem in ("real_students_B", "real_students_B_plateau"):
        r = _result(RESULTS / f"{stem}.json", source=False)  # choosing a file is not using its figures
        if r and steps in r["overrides"]:
            return stem
    return "real_students_B"


def _complete(r: dict | None) -> dict | None:
    """A results file saved part by part (bench/gpu_check.py), where its run finished."""
    return r if r and r.get("complete") else None


def _headline_coder(a: dict | None) -> dict | None:
    """Pair A in one line: HumanEval pass@1 of the student before, after SeqKD, after the best distillation loss
    finished, and of the teacher where it was judged."""
    if not a:
        return None
    s = a["summary"]
    m = s["methods"]
    best = _best_loss(s)
    return {
        "problems": s["initial"]["humaneval_problems"],
        # every problem: judged on all afterwards (bench.real_students --humaneval-all), or by the arms' own eval
        "all": bool((a.get("humaneval_all") or {}).get("complete"))
        or _settings(a["config"], a["overrides"]).eval.humaneval_problems == 0,
        "before": s["initial"]["humaneval_pass@1"],
        "sft": m["sft"]["humaneval_pass@1"]["mean"] if "sft" in m else None,
        "best": best,
        "best_pass": best and m[best]["humaneval_pass@1"]["mean"],
        "teacher": (s.get("teacher") or {}).get("humaneval_pass@1"),
    }


def _headline_across(x: dict | None) -> dict | None:
    """Pair X in one line: the distillation loss against SFT on the teacher's replies, on the primary measure."""
    if not x:
        return None
    m = x["summary"]["methods"]
    k = next((k for k in m if k != "sft"), None)
    if not k:
        return None
    d = m[k]["response_nll_nats"]["minus_sft"]
    return {"method": k, "seeds": d["seeds"], "d": d, "share": m[k].get("teacher_target_share")}


DOCUMENTS = ("README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))))


def main(check: bool = False) -> int:
    """Regenerate every `<!-- bench:NAME -->` section of the README and docs/ from the results files; with `check`,
    write nothing and return how many files would change."""
    changed = 0
    for doc in DOCUMENTS:
        path = ROOT / doc
        text = path.read_text()
        new = _regenerate(text)
        if new != text:
            changed += 1
            if check:
                print(f"{doc} is out of date: python -m bench.readme")
            else:
                path.write_text(new)
    return changed


def _regenerate(text: str) -> str:
    for name, fn in (
        ("make-distill", make_distill),
        ("default-task", default_task),
        ("real-teacher", real_teacher),
        ("cache-formats", cache_formats),
        ("hpd-gradient", hpd_gradient),
        ("refresh-rounds", refresh_rounds),
        ("compare", compare),
        ("cached-vs-online", cached_vs_online),
        ("reliability", reliability),
        ("study", study),
        ("study-recommendation", study_recommendation),
        ("multi-teacher", multi_teacher),
        ("value-guided", value_guided),
        ("response-head", response_head),
        ("gpu-check", gpu_check),
        ("sampled-targets", sampled_targets),
        ("versions", versions),
        ("performance", performance),
        ("real-students", real_students),
        ("headline", headline),
        ("history", history),
    ):
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if begin in text:
            text = re.sub(
                re.escape(begin) + ".*?" + re.escape(end), lambda m: f"{begin}\n{_sourced(fn)}{end}", text, flags=re.S
            )
    return text


def _sourced(section) -> str:
    """A section followed by where its figures come from: each results file it read, the commit and date its bench
    stamped in it, and the make target that measures it again."""
    _SOURCES.clear()
    body = section()
    files = sorted(p for p in _SOURCES if p.suffix == ".json")
    if not files:
        return body
    groups: dict = {}
    for path in files:
        r = _SOURCES[path]
        made = (r.get("made") if isinstance(r, dict) else None) or _rows_made(r) or _beside_made(path)
        name = path.relative_to(RESULTS).as_posix()
        key = (_target(name), made.get("commit"), made.get("date"))
        groups.setdefault(key, []).append(name)
    groups = [{"target": t, "commit": c, "date": d, "files": f} for (t, c, d), f in groups.items()]
    return body + ("" if body.endswith("\n\n") else "\n") + render("sources", groups=groups)


def _rows_made(r) -> dict:
    """The stamp of a file keyed by row (the cached-vs-online timing's {label: row}): its rows', where they agree."""
    if not isinstance(r, dict) or not r or not all(isinstance(v, dict) for v in r.values()):
        return {}
    stamps = [v.get("made") or {} for v in r.values()]
    return stamps[0] if all(m == stamps[0] for m in stamps) else {}


def _beside_made(path: Path) -> dict:
    """The stamp of a comparison's report (<name>/results.json, a list of arms, written by `hpd compare`), where the
    bench that ran it wrote its own results beside the folder (<name>.json) in the same command."""
    beside = path.parent.with_suffix(".json")
    if path.name != "results.json" or not beside.is_file():
        return {}
    r = json.loads(beside.read_text())
    return (r.get("made") or {}) if isinstance(r, dict) else {}


def _target(name: str) -> str | None:
    """The make target whose benches write results file `name` (relative to bench/results/); None: none does."""
    for prefix, target in (
        ("real_students", "make bench-real"),
        ("soak", "make soak"),
        ("compare_", "make compare"),
        ("study", "make study"),
        ("default_2048", None),
        ("gpu_check", "bench/gpu_check.sh"),
    ):
        if name.startswith(prefix):
            return target
    return "make bench"


if __name__ == "__main__":
    import sys

    raise SystemExit(1 if main(check="--check" in sys.argv) and "--check" in sys.argv else 0)
