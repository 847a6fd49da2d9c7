"""How every bench times and measures arms side by side on a noisy machine: a warm-up round discarded, then at least
five rounds, each round running every arm once in turn (so drift of the machine falls on all arms alike); per arm
the median and the spread (min, max) of each figure. Peak memory per call comes from the kernel's high-water mark of
this process, reset before the call (Linux), with glibc told to map large blocks so that freed memory leaves."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable

_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MB, fixed: blocks above it are mapped, and unmapped when freed


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measured(fn: Callable[[], object], prepare: Callable[[], object] | None = None) -> dict:
    """Run `fn` once: its seconds, and the peak resident memory it added over what the process held before (MB),
    after `prepare` (not measured; e.g. dropping the last step's gradients)."""
    if prepare is not None:
        prepare()
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": _status_mb("VmHWM") - before}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def rate(seconds: dict, count: float) -> dict:
    """A summary of seconds (summary above) as a rate, count per second: the median, the spread's ends, the runs."""
    return {
        "median": count / seconds["median"],
        "min": count / seconds["max"],
        "max": count / seconds["min"],
        "rounds": len(seconds["runs"]),
    }


def alternate(
    arms: dict[str, Callable[[], object]],
    rounds: int = 5,
    warmup: int = 1,
    log=print,
    prepare: Callable[[], object] | None = None,
    measure: Callable[..., dict] = measured,
) -> dict:
    """{arm: {figure: summary}}: `warmup` rounds discarded, then `rounds` rounds of every arm in turn (each call after
    `prepare`, unmeasured). `measure(fn, prepare)` gives one call's figures: by default seconds and the process's
    peak memory (measured); bench/gpu_check.py passes one that waits for the GPU and reads its allocator."""
    if rounds < 5:
        raise ValueError("at least 5 runs per arm: these machines are noisy")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    first: dict[str, list[float]] = {a: [] for a in arms}  # the warm-up's seconds: what a first call pays (compiling)
    for r in range(warmup + rounds):
        for name, fn in arms.items():
            figures = measure(fn, prepare)
            (runs[name] if r >= warmup else first[name]).append(figures)
            log(
                f"  round {r}{' (warm-up)' if r < warmup else ''} {name}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
            )
    return {
        a: {**{k: summary([x[k] for x in rs]) for k in rs[0]}, "warmup_seconds": [x["seconds"] for x in first[a]]}
        for a, rs in runs.items()
    }
