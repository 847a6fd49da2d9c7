"""Running one untrusted Python program (a model's completion with its unit tests, a prompt's `test` field) for a
verdict: passed, failed or timed out.

Running code is an opt-in (code.execute, or HPD_ALLOW_CODE_EVAL=1 like Hugging Face evaluate's
HF_ALLOW_CODE_EVAL); `require` refuses without it. Once allowed, every program gets, in layers:
  - a process of its own in a new session, a clean environment, an empty temporary directory (removed
    afterwards), and a wall-clock timeout that kills it;
  - resource limits set inside it before the program starts: CPU seconds, address space, file size, open files,
    no core files, and one process (RLIMIT_NPROC: no fork, no shell, no thread);
  - an unprivileged user (nobody, 65534) where hpd runs as root: root ignores RLIMIT_NPROC and may write anywhere;
  - layer "bwrap" (bubblewrap, where installed and working): namespaces of its own (network, processes, IPC,
    user, hostname), every capability dropped, no new user namespaces, a read-only view of /usr and the
    interpreter only, a private /tmp, the work directory the one writable place;
  - layer "process" (the fallback): the above without bwrap, in a network namespace of its own (`unshare --net`)
    where that works. The file system is then guarded by the unprivileged user's rights alone.
Neither is a virtual machine: the kernel is shared (docs/value.md: Running generated code).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from hpd.common.errors import HpdError

ENV = "HPD_ALLOW_CODE_EVAL"
LAYERS = ("bwrap", "process")
NOBODY = 65534
MEMORY = 1 << 30  # address space: a memory bomb ends in MemoryError
FILE_SIZE = 16 << 20  # bytes per file written
OPEN_FILES = 64
STARTUP = 1.0  # wall-clock seconds on top of the timeout: bwrap and the interpreter starting
INSIDE = "/sandbox"  # the work directory as a bwrap-ed program sees it

log = logging.getLogger("hpd.sandbox")


def allowed(explicit: bool = False) -> bool:
    """Whether code may run: the caller's explicit opt-in, or HPD_ALLOW_CODE_EVAL=1 in the environment."""
    return bool(explicit) or os.environ.get(ENV) == "1"


def require(what: str, explicit: bool, how: str = "code.execute=true") -> None:
    """A one-line error unless running code is allowed; `what` says what would run, `how` the caller's switch."""
    if not allowed(explicit):
        raise HpdError(
            f"{what}, and running generated or supplied code is off by default; allow it with {how} "
            f"or {ENV}=1 (each program then runs in hpd's sandbox, hpd/stages/sandbox.py; docs/value.md: Running "
            f"generated code)"
        )


# Runs first in the child, before the program and before any thread exists, which makes dropping rights here safe
# (a preexec_fn in hpd's threaded verifier is not). RLIMIT_NPROC comes after setuid: setuid would count nobody's
# other processes (other programs running at once) against it, and afterwards it stops this one from forking.
_BOOT = """
import os, resource, sys
cpu, memory, fsize, files, drop = map(int, sys.argv[1:])
for what, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
                         (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NOFILE, files, files),
                         (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(what, (soft, hard))
if drop:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
with open("program.py") as f:
    source = f.read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


def _root() -> bool:
    return os.geteuid() == 0


def _others_may_run(path: Path) -> bool:
    return os.stat(path).st_mode & 0o005 == 0o005 and all(os.stat(d).st_mode & 0o001 for d in path.parents)


@functools.cache
def _interpreter() -> str:
    """A Python the program's user may start: hpd's own, unless it lies where nobody may not go (a pyenv under
    /root) and the program runs as nobody; then the system's. Only the standard library is used (-I -S)."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and Path(candidate).exists():
            path = Path(os.path.realpath(candidate))
            if not _root() or _others_may_run(path):
                return str(path)
    raise HpdError(
        "no Python interpreter that the unprivileged user nobody may run (hpd's own lies in a "
        "directory closed to others); install python3 system-wide (apt-get install python3)"
    )


@functools.cache
def _unshare_net() -> tuple[str, ...]:
    """The prefix that gives the fallback layer a network namespace of its own, () where none works here."""
    found = shutil.which("unshare")
    prefix = (found, "--net") if _root() else (found, "--user", "--net")  # without root: a user namespace too
    ok = found and subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    return prefix if ok else ()


@functools.cache
def _bwrap_flags() -> tuple[str, ...]:
    help_text = subprocess.run([shutil.which("bwrap"), "--help"], capture_output=True, text=True).stdout
    return ("--disable-userns",) if "--disable-userns" in help_text else ()  # bubblewrap >= 0.8


def _bwrap(work: Path, boot: list[str]) -> list[str]:
    python = Path(boot[0])
    own = python == Path(os.path.realpath(sys.executable))  # a venv copy of it finds its library at base_prefix
    mounts = []  # /usr and the interpreter's prefix, read-only; merged-/usr links (/bin -> usr/bin) as links
    for path in sorted({"/usr", "/bin", "/lib", "/lib64", str(python.parent.parent), *([sys.base_prefix] * own)}):
        if os.path.islink(path):
            mounts += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path) and path != "/":
            mounts += ["--ro-bind", path, path]
    env = [a for k, v in _env(INSIDE).items() for a in ("--setenv", k, v)]
    return [
        shutil.which("bwrap"),
        "--unshare-all",
        "--unshare-user",
        *_bwrap_flags(),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--hostname",
        "sandbox",
        "--clearenv",
        *env,
        *mounts,
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--bind",
        str(work),
        INSIDE,
        "--chdir",
        INSIDE,
        "--",
        *boot,
    ]


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}


def _execute(source: str, timeout: float, layer: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="hpd-sandbox-"))
    try:
        (work / "program.py").write_text(source)
        drop = _root() and layer == "process"  # bwrap is itself started as nobody (below)
        if _root():
            os.chown(work, NOBODY, NOBODY)
        boot = [
            _interpreter(),
            "-I",
            "-S",
            "-c",
            _BOOT,
            *map(str, (math.ceil(timeout), MEMORY, FILE_SIZE, OPEN_FILES, int(drop))),
        ]
        argv = _bwrap(work, boot) if layer == "bwrap" else [*_unshare_net(), *boot]
        # bwrap started as nobody, not root: inside its user namespace the program is then nobody to the kernel
        # too, and RLIMIT_NPROC holds (as root it would be uid 0 outside, which the limit exempts)
        user = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if _root() and layer == "bwrap" else {}
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=_env(str(work)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                **user,
            )
            try:
                code = proc.wait(timeout + STARTUP)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its whole group; bwrap's namespace dies with bwrap
                proc.wait()
                return {"passed": False, "result": "timed out"}
            err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
            lines = [x for x in err.read().decode(errors="replace").splitlines() if x.strip()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if code == 0:
        return {"passed": True, "result": "passed"}
    # a signal: negative from the process layer, 128 + signal from bwrap (which reports its child's end that way)
    sig = -code if code < 0 else code - 128 if layer == "bwrap" and code > 128 else 0
    if sig in (signal.SIGXCPU, signal.SIGKILL):  # the CPU limit: soft, then hard
        return {"passed": False, "result": "timed out"}
    why = lines[-1][:300] if lines else f"killed by {signal.Signals(sig).name}" if sig else f"exit status {code}"
    return {"passed": False, "result": f"failed: {why}"}


@functools.cache
def _works(layer: str) -> str:
    """'' where `layer` runs a program here, else why not (found once per process, by running one)."""
    if layer == "bwrap" and not shutil.which("bwrap"):
        return "bwrap is not installed (apt-get install bubblewrap)"
    try:
        r = _execute("import hashlib, math, socket\n", 30.0, layer)
    except HpdError as e:  # no interpreter the program's user may start
        return str(e)
    return "" if r["passed"] else f"{layer} cannot start a program here: {r['result']}"


_choosing = threading.Lock()
_chosen: list[str] = []  # the layer, once chosen (under the lock: the verifier's threads ask at once)


def best_layer() -> str:
    """The strongest layer that works on this machine, chosen once; a warning names it."""
    with _choosing:
        if not _chosen:
            _chosen.append(_choose())
        return _chosen[0]


def _choose() -> str:
    why_not = _works("bwrap")
    if not why_not:
        log.warning(
            "generated code runs under bubblewrap: namespaces of its own (no network), a read-only /usr, "
            "uid %d, resource limits",
            NOBODY,
        )
        return "bwrap"
    if _works("process"):
        raise HpdError(f"cannot run generated code in a sandbox here: {_works('process')}")
    net = "no network (unshare --net)" if _unshare_net() else "THE NETWORK REACHABLE (unshare --net fails)"
    user = f"uid {NOBODY}" if _root() else "your uid"
    log.warning(
        "%s; generated code runs in the fallback sandbox: a process of its own as %s, resource limits, "
        "%s, the file system guarded by file permissions alone",
        why_not,
        user,
        net,
    )
    return "process"


def run(source: str, timeout: float, *, allow: bool, layer: str = "") -> dict:
    """Runs `source` as a Python program: {"passed": its exit status was 0, "result": "passed", "failed: <its last
    error line>" or "timed out"} (`timeout` seconds of CPU and, plus STARTUP, of wall clock). `allow` is the
    caller's opt-in (see require); `layer` forces "bwrap" or "process", "" takes the best that works here."""
    require("running a program", allow, how="allow=True")
    if layer not in ("", *LAYERS):
        raise HpdError(f"sandbox layer {layer!r} is unknown; choose one of {', '.join(LAYERS)}")
    if layer and _works(layer):
        raise HpdError(_works(layer))
    return _execute(source, timeout, layer or best_layer())
