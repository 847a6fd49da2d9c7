"""The stages of a run and the runner that decides what is out of date.

A stage is an instance of a stage kind (hpd/stages/artifacts.py StageKind: score, distill, ...) in the graph: it
reads one config section and the artifacts of the stages it names as inputs, and returns its own artifact
(always with a "fingerprint" that downstream stages key on). The runner records a manifest per stage in the
run directory: config fingerprint, input fingerprints, code version, the artifact and the stage's seconds.
A stage whose manifest matches its current config and inputs, and whose outputs still exist, is skipped.
Stages publish their bulk outputs atomically themselves (hpd/storage/ does that) and resume from their last
published shard, so the runner only has to rerun what is not done.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpd.common import ranks
from hpd.common.errors import HpdError
from hpd.common.faults import stage_started
from hpd.common.settings import Settings
from hpd.stages.artifacts import Artifact, StageKind
from hpd.storage import atomic
from hpd.storage.fingerprint import digest


@dataclass
class Context:
    """Where a run keeps its things. Caches and models are shared by every run under the same home."""

    home: Path
    run_name: str
    seed: int
    log: Callable[[str], None] = print
    stage: str = ""  # the stage being run and its refresh round (the runner sets them): round stages share a kind
    round: int = 0
    rank: int = 0  # this process among world_size under torchrun (hpd/common/ranks.py)
    world_size: int = 1
    # Called as observer(stage, figures) with what a stage measured of its own run (seconds per phase, memory):
    # figures for benches and profiling, kept out of the artifacts so that results never depend on them.
    observers: tuple = ()
    execute_code: bool = False  # the run's opt-in to running generated or supplied code (code.execute)

    def barrier(self) -> None:
        if self.world_size > 1:
            ranks.barrier()

    def measure(self, **figures) -> None:
        for observe in self.observers:
            observe(self.stage, figures)

    @property
    def run_dir(self) -> Path:
        return self.home / "runs" / self.run_name

    @property
    def cache_root(self) -> Path:
        return self.home / "caches"

    @property
    def model_root(self) -> Path:
        return self.home / "models"

    def stage_dir(self, stage: str | None = None) -> Path:
        d = self.run_dir / (stage or self.stage)
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class Stage:
    name: str
    kind: StageKind  # what it runs: kind.run(ctx, settings, **inputs) -> kind.output
    section: str  # the one config section it reads
    inputs: tuple[str, ...] = ()
    doc: str = ""
    round: int | None = None  # its refresh round (0: the offline pipeline's); None outside the rounds
    # Round stages reuse a module on other inputs: `roles` renames an input for run() (rescore-2 reads
    # refresh-2 as its "generate"), `extra_sections` are further config sections it reads (run() gets the
    # settings with its own and these sections, the others None), `params` are this instance's constants (its
    # round, the other teachers' weights; keys of its own section override them: the baseline's method). All
    # are in its fingerprint, except the `unkeyed` keys ("section.key"), which shape the graph and not this
    # stage's work.
    roles: dict = field(default_factory=dict)
    extra_sections: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    unkeyed: tuple[str, ...] = ()
    # A student stage's typed plan (hpd/stages/sources.py StudentPlan): its sources by the names of the stages
    # that made them; its run() then receives plan= and artifacts= (every input by stage name) instead of roles.
    plan: object = None

    @property
    def trains_student(self) -> bool:
        """distill and each round's distill-r (the baseline trains a student too, outside the rounds)."""
        return self.kind.name == "distill" and self.round is not None

    def code_version(self) -> str:
        return hashlib.sha256(Path(inspect.getfile(self.kind.run)).read_bytes()).hexdigest()[:12]


# Paths inside the home are stored relative to it, so a home can be moved or copied as a whole.
_HOME = "@home/"


def _to_home(value, home: Path):
    if isinstance(value, str) and value.startswith(str(home) + os.sep):
        return _HOME + os.path.relpath(value, home)
    return value


def _from_home(value, home: Path):
    if isinstance(value, str) and value.startswith(_HOME):
        return str(home / value[len(_HOME) :])
    return value


def referenced_caches(home: Path) -> set[str]:
    """Cache directories named by any stage manifest of any run under `home`: what `hpd cache gc` keeps (storage
    knows nothing of runs; the pipeline tells it what is in use)."""
    refs = set()
    for manifest in (home / "runs").glob("*/*/manifest.json"):
        outputs = json.loads(manifest.read_text()).get("outputs", {})
        for v in outputs.values():
            if isinstance(v, str) and "/caches/" in v:  # absolute, or "@home/caches/..."
                refs.add(Path(v).name)
    return refs


def context_from_config(cfg: Settings) -> Context:
    home = Path(os.environ.get("HPD_HOME") or cfg.run.home).resolve()
    rank, world_size = ranks.world()
    ranks.init()
    return Context(
        home=home,
        run_name=cfg.run.name,
        seed=cfg.run.seed,
        rank=rank,
        world_size=world_size,
        log=print if rank == 0 else (lambda _msg: None),
        execute_code=cfg.code.execute,
    )


def linked(name: str) -> tuple[str, str] | None:
    """(stage, run) for an input of another run ("score@add4"), None for this run's own stages."""
    stage, at, run = name.partition("@")
    return (stage, run) if at else None


class Runner:
    def __init__(self, stages: list[Stage], cfg: Settings, ctx: Context, linked_runs: dict | None = None):
        """`linked_runs`: the other runs (name -> Runner, None where the run does not exist yet) whose stages this
        run's stages read as "STAGE@RUN" (several teachers, [teachers] runs)."""
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.cfg, self.ctx = cfg, ctx
        self.linked_runs = linked_runs or {}
        self._student_tokenizer_checked = False  # check_student_tokenizer reads the tokenizers once

    # -- manifests -------------------------------------------------------------------------------------
    def manifest_path(self, name: str) -> Path:
        return self.ctx.run_dir / name / "manifest.json"

    def _other(self, name: str) -> tuple[Runner | None, str]:
        """The linked run (None where it does not exist) and its stage, for an input "STAGE@RUN"."""
        stage, run = linked(name)
        return self.linked_runs.get(run), stage

    def manifest(self, name: str) -> dict | None:
        if linked(name):
            other, stage = self._other(name)
            return other.manifest(stage) if other else None
        p = self.manifest_path(name)
        if not p.exists():
            return None
        m = atomic.read_json(p)
        m["outputs"] = {k: _from_home(v, self.ctx.home) for k, v in m["outputs"].items()}
        return m

    def config_fingerprint(self, name: str) -> str:
        """What a stage's work depends on in the config: its sections' keys (less its `unkeyed` ones, and keys added
        later while at their default: settings.key's `later`), the run's seed, the stage kind's version, its params."""
        stage = self.stages[name]

        def keyed(s: str) -> dict:
            section = self.cfg.section(s)
            return {
                f.name: getattr(section, f.name)
                for f in dataclasses.fields(section)
                if f"{s}.{f.name}" not in stage.unkeyed
                and not (f.metadata["later"] and getattr(section, f.name) == f.default)
            }

        what = {"section": keyed(stage.section), "seed": self.ctx.seed, "version": stage.kind.version}
        if stage.extra_sections or stage.params:
            what["extra"] = {s: keyed(s) for s in stage.extra_sections}
            what["params"] = stage.params
        return digest(what)

    def stage_config(self, name: str) -> Settings:
        """What run() receives: the settings with only the sections the stage reads (the others None, so reading
        one fails at once rather than escaping the stage's fingerprint), its params applied where they are keys
        of its own section (the baseline's method and steps)."""
        stage = self.stages[name]
        readable = (stage.section, *stage.extra_sections)
        view = Settings(
            **{s: copy.deepcopy(self.cfg.section(s)) if s in readable else None for s in self.cfg.sections()}
        )
        own = view.section(stage.section)
        for key, value in stage.params.items():
            if hasattr(own, key):
                setattr(own, key, value)
        return view

    def student_stages(self) -> list[str]:
        """The stages that train the run's student, in round order (distill, distill-1, ...)."""
        return [n for n in self.order if self.stages[n].trains_student]

    def outputs(self, name: str) -> Artifact:
        """The artifact stage `name` (or "STAGE@RUN" of a linked run) published (its manifest must exist)."""
        if linked(name):
            other, stage = self._other(name)
            return other.outputs(stage)
        return self.stages[name].kind.output.from_manifest(self.manifest(name)["outputs"])

    def inputs(self, name: str) -> dict[str, Artifact]:
        """run()'s keyword arguments: each input stage's artifact under the name the stage knows it by."""
        stage = self.stages[name]
        return {stage.roles.get(up, up): self.outputs(up) for up in stage.inputs}

    # -- state -----------------------------------------------------------------------------------------
    def state(self, name: str) -> tuple[str, str]:
        """(state, detail) with state one of done, stale, interrupted, missing, waiting."""
        if linked(name):
            other, stage = self._other(name)
            if other is None:
                return "missing", f"no run {linked(name)[1]} under {self.ctx.home / 'runs'}"
            return other.state(stage)
        stage = self.stages[name]
        for up in stage.inputs:
            if self.state(up)[0] != "done":
                return "waiting", f"needs {up}"
        m = self.manifest(name)
        attempt = self.ctx.run_dir / name / "attempt.json"
        if attempt.exists() and atomic.read_json(attempt)["config_fingerprint"] == self.config_fingerprint(name):
            return "interrupted", "resumes from its last published shard or checkpoint"
        if m is None:
            return "missing", ""
        if m["config_fingerprint"] != self.config_fingerprint(name):
            return "stale", f"[{stage.section}] config (or the stage's VERSION) changed"
        current = {up: self.manifest(up)["outputs"]["fingerprint"] for up in stage.inputs}
        if m["inputs"] != current:
            changed = [up for up in stage.inputs if m["inputs"].get(up) != current[up]]
            return "stale", f"input changed: {', '.join(changed)}"
        if not self.outputs(name).published():
            return "stale", "published output is missing or changed on disk"
        return "done", ""

    def adopt(self, other_run: str, names: list[str]) -> None:
        """Take over another run's finished stages, when they have this run's config: their manifests point at
        outputs that stay where they are, so a family of runs (methods, seeds) shares data, teacher and cache."""
        other = Runner(list(self.stages.values()), self.cfg, replace(self.ctx, run_name=other_run))
        for name in names:
            if other.state(name)[0] != "done":  # judged against this run's config
                raise HpdError(f"run {other_run}'s stage {name} is not done with this config; run it first")
            self.manifest_path(name).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(self.manifest_path(name), other.manifest_path(name).read_bytes())

    # -- running ---------------------------------------------------------------------------------------
    def run_stage(self, name: str, force: bool = False) -> dict:
        stage = self.stages[name]
        for up in stage.inputs:
            st, detail = self.state(up)
            if st != "done":
                raise HpdError(
                    f"stage {name} needs {up}, which is {st}{f' ({detail})' if detail else ''}; "
                    f"run `hpd run {up}` first, or `hpd run` for everything"
                )
        if not force and self.state(name)[0] == "done":
            self.ctx.log(f"[{name}] up to date")
            return self.manifest(name)
        if name not in ("data", "teacher"):
            self.check_linked_tokenizers()  # before this run's teacher passes (generate, score) and any student
            self.check_student_tokenizer()
        section = self.stage_config(name)
        attempt = self.ctx.stage_dir(name) / "attempt.json"
        main = self.ctx.rank == 0
        if main:
            atomic.write_json(attempt, {"started": time.time(), "config_fingerprint": self.config_fingerprint(name)})
        self.ctx.log(f"[{name}] running")
        stage_started(name)
        t0 = time.time()
        # Under torchrun the stages that split their work run on every rank, the others on rank 0 alone;
        # rank 0 writes the manifest, and no rank goes on before it is written.
        if main or stage.kind.distributed:
            ctx = replace(self.ctx, stage=name, round=stage.round or 0)
            if stage.plan is not None:
                output = stage.kind.run(ctx, section, stage.plan, {up: self.outputs(up) for up in stage.inputs})
            else:
                output = stage.kind.run(ctx, section, **self.inputs(name))
        seconds = time.time() - t0
        if not main:
            self.ctx.barrier()
            return self.manifest(name)
        manifest = {
            "stage": name,
            "kind": stage.kind.name,
            "round": stage.round,
            "run": self.ctx.run_name,
            "config": {s: dataclasses.asdict(section.section(s)) for s in (stage.section, *stage.extra_sections)},
            "seed": self.ctx.seed,
            "config_fingerprint": self.config_fingerprint(name),
            "inputs": {up: self.outputs(up).fingerprint for up in stage.inputs},
            "code_version": stage.code_version(),
            "outputs": {k: _to_home(v, self.ctx.home) for k, v in output.to_manifest().items()},
            "finished_at": time.time(),
            "seconds": round(seconds, 2),
        }
        atomic.write_json(self.manifest_path(name), manifest)
        attempt.unlink(missing_ok=True)
        self.ctx.log(f"[{name}] done in {seconds:.1f}s")
        self.ctx.barrier()
        return manifest

    def run(self, target: str | None = None, force: bool = False, until: str | None = None) -> None:
        """Run `target` alone, or every out-of-date stage in order (up to and including `until`)."""
        for name in (target, until):
            if name is not None and name not in self.stages:
                raise HpdError(f"unknown stage {name!r}; stages: {', '.join(self.order)}")
        planned = [target] if target is not None else self.order[: self.order.index(until) + 1 if until else None]
        for name in planned:  # other runs' stages cannot be built from here: say so before anything runs
            for up in self.stages[name].inputs:
                if linked(up) and self.state(up)[0] != "done":
                    stage, other = linked(up)
                    raise HpdError(
                        f"stage {name} needs {up} ({self.state(up)[1] or self.state(up)[0]}); build run "
                        f"{other} through {stage} first (hpd run --until {stage} with its config and "
                        f'run.name="{other}")'
                    )
        self.check_ensemble_sequences()
        self.check_fetched_models()
        for d in (self.ctx.run_dir, self.ctx.cache_root, self.ctx.model_root):  # fail now, not hours in
            try:
                d.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=d).close()
            except OSError as e:
                raise HpdError(
                    f"{d} is not writable ({e.strerror}); make it writable or set run.home (or "
                    f"HPD_HOME) to a directory you can write"
                ) from None
        from .config import dumps

        if self.ctx.rank == 0:
            atomic.write_bytes(self.ctx.run_dir / "config.toml", dumps(self.cfg).encode())
        if target is not None:
            self.run_stage(target, force=force)
            return
        for name in self.order[: self.order.index(until) + 1 if until else None]:
            self.run_stage(name, force=force)

    # What makes two runs' sequences the same: [generate] less the keys that only say how fast they are made.
    _SEQUENCE_KEYS = {"data": None, "generate": ("batch_size", "batch_tokens", "engine")}

    def check_ensemble_sequences(self) -> None:
        """teachers.mode = "ensemble" mixes targets that every teacher scored on this run's sequences: a linked run
        scored on others is refused before any stage (exactly, by the sequences' fingerprints, once both runs
        have generated; before that, by the settings that shape the sequences)."""
        if self.cfg.teachers.mode != "ensemble":
            return
        mine = self.state("generate")[0] == "done" and self.outputs("generate").fingerprint
        own_tok = self.state("teacher")[0] == "done" and self.outputs("teacher").tokenizer_fingerprint
        for name, other in sorted(self.linked_runs.items()):
            if other is None or other.state("generate")[0] != "done":
                continue  # (Runner.run names a run that is not built yet)
            # teachers of other tokenizers write the same texts in other tokens: compared by their settings
            same_tokens = not own_tok or other.outputs("teacher").tokenizer_fingerprint == own_tok
            if mine and same_tokens:
                if other.outputs("generate").fingerprint != mine:
                    raise HpdError(
                        f'teachers.mode="ensemble": run {name} scored other sequences than this run\'s; '
                        f"an ensemble's teachers score the same sequences (give both runs the same [data] "
                        f'and [generate]), or use teachers.mode="route"'
                    )
                continue
            sections = {**self._SEQUENCE_KEYS, **({"teacher": None} if self.cfg.generate.mode == "teacher" else {})}
            mine_cfg, theirs = self.cfg.as_dict(), other.cfg.as_dict()
            differ = [
                f"{s}.{k}"
                for s, skip in sections.items()
                for k in mine_cfg[s]
                if k not in (skip or ()) and mine_cfg[s][k] != theirs[s].get(k)
            ]
            if self.cfg.run.seed != other.cfg.run.seed:
                differ.insert(0, "run.seed")
            if differ:
                raise HpdError(
                    f'teachers.mode="ensemble": run {name} scored other sequences than this run would '
                    f"({', '.join(differ[:3])} differ); an ensemble's teachers score the same sequences: "
                    f'set them as run {name} has them, or use teachers.mode="route"'
                )

    def check_fetched_models(self) -> None:
        """`fetched:NAME` model paths name a file `hpd fetch` has assembled, where a stage still has to read it."""
        from hpd.storage import fetched

        for stage, what, path in (
            ("teacher", "teacher.path", self.cfg.teacher.path),
            ("distill", "distill.student_path", self.cfg.distill.student_path),
        ):
            if fetched.is_fetched_name(path) and stage in self.stages and self.state(stage)[0] != "done":
                try:
                    fetched.resolve(path, self.ctx.home / "fetched")
                except fetched.FetchError as e:
                    raise HpdError(f"{what}: {e}") from None

    def _bridged_ensemble(self) -> bool:
        """Several teachers that may differ in tokenizer: an ensemble into a given student, without rounds (each
        teacher's cache carried into the student's vocabulary through its own token bridge, then mixed)."""
        cfg = self.cfg
        return cfg.teachers.mode == "ensemble" and bool(cfg.distill.student_path) and not cfg.rounds.count

    def check_student_tokenizer(self) -> None:
        """A given student of another tokenizer than the teacher's trains from offline caches of one set of texts
        (token_bridge): refused with refresh rounds or routed teachers before any of this run's teacher passes and
        students."""
        cfg = self.cfg
        several = bool(cfg.teachers.runs) and not self._bridged_ensemble()
        if not cfg.distill.student_path or not (cfg.rounds.count or several) or self._student_tokenizer_checked:
            return
        if self.state("teacher")[0] != "done" or self.state("distill")[0] == "done":
            return
        from transformers import AutoTokenizer

        from hpd.stages import hf_models

        student = hf_models.local_model(cfg.distill.student_path, self.ctx.home, "distill.student_path")
        teacher = self.outputs("teacher").model_dir
        if AutoTokenizer.from_pretrained(student).get_vocab() != AutoTokenizer.from_pretrained(teacher).get_vocab():
            raise HpdError(
                "the student's tokenizer differs from the teacher's: across tokenizers a student trains from "
                'offline caches (no refresh rounds; several teachers only as teachers.mode="ensemble"); set '
                'rounds.count = 0, and teachers.runs = "" or teachers.mode = "ensemble"'
            )
        self._student_tokenizer_checked = True

    def check_linked_tokenizers(self) -> None:
        """Several teachers share one tokenizer, unless they are an ensemble into a given student (each carried into
        its vocabulary): this run's teacher against each linked run's, once this run's teacher exists."""
        others = {linked(up)[1] for s in self.stages.values() for up in s.inputs if linked(up)}
        if not others or self.state("teacher")[0] != "done" or self._bridged_ensemble():
            return
        own = self.outputs("teacher").tokenizer_fingerprint
        for run in sorted(others):
            if (
                self.linked_runs.get(run)
                and self.linked_runs[run].state("teacher")[0] == "done"
                and self.linked_runs[run].outputs("teacher").tokenizer_fingerprint != own
            ):
                raise HpdError(
                    f"teachers.runs: run {run}'s teacher uses another tokenizer than this run's; teachers of "
                    f'other tokenizers mix only as teachers.mode="ensemble" into a given student '
                    f"(distill.student_path) without rounds"
                )
