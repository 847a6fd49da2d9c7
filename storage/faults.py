"""Fault injection for the crash tests.

HPD_KILL_AT=<event>:<n> makes the process SIGKILL itself right after the n-th <event> ("shard" when a shard
is published, "checkpoint" when a training checkpoint is saved): the harshest interruption there is, with no
cleanup code running, at a point the test can rely on.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter = Counter()


def crash_point(event: str) -> None:
    spec = os.environ.get("HPD_KILL_AT")
    if not spec:
        return
    _seen[event] += 1
    name, _, count = spec.partition(":")
    if name == event and _seen[event] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
