"""The stage graph, in run order. Each stage is a module in stages/ with run() and published().

The offline pipeline is data -> teacher -> generate -> score -> distill. With [rounds] count = R > 0, each
round r = 1..R appends an on-policy refresh: refresh-r (the previous student samples responses for a few
prompts), rescore-r (the teacher scores them into a cache of their own, with the score stage) and
distill-r (the previous student trains on a mixture of the offline cache and the refreshed one).
With rounds.refresh_share = 0 a round is plain offline training, the baseline refresh is measured against.
With distill.baseline set (default "sft"), the stage "baseline" trains a second student the same way (same
sequences, seed, shape and total steps) with that method, so eval can show what the teacher's distribution
adds over plain SFT. Last, eval judges the final student (and the baseline and the teacher). With
distill.teacher_source = "online" there is no score stage.
"""
from dataclasses import replace

from .errors import HpdError
from .stage import Stage

OFFLINE = [
    Stage("data", "stages.data", "data", (), "built-in task data (JSONL train / held-out)"),
    Stage("teacher", "stages.teacher", "teacher", ("data",), "the teacher model: a local HF dir or the built-in one"),
    Stage("generate", "stages.generate", "generate", ("data", "teacher"), "prompts -> token sequences"),
    Stage("score", "stages.score", "score", ("teacher", "generate"), "teacher top-k logits -> Arrow cache"),
    Stage("distill", "stages.distill", "distill", ("data", "teacher", "generate", "score"),
          "a student trained from the cache"),
]

def student_round(stage: str) -> int | None:
    """The round a student-training stage trains ("distill" 0, "distill-2" 2); None for any other stage."""
    name, _, r = stage.partition("-")
    return None if name != "distill" or (r and not r.isdigit()) else int(r or 0)


def student_stages(names) -> list[str]:
    """The student-training stages among `names`, in round order."""
    return sorted((n for n in names if student_round(n) is not None), key=student_round)


def build(cfg: dict) -> list[Stage]:
    rounds = cfg["rounds"]
    from stages.losses import METHODS, ON_POLICY_ONLY  # checked here so that a typo fails before hours of teacher work

    for section, key in (("distill", "method"), ("rounds", "method"), ("rounds", "offline_method")):
        allowed = (*METHODS, "") if key == "offline_method" else METHODS  # "": distill.method
        if cfg[section][key] not in allowed:
            raise HpdError(f"{section}.{key}={cfg[section][key]!r} is unknown; choose one of {', '.join(METHODS)}")
    stages, previous = list(OFFLINE), "distill"
    if cfg["distill"]["teacher_source"] not in ("cache", "online"):
        raise HpdError(f"distill.teacher_source={cfg['distill']['teacher_source']!r} is unknown; choose cache "
                       f"(train from the teacher cache) or online (the teacher in memory, the baseline)")
    if cfg["data"]["builtin"] == "chat" and not cfg["teacher"]["path"]:
        raise HpdError("data.builtin=\"chat\" is prompts for a given instruct teacher; set teacher.path to its "
                       "directory or GGUF file (or use --config smollm2)")
    if cfg["distill"]["student_init"] not in ("gpt2", "teacher-layers", "teacher-shape"):
        raise HpdError(f"distill.student_init={cfg['distill']['student_init']!r} is unknown; choose gpt2 (a fresh "
                       f"GPT-2), teacher-layers (the teacher with distill.n_layer of its layers kept) or "
                       f"teacher-shape (a fresh model of the teacher's architecture, n_layer x n_embd)")
    if cfg["distill"]["student_init"] == "teacher-shape":
        from stages.modeling import check_heads

        check_heads(cfg["distill"]["n_embd"], cfg["distill"]["n_head"])
    if cfg["distill"]["teacher_source"] == "online":  # the teacher runs inside distill: no cache to build
        if rounds["count"]:
            raise HpdError("refresh rounds train from teacher caches; use distill.teacher_source=\"cache\" "
                           "with rounds.count > 0")
        stages = [s for s in stages if s.name != "score"]
        stages[-1] = replace(stages[-1], inputs=("data", "teacher", "generate"),
                             doc="a student trained with the teacher online")
    baseline = cfg["distill"]["baseline"]
    if baseline not in ("", *METHODS) or baseline in ON_POLICY_ONLY:
        raise HpdError(f"distill.baseline={baseline!r} is unknown; choose an offline method "
                       f"({', '.join(m for m in METHODS if m not in ON_POLICY_ONLY)}), or \"\" for none")
    stages[-1] = replace(stages[-1], unkeyed=("distill.baseline",))  # adding a baseline leaves the student be
    for r in range(1, rounds["count"] + 1):
        inputs, roles = ["data", "teacher", "generate", "score", previous], {previous: "student"}
        if rounds["refresh_share"] > 0:
            stages += [
                Stage(f"refresh-{r}", "stages.refresh", "refresh", ("generate", previous), "student samples",
                      roles={previous: "student"}, params={"round": r}),
                Stage(f"rescore-{r}", "stages.score", "score", ("teacher", f"refresh-{r}"),
                      "teacher top-k of the student samples -> a cache of their own",
                      roles={f"refresh-{r}": "generate"}),
            ]
            inputs += [f"refresh-{r}", f"rescore-{r}"]
            roles.update({f"refresh-{r}": "refresh", f"rescore-{r}": "refresh_score"})
        stages.append(Stage(f"distill-{r}", "stages.distill", "distill", tuple(inputs),
                            f"round {r}: the student trained on offline + refreshed data", roles=roles,
                            extra_sections=("rounds",), params={"round": r}, unkeyed=("rounds.count",)))
        previous = f"distill-{r}"
    judged = (previous,)
    if baseline:
        # SFT reads no teacher signal, so a rescored cache does not retrain it; other baselines read the
        # distill stage's inputs. Equal steps: round 0's plus every refresh round's.
        inputs = next(s for s in stages if s.name == "distill").inputs
        stages.append(Stage("baseline", "stages.distill", "distill",
                            tuple(i for i in inputs if i != "score") if baseline == "sft" else inputs,
                            f"a {baseline} student for comparison, same data, seed and steps",
                            params={"method": baseline,
                                    "steps": cfg["distill"]["steps"] + rounds["count"] * rounds["steps"]},
                            unkeyed=("distill.method", "distill.steps", "distill.baseline")))
        judged += ("baseline",)
    stages.append(Stage("eval", "stages.evaluate", "eval", ("data", "teacher", *judged),
                        "the final student (the baseline and the teacher) on held-out data",
                        roles={previous: "student"}))
    return stages
