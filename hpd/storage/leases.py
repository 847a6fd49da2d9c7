"""Reader leases: a process that trains from a cache says so, so that `hpd cache gc` never removes it.

A lease is a file <cache>/readers/<host>-<pid> written under the cache's lock and removed when the process
exits. A SIGKILLed reader leaves its file behind; it is ignored (and cleaned up) once that process is gone,
judged by pid and process start time so a recycled pid does not keep a cache alive forever. Leases from other
hosts (a shared file system) cannot be checked and count as live.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
from pathlib import Path

READERS = "readers"
_HOST = socket.gethostname()


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def take(directory: Path) -> Path:
    """Registers this process as a reader of `directory` until it exits (call under the directory's lock)."""
    lease = Path(directory) / READERS / f"{_HOST}-{os.getpid()}"
    lease.parent.mkdir(exist_ok=True)
    lease.write_text(json.dumps({"host": _HOST, "pid": os.getpid(), "start": _start_time(os.getpid())}))
    atexit.register(lease.unlink, missing_ok=True)
    return lease


def live(directory: Path) -> list[str]:
    """The live readers of `directory` (host-pid names); stale leases of dead local processes are removed."""
    alive = []
    for lease in sorted((Path(directory) / READERS).glob("*")):
        try:
            info = json.loads(lease.read_text())
        except (OSError, ValueError):
            continue  # being written right now, or damaged: neither is a reader we can vouch for
        same_process = info.get("start") is not None and _start_time(info["pid"]) == info["start"]
        if info.get("host") != _HOST or same_process:
            alive.append(lease.name)
        else:
            lease.unlink(missing_ok=True)
    return alive
