"""The stage graph, in run order. Each stage is a module in stages/ with run() and published().

The offline pipeline is data -> teacher -> generate -> score -> distill. With [rounds] count = R > 0, each
round r = 1..R appends an on-policy refresh: refresh-r (the previous student samples responses for a few
prompts), rescore-r (the teacher scores them into a cache of their own, with the score stage) and
distill-r (the previous student trains on a mixture of the offline cache and the refreshed one).
With rounds.refresh_share = 0 a round is plain offline training, the baseline refresh is measured against.
With distill.baseline set (default "sft"), the stage "baseline" trains a second student the same way (same
sequences, seed, shape and total steps) with that method, so eval can show what the teacher's distribution
adds over plain SFT. With value.function set (value-guided distillation), a judge stage gives the offline
sequences (judge) or each round's samples (judge-r) a value each, which the distill stages read. Last, eval
judges the final student (and the baseline and the teacher). With distill.teacher_source = "online" there is no
score stage.

Every student stage gets a typed plan (stages/sources.py `StudentPlan`): its sources by the names of the
stages that made them, with their caches, losses, shares and values, and its schedule. Its inputs are what the
plan names; its `params` (round, the other teachers' weights, the baseline's method and steps) are what the
stage's fingerprint keeps of the plan besides its config sections.
"""

from dataclasses import replace

from hpd.common.settings import Settings
from hpd.stages import data, distill, evaluate, generate, judge, refresh, score, teacher
from hpd.stages.sources import SourcePlan, StudentPlan

from .config import linked_runs, value_targets
from .stage import Stage

OFFLINE = [
    Stage("data", data.STAGE, "data", (), "built-in task data (JSONL train / held-out)"),
    Stage("teacher", teacher.STAGE, "teacher", ("data",), "the teacher model: a local HF dir or the built-in one"),
    Stage("generate", generate.STAGE, "generate", ("data", "teacher"), "prompts -> token sequences"),
    Stage("score", score.STAGE, "score", ("teacher", "generate"), "teacher top-k logits -> Arrow cache"),
]


def _shares(cfg: Settings) -> list[tuple[str, float]]:
    """This run's teacher and the linked runs' ("offline" for this run's own), with their weights summing to 1."""
    weights = [("offline", cfg.teachers.weight), *linked_runs(cfg)]
    total = sum(w for _, w in weights)
    return [(name, w / total) for name, w in weights]


def _first_plan(cfg: Settings, judged: set[str]) -> StudentPlan:
    """Round 0: this run's sequences and cache; with [teachers] runs also theirs (route: each its own source,
    planned by weight) or their caches of this run's sequences (ensemble: one mixed source)."""
    d, online = cfg.distill, cfg.distill.teacher_source == "online"
    values = "judge" if "generate" in judged else ""
    own = SourcePlan("offline", "generate", () if online else ("score",), method=d.method, values=values)
    shares = _shares(cfg) if linked_runs(cfg) else []
    schedule = {"steps": d.steps, "learning_rate": d.learning_rate, "warmup_steps": d.warmup_steps}
    if not shares:
        return StudentPlan((own,), **schedule, online=online)
    if cfg.teachers.mode == "ensemble":
        mixed = replace(
            own,
            caches=("score", *(f"score@{n}" for n, _ in shares[1:])),
            weights=tuple(w for _, w in shares),
            linked=tuple(n for n, _ in shares[1:]) if d.student_path else (),  # their tokenizers may differ
        )
        return StudentPlan((mixed,), **schedule, weighting=cfg.teachers.weighting)
    sources = [
        replace(own, share=w)
        if name == "offline"
        else SourcePlan(name, f"generate@{name}", (f"score@{name}",), method=d.method, share=w)
        for name, w in shares
        if w > 0
    ]
    return StudentPlan(tuple(sources), **schedule, planned=True)


def _round_plan(cfg: Settings, r: int, previous: str, judged: set[str]) -> StudentPlan:
    """Round r: the offline sequences and the round's refreshed samples, mixed by rounds.refresh_share; an
    ensemble's sources each with every teacher's mixture, routed teachers' with this run's own teacher."""
    rounds = cfg.rounds
    ensemble = linked_runs(cfg) and cfg.teachers.mode == "ensemble"
    others = [n for n, _ in _shares(cfg)[1:]] if ensemble else []
    weights = tuple(w for _, w in _shares(cfg)) if ensemble else ()
    sources = [
        SourcePlan(
            "offline",
            "generate",
            ("score", *(f"score@{n}" for n in others)),
            weights,
            rounds.offline_method or cfg.distill.method,
            1 - rounds.refresh_share,
            "judge" if "generate" in judged else "",
        )
    ]
    if rounds.refresh_share > 0:
        sources.append(
            SourcePlan(
                "refresh",
                f"refresh-{r}",
                (f"rescore-{r}", *(f"rescore-{r}-{n}" for n in others)),
                weights,
                rounds.method,
                rounds.refresh_share,
                f"judge-{r}" if "refresh" in judged else "",
            )
        )
    return StudentPlan(
        tuple(sources),
        rounds.steps,
        rounds.learning_rate,
        rounds.warmup_steps,
        planned=True,
        previous=previous,
        weighting=cfg.teachers.weighting,
    )


def _student(
    name: str,
    plan: StudentPlan,
    doc: str,
    round_: int | None,
    extra: tuple[str, ...],
    params: dict,
    unkeyed: tuple[str, ...],
) -> Stage:
    return Stage(
        name,
        distill.STAGE,
        "distill",
        ("data", "teacher", *plan.inputs()),
        doc,
        round=round_,
        extra_sections=extra,
        params=params,
        unkeyed=unkeyed,
        plan=plan,
    )


def build(cfg: Settings) -> list[Stage]:
    """The stages `cfg` asks for, in run order (cfg has passed config.validate, which checks every setting)."""
    rounds = cfg.rounds
    stages = [s for s in OFFLINE if not (s.name == "score" and cfg.distill.teacher_source == "online")]
    judged = value_targets(cfg) if cfg.value.function else set()
    needs_cache = cfg.value.function == "teacher"  # the teacher's value is read from its cache
    if "generate" in judged:
        stages.append(
            _judge("judge", ("generate", "score") if needs_cache else ("generate",), 0, "the offline sequences' values")
        )
    others = linked_runs(cfg)
    linked = {"linked": [[r, w] for r, w in others]} if others else {}  # the other teachers, as fingerprinted
    first = _first_plan(cfg, judged)
    extra = (*(("value",) if "generate" in judged else ()), *(("teachers",) if others else ()))
    online = cfg.distill.teacher_source == "online"
    stages.append(
        _student(
            "distill",
            first,
            "a student trained with the teacher online" if online else "a student trained from the cache",
            0,
            extra,
            linked,
            ("distill.baseline",),
        )
    )
    # An ensemble's rounds mix every teacher's targets: each round's refreshed samples are rescored by every
    # teacher, and the offline sequences keep their mixture. Routed specialists' rounds use this run's teacher.
    ensemble = others and cfg.teachers.mode == "ensemble"
    previous = "distill"
    for r in range(1, rounds.count + 1):
        if rounds.refresh_share > 0:
            stages += [
                Stage(
                    f"refresh-{r}",
                    refresh.STAGE,
                    "refresh",
                    ("generate", previous),
                    "student samples",
                    round=r,
                    roles={previous: "student"},
                    params={"round": r},
                ),
                Stage(
                    f"rescore-{r}",
                    score.STAGE,
                    "score",
                    ("teacher", f"refresh-{r}"),
                    "teacher top-k of the student samples -> a cache of their own",
                    round=r,
                    roles={f"refresh-{r}": "generate"},
                ),
            ]
            for n, _ in others if ensemble else ():
                stages.append(
                    Stage(
                        f"rescore-{r}-{n}",
                        score.STAGE,
                        "score",
                        (f"teacher@{n}", f"refresh-{r}"),
                        f"run {n}'s teacher scores the round's samples too (ensemble)",
                        round=r,
                        roles={f"teacher@{n}": "teacher", f"refresh-{r}": "generate"},
                    )
                )
            if "refresh" in judged:
                stages.append(
                    _judge(
                        f"judge-{r}",
                        (f"refresh-{r}", f"rescore-{r}") if needs_cache else (f"refresh-{r}",),
                        r,
                        f"round {r}: the student samples' values",
                    )
                )
        extra = ("rounds", *(("value",) if judged else ()), *(("teachers",) if ensemble else ()))
        stages.append(
            _student(
                f"distill-{r}",
                _round_plan(cfg, r, previous, judged),
                f"round {r}: the student trained on offline + refreshed data",
                r,
                extra,
                {"round": r, **(linked if ensemble else {})},
                ("rounds.count",),
            )
        )
        previous = f"distill-{r}"
    final = (previous,)
    baseline = cfg.distill.baseline
    if baseline:
        # The same sequences as round 0 (every teacher's, with several), with that method throughout, for round 0's
        # steps plus every refresh round's. SFT reads no teacher signal, so no cache (a rescored one retrains nothing).
        steps = cfg.distill.steps + rounds.count * rounds.steps
        plan = replace(
            first,
            steps=steps,
            sources=tuple(
                replace(s, method=baseline, **({"caches": (), "weights": ()} if baseline == "sft" else {}))
                for s in first.sources
            ),
        )
        d = next(s for s in stages if s.name == "distill")
        stages.append(
            _student(
                "baseline",
                plan,
                f"a {baseline} student for comparison, same data, seed and steps",
                None,
                d.extra_sections,
                {**d.params, "method": baseline, "steps": steps},
                ("distill.method", "distill.steps", "distill.baseline"),
            )
        )
        final += ("baseline",)
    stages.append(
        Stage(
            "eval",
            evaluate.STAGE,
            "eval",
            ("data", "teacher", *final),
            "the final student (the baseline and the teacher) on held-out data",
            roles={previous: "student"},
        )
    )
    return stages


def _judge(name: str, sequences: tuple[str, ...], round_: int, doc: str) -> Stage:
    """A judge stage on a sequence set (and, for the teacher's value, its cache): read as generate (and score)."""
    roles = dict(zip(sequences, ("generate", "score")))
    return Stage(
        name,
        judge.STAGE,
        "value",
        ("data", "teacher", *sequences),
        doc,
        round=round_,
        roles=roles,
        extra_sections=("generate",),
        unkeyed=judge.GUIDANCE_KEYS,
    )
