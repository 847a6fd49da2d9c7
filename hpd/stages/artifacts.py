"""What stages hand each other: one small dataclass per kind of output, and each stage's declaration.

A stage is a function `run(ctx, settings, **inputs) -> Artifact`: `settings` holds the config sections it reads
(hpd/common/settings.py; score reads `settings.score`), its keyword arguments are the artifacts of the stages it
reads (score gets `teacher: Teacher` and `generate: Sequences`, and returns a `Cache`). A student stage gets its
typed plan and every input by stage name instead: `run(ctx, settings, plan, artifacts)` (hpd/stages/distill.py).
The runner (hpd/pipeline/stage.py) writes each artifact into its stage's manifest as a flat JSON object and
rebuilds it from there for the next stage, the CLI, reports and benches. Every artifact has a `fingerprint`, which
is what downstream stages are keyed on, and says whether what it points at is still on disk (`published`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Artifact:
    fingerprint: str

    def to_manifest(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_manifest(cls, outputs: dict):
        """The artifact in a manifest; keys it no longer has (from older runs) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in outputs.items() if k in names})

    def published(self) -> bool:
        return True


@dataclass(frozen=True)
class TaskData(Artifact):
    """A built-in task's JSONL files (and its own tokenizer), or nothing when the user brings prompts."""

    builtin: str = ""
    train: str = ""
    heldout: str = ""
    tokenizer: str = ""
    train_examples: int = 0
    heldout_examples: int = 0
    retention: str = ""  # general replies a student should not forget (the code task's chat exchanges)

    def published(self) -> bool:
        return not self.builtin or all(Path(p).is_file() for p in (self.train, self.heldout))


@dataclass(frozen=True)
class Teacher(Artifact):
    """A teacher model directory, with the fingerprints caches are keyed on (`fingerprint` covers the dtype)."""

    model_dir: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    dtype: str = "float32"
    report: dict | None = None  # the built-in teacher's held-out figures

    def published(self) -> bool:
        from .hf_models import teacher_identity  # recomputed (memoised by size and mtime): weights changed in place

        return (Path(self.model_dir) / "config.json").is_file() and teacher_identity(
            self.model_dir, self.dtype
        ) == self.fingerprint


@dataclass(frozen=True)
class Sequences(Artifact):
    """A sequence store: prompt + response token ids (generate's, or a refresh round's student samples)."""

    sequences: str
    source: str
    count: int
    tokens: int
    truncated: int = 0
    origin: dict | None = None  # refreshed sequences: the round and the student that sampled them
    prompt_field: str = "prompt"  # the prompt text's field in `source` (a student of another tokenizer reads it)

    def published(self) -> bool:
        from hpd.storage.sequences import is_published

        return is_published(Path(self.sequences))


@dataclass(frozen=True)
class Cache(Artifact):
    """A teacher logit cache (`fingerprint` is its key id)."""

    cache: str
    cache_id: str
    top_k: int
    encoding: str
    sequences: int
    tokens: int
    bytes: int
    bytes_per_token: float

    def published(self) -> bool:
        return (Path(self.cache) / "manifest.json").is_file()


@dataclass(frozen=True)
class Values(Artifact):
    """A value store: one number per sequence of a sequence store, from value.function
    (hpd/stages/value_functions.py)."""

    values: str
    function: str
    count: int
    mean: float

    def published(self) -> bool:
        from hpd.storage.value_store import is_published

        return is_published(Path(self.values))


@dataclass(frozen=True)
class Student(Artifact):
    """A trained student as an HF directory, with its own held-out report and the teacher's."""

    student_dir: str
    report: dict
    seed: int
    teacher_report: dict | None = None

    def published(self) -> bool:
        return (Path(self.student_dir) / "hpd-student.json").is_file()


@dataclass(frozen=True)
class EvalReport(Artifact):
    """eval's judgement of the final student (the baseline and the teacher), also written to report_path."""

    report_path: str
    report: dict

    def published(self) -> bool:
        return Path(self.report_path).is_file()


@dataclass(frozen=True)
class StageKind:
    """What a stage module declares about itself. The graph (hpd/pipeline/graph.py) makes stages of these:
    several stages may be of one kind (score and every round's rescore; distill, each round's and the baseline)."""

    name: str
    run: Callable  # run(ctx, settings, **inputs) -> output
    output: type
    version: int = 1  # bump when the stage's results change for the same config: its finished runs go stale
    distributed: bool = False  # runs on every rank under torchrun (shards split, or the Trainer's DDP)
