"""The stage graph, in run order. Each stage is a module in hpd/stages/ with run() and published().

The offline pipeline is data -> teacher -> generate -> score -> distill. With [rounds] count = R > 0, each
round r = 1..R appends an on-policy refresh: refresh-r (the previous student samples responses for a few
prompts), rescore-r (the teacher scores them into a cache of their own, with the score stage) and
distill-r (the previous student trains on a mixture of the offline cache and the refreshed one).
With rounds.refresh_share = 0 a round is plain offline training, the baseline refresh is measured against.
With distill.baseline set (default "sft"), the stage "baseline" trains a second student the same way (same
sequences, seed, shape and total steps) with that method, so eval can show what the teacher's distribution
adds over plain SFT. With value.function set (value-guided distillation), a judge stage gives the offline
sequences (judge) or each round's samples (judge-r) a value each, which the distill stages read. Last, eval judges the final student (and the baseline and the teacher). With
distill.teacher_source = "online" there is no score stage.
"""
from dataclasses import replace

from hpd.stages import data, distill, evaluate, generate, judge, refresh, score, teacher

from .config import linked_runs, value_targets
from .stage import Stage

OFFLINE = [
    Stage("data", data.STAGE, "data", (), "built-in task data (JSONL train / held-out)"),
    Stage("teacher", teacher.STAGE, "teacher", ("data",), "the teacher model: a local HF dir or the built-in one"),
    Stage("generate", generate.STAGE, "generate", ("data", "teacher"), "prompts -> token sequences"),
    Stage("score", score.STAGE, "score", ("teacher", "generate"), "teacher top-k logits -> Arrow cache"),
    Stage("distill", distill.STAGE, "distill", ("data", "teacher", "generate", "score"),
          "a student trained from the cache", round=0),
]


def build(cfg: dict) -> list[Stage]:
    """The stages `cfg` asks for, in run order (cfg has passed config.validate, which checks every setting)."""
    rounds = cfg["rounds"]
    stages, previous = list(OFFLINE), "distill"
    judged = value_targets(cfg) if cfg["value"]["function"] else set()
    needs_cache = cfg["value"]["function"] == "teacher"  # the teacher's value is read from its cache
    if cfg["distill"]["teacher_source"] == "online":  # the teacher runs inside distill: no cache to build
        stages = [s for s in stages if s.name != "score"]
        stages[-1] = replace(stages[-1], inputs=("data", "teacher", "generate"),
                             doc="a student trained with the teacher online")
    if "generate" in judged:
        stages.insert(-1, _judge("judge", ("generate", "score") if needs_cache else ("generate",), 0,
                                 "the offline sequences' values"))
        d = stages[-1]
        stages[-1] = replace(d, inputs=(*d.inputs, "judge"), roles={**d.roles, "judge": "values"},
                             extra_sections=(*d.extra_sections, "value"))
    baseline = cfg["distill"]["baseline"]
    stages[-1] = replace(stages[-1], unkeyed=("distill.baseline",))  # adding a baseline leaves the student be
    others = linked_runs(cfg)
    weights = [[r, w] for r, w in others]  # the other teachers' runs and weights, as the stages receive them
    if others:  # several teachers: round 0 also reads the other runs' sequences and caches ([teachers])
        d = stages[-1]
        stages[-1] = replace(d, inputs=(*d.inputs, *(f"{s}@{r}" for r, _ in others for s in ("generate", "score"))),
                             roles={**d.roles, **{f"generate@{r}": "linked_sequences[]" for r, _ in others},
                                    **{f"score@{r}": "linked_caches[]" for r, _ in others}},
                             extra_sections=(*d.extra_sections, "teachers"), params={"linked": weights})
    # An ensemble's rounds mix every teacher's targets: each round's refreshed samples are rescored by every
    # teacher, and the offline sequences keep their mixture. Routed specialists' rounds use this run's teacher.
    ensemble = others and cfg["teachers"]["mode"] == "ensemble"
    for r in range(1, rounds["count"] + 1):
        inputs, roles = ["data", "teacher", "generate", "score", previous], {previous: "student"}
        extra, params = ("rounds", *(("value",) if judged else ())), {"round": r}
        if "generate" in judged:
            inputs.append("judge")
            roles["judge"] = "values"
        if ensemble:
            inputs += [f"score@{n}" for n, _ in others]
            roles.update({f"score@{n}": "linked_caches[]" for n, _ in others})
            extra, params = (*extra, "teachers"), {"round": r, "linked": weights}
        if rounds["refresh_share"] > 0:
            stages += [
                Stage(f"refresh-{r}", refresh.STAGE, "refresh", ("generate", previous), "student samples",
                      round=r, roles={previous: "student"}, params={"round": r}),
                Stage(f"rescore-{r}", score.STAGE, "score", ("teacher", f"refresh-{r}"),
                      "teacher top-k of the student samples -> a cache of their own", round=r,
                      roles={f"refresh-{r}": "generate"}),
            ]
            inputs += [f"refresh-{r}", f"rescore-{r}"]
            roles.update({f"refresh-{r}": "refresh", f"rescore-{r}": "refresh_score"})
            for n, _ in others if ensemble else ():
                stages.append(Stage(f"rescore-{r}-{n}", score.STAGE, "score", (f"teacher@{n}", f"refresh-{r}"),
                                    f"run {n}'s teacher scores the round's samples too (ensemble)", round=r,
                                    roles={f"teacher@{n}": "teacher", f"refresh-{r}": "generate"}))
                inputs.append(f"rescore-{r}-{n}")
                roles[f"rescore-{r}-{n}"] = "refresh_linked_caches[]"
            if "refresh" in judged:
                stages.append(_judge(f"judge-{r}", (f"refresh-{r}", f"rescore-{r}") if needs_cache else
                                     (f"refresh-{r}",), r, f"round {r}: the student samples' values"))
                inputs.append(f"judge-{r}")
                roles[f"judge-{r}"] = "refresh_values"
        stages.append(Stage(f"distill-{r}", distill.STAGE, "distill", tuple(inputs),
                            f"round {r}: the student trained on offline + refreshed data", round=r, roles=roles,
                            extra_sections=extra, params=params, unkeyed=("rounds.count",)))
        previous = f"distill-{r}"
    final = (previous,)
    if baseline:
        # SFT reads no teacher signal, so a rescored cache does not retrain it; other baselines read the
        # distill stage's inputs. Equal steps: round 0's plus every refresh round's.
        d = next(s for s in stages if s.name == "distill")  # the same sequences (every teacher's, with several)
        stages.append(replace(d, name="baseline", round=None,
                              inputs=tuple(i for i in d.inputs if i.partition("@")[0] != "score") if baseline == "sft"
                              else d.inputs, doc=f"a {baseline} student for comparison, same data, seed and steps",
                              params={**d.params, "method": baseline,
                                      "steps": cfg["distill"]["steps"] + rounds["count"] * rounds["steps"]},
                              unkeyed=("distill.method", "distill.steps", "distill.baseline")))
        final += ("baseline",)
    stages.append(Stage("eval", evaluate.STAGE, "eval", ("data", "teacher", *final),
                        "the final student (the baseline and the teacher) on held-out data",
                        roles={previous: "student"}))
    return stages


def _judge(name: str, sequences: tuple[str, ...], round_: int, doc: str) -> Stage:
    """A judge stage on a sequence set (and, for the teacher's value, its cache): read as generate (and score)."""
    roles = dict(zip(sequences, ("generate", "score")))
    return Stage(name, judge.STAGE, "value", ("data", "teacher", *sequences), doc, round=round_, roles=roles,
                 extra_sections=("generate",), unkeyed=judge.GUIDANCE_KEYS)
