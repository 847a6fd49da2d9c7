"""Fault injection for the reliability tests (tests/test_faults.py, tests/soak.py).

HPD_KILL_AT=<event>:<n> makes the process SIGKILL itself right after the n-th <event> ("shard" when a shard
is published, "checkpoint" when a training checkpoint is saved): the harshest interruption there is, with no
cleanup code running, at a point the test can rely on. HPD_KILL_IN=<stage>:<seconds> does the same that
many seconds after the stage starts (the soak draws the moment at random, so kills land anywhere in a
stage, mid-write and mid-step included).
HPD_DISK_FULL_AT=<event>:<n> makes the n-th <event> fail half-written with ENOSPC, as a full disk would.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter

_seen: Counter = Counter()
_full: Counter = Counter()


def _nth(spec: str | None, event: str, counter: Counter) -> bool:
    if not spec:
        return False
    counter[event] += 1
    name, _, count = spec.partition(":")
    return name == event and counter[event] == int(count or 1)


def stage_started(stage: str) -> None:
    """Starts the HPD_KILL_IN clock when its stage begins (the runner calls this for every stage)."""
    name, _, seconds = os.environ.get("HPD_KILL_IN", "").rpartition(":")
    if name == stage:
        _kill_in(float(seconds))


def _kill_in(seconds: float) -> None:
    t = threading.Timer(max(0.0, seconds), os.kill, (os.getpid(), signal.SIGKILL))
    t.daemon = True
    t.start()


def disk_full_point(event: str, path) -> None:
    if _nth(os.environ.get("HPD_DISK_FULL_AT"), event, _full):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def crash_point(event: str) -> None:
    if _nth(os.environ.get("HPD_KILL_AT"), event, _seen):
        os.kill(os.getpid(), signal.SIGKILL)
