"""What one student stage trains on: its plan (`StudentPlan`: sources named by the stages that made them, and a
schedule, built by pipeline/graph.py from the config), the sources opened from their artifacts, and their mixture
batch by batch.

Round 0 trains on every offline sequence, shuffled by the Trainer. A refresh round r >= 1 (and a student of several
routed teachers) trains on a planned mixture, read in order: each batch holds each source's share (a round:
rounds.refresh_share of its refreshed, student-sampled and teacher-rescored sequences, the rest offline ones),
each source with its own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpd.common.errors import HpdError
from hpd.storage.logit_cache import LogitCache
from hpd.storage.merge import MixedCache
from hpd.storage.sequences import SequenceStore
from hpd.storage.value_store import ValueStore

from .value_functions import Guidance, guidance


@dataclass
class Source:
    """One kind of training data: sequences, the teacher cache scored on them (None: no cache is read, the
    teacher is online or the method needs none), and the loss they get. With values ([value]), `guided` says
    which of its sequences are trained on, with what weight and value advantage."""

    name: str
    store: SequenceStore
    cache: LogitCache | None
    method: str
    share: float
    guided: Guidance | None = None
    apart: tuple = ()  # an ensemble's other caches, when their teachers' tokenizers differ (mixed after the bridge)

    def __len__(self) -> int:
        return len(self.store) if self.guided is None else len(self.guided.rows)


@dataclass(frozen=True)
class SourcePlan:
    """One kind of training data of a student stage, named by the stages that made it (pipeline/graph.py builds
    these from the config): its sequences, the caches whose targets teach it (one; several mixed by `weights`, an
    ensemble; none: the teacher online, or a method that needs none), its loss, its share of each batch, and the
    judge stage whose values guide it."""

    name: str  # "offline", "refresh", or a linked run's name
    sequences: str  # e.g. "generate", "generate@b", "refresh-1"
    caches: tuple[str, ...] = ()  # e.g. ("score",), ("score", "score@b"), ("rescore-1", "rescore-1-b")
    weights: tuple[float, ...] = ()  # the caches' mixture weights (several caches), summing to 1
    method: str = "fkl"
    share: float = 1.0
    values: str = ""  # e.g. "judge", "judge-1"; "" = no value guidance
    # an ensemble into a given student: the other teachers' runs, whose teachers and sequences a token bridge reads
    # where their tokenizers differ (each cache carried into the student's vocabulary, then mixed)
    linked: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudentPlan:
    """What one student stage trains on and how long: its sources, its schedule, the student it starts from (""
    = a new one, made by distill.student_init), and whether the teacher runs online. `planned`: the batches are
    planned from the sources' shares and read in order (refresh rounds, several teachers); otherwise every
    sequence of the one source, shuffled by the Trainer."""

    sources: tuple[SourcePlan, ...]
    steps: int
    learning_rate: float
    warmup_steps: int
    planned: bool = False
    previous: str = ""
    online: bool = False
    weighting: str = "fixed"  # a cache mixture's weighting (teachers.weighting)

    def inputs(self) -> tuple[str, ...]:
        """The stages whose artifacts it reads, each once, in the order they appear."""
        names = [self.previous] if self.previous else []
        for s in self.sources:
            names += [s.sequences, *s.caches, *([s.values] if s.values else [])]
            names += [f"{stage}@{run}" for run in s.linked for stage in ("teacher", "generate")]
        return tuple(dict.fromkeys(names))


def open_source(plan: SourcePlan, artifacts: dict, value_cfg, weighting: str = "fixed") -> Source:
    """A source of a plan, opened: its sequences, its caches (held against `hpd cache gc`; several mixed batch by
    batch), its values applied by the [value] settings."""
    generate = artifacts[plan.sequences]
    store = SequenceStore(Path(generate.sequences))
    guided = None
    if plan.values:
        values = artifacts[plan.values]
        seq_ids, prompt_index, v = ValueStore(Path(values.values)).arrays()
        if len(seq_ids) != len(store) or not np.array_equal(seq_ids, np.arange(len(store))):
            raise HpdError(
                f"the values in {values.values} judge other sequences than {generate.sequences}; rerun the judge stage"
            )
        guided = guidance(seq_ids, prompt_index, v, value_cfg)
        if len(guided.rows) == 0 and plan.name != "refresh":  # (a round without refreshed samples still trains)
            raise HpdError(
                f'value.select="{value_cfg.select}" kept none of the {len(v)} {plan.name} sequences '
                f"(values {v.min():.3g} to {v.max():.3g}); lower value.threshold"
            )
    if not plan.caches:
        return Source(plan.name, store, None, plan.method, plan.share, guided)
    caches = [LogitCache(Path(artifacts[c].cache)).hold() for c in plan.caches]  # `hpd cache gc` must not remove them
    for cache in caches[:1]:
        if cache.key["data"] != store.fingerprint or cache.num_sequences != len(store):
            raise HpdError(f"cache {cache.id} was scored on other sequences than {generate.sequences}; rerun score")
    if len({c.key["tokenizer"] for c in caches}) > 1:  # teachers of other tokenizers: mixed after the bridge
        return Source(plan.name, store, caches[0], plan.method, plan.share, guided, apart=tuple(caches[1:]))
    if len(caches) > 1:  # an ensemble: the teachers' mixture, read batch by batch
        try:
            caches = [MixedCache(caches, list(plan.weights), k=caches[0].k, weighting=weighting)]
        except ValueError as e:
            raise HpdError(f'teachers.mode="ensemble": {e}') from None
    return Source(plan.name, store, caches[0], plan.method, plan.share, guided)


def open_sources(plan: StudentPlan, artifacts: dict, value_cfg) -> tuple[list[Source], list[str]]:
    """(the sources a student trains on, the names of those value selection left empty). A source without a share
    or without sequences is not read; a round's refresh that selection emptied trains the others (said by name)."""
    opened = [open_source(s, artifacts, value_cfg, plan.weighting) for s in plan.sources]
    return [s for s in opened if s.share > 0 and len(s)], [s.name for s in opened if s.share > 0 and not len(s)]


def mixture_plan(
    sizes: list[int], shares: list[float], batch: int, num_batches: int, seed: int
) -> list[list[tuple[int, int]]]:
    """(source, row) pairs filling each batch. Every batch holds each source's share of `batch`, rounded with
    the remainder carried over, so a source's running count never drifts a whole row from its share; each
    source is read in passes (all its rows once, in a fresh random order) before any row repeats."""
    rng = np.random.default_rng(seed)
    shares = np.asarray(shares, float) / sum(shares)
    orders, pos = [np.empty(0, int)] * len(sizes), [0] * len(sizes)
    carry, plan = np.zeros(len(sizes)), []
    for _ in range(num_batches):
        carry += shares * batch
        counts = np.floor(carry).astype(int)
        for s in np.argsort(-(carry - counts), kind="stable")[: batch - counts.sum()]:
            counts[s] += 1
        carry -= counts
        rows = []
        for s, n in enumerate(counts):
            for _ in range(n):
                if pos[s] == len(orders[s]):
                    orders[s], pos[s] = rng.permutation(sizes[s]), 0
                rows.append((s, int(orders[s][pos[s]])))
                pos[s] += 1
        plan.append(rows)
    return plan


def _rows(src: Source, s: int, picks=None, guided: bool = False) -> dict:
    """Token rows of `picks` (indices into the source's trained-on sequences; None: all). With `guided`, every
    row also has its sequence's loss weight and value advantage (1 and 0 where the source has none)."""
    seq_ids, plens, seqs = src.store.range(0, len(src.store))
    picks = np.arange(len(src)) if picks is None else np.asarray(picks, int)
    g = src.guided
    rows = picks if g is None else g.rows[picks]
    out = {
        "seq_id": [int(seq_ids[i]) for i in rows],
        "prompt_len": [int(plens[i]) for i in rows],
        "input_ids": [seqs[i].tolist() for i in rows],
        "source": [s] * len(rows),
    }
    if guided:
        out["weight"] = [1.0] * len(rows) if g is None or g.weight is None else g.weight[picks].tolist()
        out["advantage"] = [0.0] * len(rows) if g is None or g.advantage is None else g.advantage[picks].tolist()
    return out


def training_set(sources: list[Source], per_batch: int, num_batches: int, seed: int):
    """A `datasets.Dataset` of token rows tagged with their source. Round 0: every offline sequence (the Trainer
    shuffles it). Rounds: the mixture plan's rows in plan order (the Trainer reads it sequentially)."""
    from datasets import Dataset

    guided = any(
        s.guided is not None and (s.guided.weight is not None or s.guided.advantage is not None) for s in sources
    )
    if len(sources) == 1 and sources[0].share == 1 and num_batches == 0:
        return Dataset.from_dict(_rows(sources[0], 0, guided=guided))
    plan = [
        p
        for batch in mixture_plan([len(s) for s in sources], [s.share for s in sources], per_batch, num_batches, seed)
        for p in batch
    ]
    columns: dict = {}
    order = []
    for s, src in enumerate(sources):
        picks = [row for src_i, row in plan if src_i == s]
        for name, values in _rows(src, s, picks, guided).items():
            columns.setdefault(name, []).extend(values)
        order += [i for i, (src_i, _) in enumerate(plan) if src_i == s]
    ds = Dataset.from_dict(columns)
    return ds.select(np.argsort(order, kind="stable"))
