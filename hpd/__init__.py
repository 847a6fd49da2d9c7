"""hpd: offline-first Hybrid Policy Distillation. The teacher runs once into a compact logit cache; any
number of students train from it.

Installed as one namespace: `hpd.common` (errors, ranks, fault points), `hpd.storage` (bytes on disk),
`hpd.stages` (one module per pipeline stage) and `hpd.pipeline` (configuration, the stage graph, runs,
the `hpd` command line), from the folders common/, storage/, hpd/stages/ and hpd/pipeline/ of the repository.
What your own code usually needs is here:

    from hpd import open_run, distill_loss, LogitCache
    run = open_run("smollm2", ["distill.method=fkl"])   # a config file or preset, and overrides
    run.run()                                           # every out-of-date stage
    cache = LogitCache(run.outputs("score").cache)      # the teacher cache it built
    loss, diagnostics = distill_loss("hpd", student_logits, labels, teacher=cache_batch)
"""

from importlib import import_module

_PUBLIC = {
    "open_run": "hpd.pipeline.runs",
    "distill_loss": "hpd.stages.losses",
    "METHODS": "hpd.stages.losses",
    "LogitCache": "hpd.storage.logit_cache",
    "CacheBatch": "hpd.storage.logit_cache",
    "HpdError": "hpd.common.errors",
}
__all__ = list(_PUBLIC)


def __getattr__(name):  # imported on first use: `import hpd.common.errors` must not load torch
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hpd' has no attribute {name!r}")
