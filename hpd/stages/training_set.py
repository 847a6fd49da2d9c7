"""What one distill stage trains on: its sources (sequences, their teacher cache and their loss), their
mixture batch by batch, and its schedule (`RoundPlan`).

Round 0 trains on every offline sequence, shuffled by the Trainer. A refresh round r >= 1 trains on a planned
mixture, read in order: each batch holds rounds.refresh_share of the round's refreshed (student-sampled,
teacher-rescored) sequences and the rest offline ones, each source with its own loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpd.common.errors import HpdError
from hpd.storage.logit_cache import LogitCache
from hpd.storage.merge import MixedCache
from hpd.storage.sequences import SequenceStore
from hpd.storage.values import ValueStore

from .artifacts import Cache, Sequences, Student, Values
from .values import Guidance, guidance


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

    def __len__(self) -> int:
        return len(self.store) if self.guided is None else len(self.guided.rows)


def open_source(name: str, generate: Sequences, score: Cache | None, method: str, share: float,
                values: Values | None = None, value_cfg: dict | None = None) -> Source:
    store = SequenceStore(Path(generate.sequences))
    guided = None
    if values is not None:
        seq_ids, prompt_index, v = ValueStore(Path(values.values)).arrays()
        if len(seq_ids) != len(store) or not np.array_equal(seq_ids, np.arange(len(store))):
            raise HpdError(f"the values in {values.values} judge other sequences than {generate.sequences}; rerun "
                           f"the judge stage")
        guided = guidance(seq_ids, prompt_index, v, value_cfg)
        if len(guided.rows) == 0 and name != "refresh":  # (a round without refreshed samples still trains)
            raise HpdError(f"value.select=\"{value_cfg['select']}\" kept none of the {len(v)} {name} sequences "
                           f"(values {v.min():.3g} to {v.max():.3g}); lower value.threshold")
    if score is None:
        return Source(name, store, None, method, share, guided)
    cache = LogitCache(Path(score.cache)).hold()  # `hpd cache gc` must not remove it while we train
    if cache.key["data"] != store.fingerprint or cache.num_sequences != len(store):
        raise HpdError(f"cache {cache.id} was scored on other sequences than {generate.sequences}; rerun score")
    return Source(name, store, cache, method, share, guided)


@dataclass
class RoundPlan:
    """One student-training stage: the sources it reads, its schedule, and where the student's counts start."""
    sources: list[Source]
    steps: int
    learning_rate: float
    warmup_steps: int
    planned_batches: int  # per rank; 0: every offline sequence, shuffled (round 0)
    before: dict = field(default_factory=dict)  # the previous round's report: its steps and tokens go on here
    dropped: list = field(default_factory=list)  # sources value selection left empty (a round's refresh)


def plan_round(cfg: dict, generate: Sequences, score: Cache | None, refresh: Sequences | None = None,
               refresh_score: Cache | None = None, previous: Student | None = None,
               linked_sequences: list[Sequences] = (), linked_caches: list[Cache] = (),
               refresh_linked_caches: list[Cache] = (), values: Values | None = None,
               refresh_values: Values | None = None) -> RoundPlan:
    """Round 0 (no previous student): the offline sequences with distill.method, and with several teachers
    (`cfg["linked"]`: the other runs and their weights) those runs' sequences and caches too. Round r: offline
    sequences with rounds.offline_method (or distill.method) and the refreshed ones with rounds.method, mixed by
    share. `values` / `refresh_values`: the judged offline / refreshed sequences' values ([value])."""
    offline_values = {"values": values, "value_cfg": cfg.get("value")}
    if previous is None and cfg.get("linked"):
        return _several_teachers(cfg, generate, score, linked_sequences, linked_caches, offline_values)
    if previous is not None and cfg.get("linked"):  # an ensemble's round: every teacher's targets, mixed
        return _ensemble_round(cfg, generate, score, refresh, refresh_score, previous, linked_caches,
                               refresh_linked_caches, values, refresh_values)
    if previous is None:
        return RoundPlan([open_source("offline", generate, score, cfg["method"], 1.0, **offline_values)],
                         cfg["steps"], cfg["learning_rate"], cfg["warmup_steps"], 0)
    rounds = cfg["rounds"]
    sources = [open_source("offline", generate, score, rounds["offline_method"] or cfg["method"],
                           1 - rounds["refresh_share"], **offline_values)]
    if refresh is not None:
        sources.append(open_source("refresh", refresh, refresh_score, rounds["method"], rounds["refresh_share"],
                                   refresh_values, cfg.get("value")))
    return RoundPlan([s for s in sources if s.share > 0 and len(s)], rounds["steps"], rounds["learning_rate"],
                     rounds["warmup_steps"], rounds["steps"] * cfg["gradient_accumulation_steps"], previous.report,
                     [s.name for s in sources if s.share > 0 and not len(s)])


def _several_teachers(cfg: dict, generate: Sequences, score: Cache | None, linked_sequences: list[Sequences],
                      linked_caches: list[Cache], offline_values: dict) -> RoundPlan:
    """[teachers] route: one source per teacher, its own sequences and cache, each batch holding the teachers'
    shares of rows (a planned mixture, read in order). ensemble: this run's sequences with the teachers' mixture
    as targets (hpd/storage/merge.py MixedCache, mixed batch by batch)."""
    t = cfg["teachers"]
    names = ["offline", *(name for name, _ in cfg["linked"])]
    weights = [t["weight"], *(w for _, w in cfg["linked"])]
    weights = [w / sum(weights) for w in weights]  # shares of each batch (route), of the mixture (ensemble)
    steps = cfg["steps"]
    if t["mode"] == "ensemble":
        own = open_source("offline", generate, score, cfg["method"], 1.0, **offline_values)
        if own.cache is not None:  # (sft reads no teacher signal: nothing to mix)
            own.cache = _mixed(cfg, own.cache, linked_caches)
        return RoundPlan([own], steps, cfg["learning_rate"], cfg["warmup_steps"], 0)
    caches = list(linked_caches) if score is not None else [None] * len(linked_sequences)  # sft reads no cache
    sources = [open_source(n, g, c, cfg["method"], w, **(offline_values if n == "offline" else {})) for n, g, c, w in
               zip(names, [generate, *linked_sequences], [score, *caches], weights) if w > 0]
    return RoundPlan(sources, steps, cfg["learning_rate"], cfg["warmup_steps"],
                     steps * cfg["gradient_accumulation_steps"])


def _mixed(cfg: dict, own: LogitCache, others: list[Cache]) -> MixedCache:
    """The teachers' mixture of one set of sequences: this run's cache and the other teachers' caches of them."""
    weights = [cfg["teachers"]["weight"], *(w for _, w in cfg["linked"])]
    caches = [own, *(LogitCache(Path(c.cache)).hold() for c in others)]
    try:
        return MixedCache(caches, [w / sum(weights) for w in weights], k=own.k, weighting=cfg["teachers"]["weighting"])
    except ValueError as e:
        raise HpdError(f"teachers.mode=\"ensemble\": {e}") from None


def _ensemble_round(cfg, generate, score, refresh, refresh_score, previous, linked_caches, refresh_linked_caches,
                    values, refresh_values):
    """A refresh round of an ensemble: the offline sequences with the teachers' mixture, the refreshed ones
    with the mixture of every teacher's rescoring of them."""
    plan = plan_round({**cfg, "linked": None}, generate, score, refresh, refresh_score, previous,
                      values=values, refresh_values=refresh_values)
    for s in plan.sources:
        if s.cache is not None:  # (sft reads no teacher signal: nothing to mix)
            s.cache = _mixed(cfg, s.cache, linked_caches if s.name == "offline" else refresh_linked_caches)
    return plan


def mixture_plan(sizes: list[int], shares: list[float], batch: int, num_batches: int,
                 seed: int) -> list[list[tuple[int, int]]]:
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
        for s in np.argsort(-(carry - counts), kind="stable")[:batch - counts.sum()]:
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
    out = {"seq_id": [int(seq_ids[i]) for i in rows], "prompt_len": [int(plens[i]) for i in rows],
           "input_ids": [seqs[i].tolist() for i in rows], "source": [s] * len(rows)}
    if guided:
        out["weight"] = [1.0] * len(rows) if g is None or g.weight is None else g.weight[picks].tolist()
        out["advantage"] = [0.0] * len(rows) if g is None or g.advantage is None else g.advantage[picks].tolist()
    return out


def training_set(sources: list[Source], per_batch: int, num_batches: int, seed: int):
    """A `datasets.Dataset` of token rows tagged with their source. Round 0: every offline sequence (the Trainer
    shuffles it). Rounds: the mixture plan's rows in plan order (the Trainer reads it sequentially)."""
    from datasets import Dataset

    guided = any(s.guided is not None and (s.guided.weight is not None or s.guided.advantage is not None)
                 for s in sources)
    if len(sources) == 1 and sources[0].share == 1 and num_batches == 0:
        return Dataset.from_dict(_rows(sources[0], 0, guided=guided))
    plan = [p for batch in mixture_plan([len(s) for s in sources], [s.share for s in sources], per_batch,
                                        num_batches, seed) for p in batch]
    columns: dict = {}
    order = []
    for s, src in enumerate(sources):
        picks = [row for src_i, row in plan if src_i == s]
        for name, values in _rows(src, s, picks, guided).items():
            columns.setdefault(name, []).extend(values)
        order += [i for i, (src_i, _) in enumerate(plan) if src_i == s]
    ds = Dataset.from_dict(columns)
    return ds.select(np.argsort(order, kind="stable"))
