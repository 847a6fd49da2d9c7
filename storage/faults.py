"""Fault injection for the reliability tests (tests/test_faults.py, tests/soak.py).

HPD_KILL_AT=<event>:<n> makes the process SIGKILL itself right after the n-th <event> ("shard" when a shard
is published, "checkpoint" when a training checkpoint is saved): the harshest interruption there is, with no
cleanup code running, at a point the test can rely on. HPD_KILL_AT_TIME=<unix time> does the same at a
moment chosen by the clock instead (the soak draws it at random, so kills land anywhere, mid-write included).
HPD_DISK_FULL_AT=<event>:<n> makes the n-th <event> fail half-written with ENOSPC, as a full disk would.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections import Counter

_seen: Counter = Counter()
_full: Counter = Counter()


def _nth(spec: str | None, event: str, counter: Counter) -> bool:
    if not spec:
        return False
    counter[event] += 1
    name, _, count = spec.partition(":")
    return name == event and counter[event] == int(count or 1)


def arm_timer() -> None:
    """Starts the HPD_KILL_AT_TIME clock, if set (the CLI calls this first thing)."""
    deadline = os.environ.get("HPD_KILL_AT_TIME")
    if deadline:
        t = threading.Timer(max(0.0, float(deadline) - time.time()), os.kill, (os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()


def disk_full_point(event: str, path) -> None:
    if _nth(os.environ.get("HPD_DISK_FULL_AT"), event, _full):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def crash_point(event: str) -> None:
    if _nth(os.environ.get("HPD_KILL_AT"), event, _seen):
        os.kill(os.getpid(), signal.SIGKILL)
