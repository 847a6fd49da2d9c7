"""Generated or supplied code: refused without the opt-in, and once allowed confined by hpd/stages/sandbox.py. Each
attack is a real program run in each layer this machine has (bwrap where bubblewrap works, the fallback always);
then a run whose HumanEval-style prompts carry malicious tests finishes with those counted as failed."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from hpd.common.errors import HpdError
from hpd.pipeline import config
from hpd.stages import sandbox
from hpd.storage.value_store import ValueStore

from conftest import hpd_cli

ROOT = os.geteuid() == 0
LAYERS = [
    pytest.param(
        "bwrap", marks=pytest.mark.skipif(bool(sandbox._works("bwrap")), reason=sandbox._works("bwrap") or "works")
    ),
    "process",
]


def _run(source: str, layer: str, timeout: float = 5.0) -> dict:
    return sandbox.run(source, timeout, allow=True, layer=layer)


@pytest.fixture
def open_dir():
    """A directory anyone may write (as /tmp is): where a sandboxed program's escaped process could leave a mark."""
    d = Path(tempfile.mkdtemp(prefix="hpd-test-open-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


# -- the opt-in --------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_running_code_needs_the_opt_in(monkeypatch):
    monkeypatch.delenv(sandbox.ENV, raising=False)
    with pytest.raises(HpdError, match="off by default; allow it with allow=True or HPD_ALLOW_CODE_EVAL=1"):
        sandbox.run("print(1)", 5.0, allow=False)
    monkeypatch.setenv(sandbox.ENV, "1")
    assert sandbox.run("print(1)", 5.0, allow=False)["passed"]
    monkeypatch.setenv(sandbox.ENV, "yes")  # only "1", as Hugging Face evaluate's HF_ALLOW_CODE_EVAL
    with pytest.raises(HpdError, match="off by default"):
        sandbox.run("print(1)", 5.0, allow=False)


@pytest.mark.unit
def test_settings_that_run_code_need_the_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv(sandbox.ENV, raising=False)
    code_prompts = ['value.function="verifier"', 'value.judge="generate"', f'generate.prompts="{tmp_path}/p.jsonl"']
    for sets, says in (
        (code_prompts, "runs the test code of the prompts"),
        (["eval.humaneval=true"], "runs the student's HumanEval completions"),
    ):
        with pytest.raises(HpdError, match=f"{says}.*allow it with code.execute=true or HPD_ALLOW_CODE_EVAL=1"):
            config.load("tiny", sets)
        assert config.load("tiny", [*sets, "code.execute=true"]).code.execute is True
    assert config.load("tiny").code.execute is False  # nothing runs code: no opt-in needed
    monkeypatch.setenv(sandbox.ENV, "1")  # the variable's opt-in is recorded, so a saved config reopens as it ran
    assert config.load("tiny", ["eval.humaneval=true"]).code.execute is True


@pytest.mark.unit
def test_an_unknown_layer_is_one_line():
    with pytest.raises(HpdError, match="layer 'docker' is unknown"):
        sandbox.run("print(1)", 5.0, allow=True, layer="docker")


@pytest.mark.unit
def test_the_layer_in_use_is_named_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_chosen", [])
    with caplog.at_level("WARNING", logger="hpd.sandbox"):
        layer = sandbox.best_layer()
        assert sandbox.best_layer() == layer
    assert len(caplog.records) == 1
    assert ("bubblewrap" if layer == "bwrap" else "fallback sandbox") in caplog.records[0].getMessage()
    assert layer == ("bwrap" if not sandbox._works("bwrap") else "process")
    # a machine without bubblewrap: the fallback, said so
    monkeypatch.setattr(sandbox, "_chosen", [])
    monkeypatch.setattr(sandbox, "_works", lambda name: "bwrap is not installed" if name == "bwrap" else "")
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpd.sandbox"):
        assert sandbox.best_layer() == "process"
    assert "bwrap is not installed; generated code runs in the fallback sandbox" in caplog.records[0].getMessage()


# -- what a program cannot do ------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("layer", LAYERS)
def test_a_program_cannot_write_outside_its_directory(layer, tmp_path):
    if layer == "process" and not ROOT:
        pytest.skip("the fallback guards files by the unprivileged user nobody only when hpd runs as root")
    shell, opened = tmp_path / "by-shell", tmp_path / "by-open"  # root's: writable before the sandbox
    r1 = _run(f"import posix\nassert posix.system('id > {shell}') == 0\n", layer)
    r2 = _run(f"open({str(opened)!r}, 'w').write('owned')\n", layer)
    assert not shell.exists() and not opened.exists()
    assert not r1["passed"] and not r2["passed"]
    assert ("FileNotFoundError" if layer == "bwrap" else "PermissionError") in r2["result"]  # bwrap: not even seen


@pytest.mark.unit
@pytest.mark.parametrize("layer", LAYERS)
def test_a_program_cannot_start_another_process(layer, open_dir):
    mark = open_dir / "mark"
    programs = [
        f"import os\nif os.fork() == 0:\n    open({str(mark)!r}, 'w').write('forked')\n    os._exit(0)\n",
        f"import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo x > {mark}'])\n",
        f"import threading\nthreading.Thread(target=open, args=({str(mark)!r}, 'w')).start()\n",
    ]
    results = [_run(p, layer) for p in programs]
    time.sleep(0.2)  # a process that did escape has had time to write
    assert not mark.exists()
    assert all("Resource temporarily unavailable" in r["result"] for r in results[:2]), results
    assert "can't start new thread" in results[2]["result"]


@pytest.mark.unit
@pytest.mark.parametrize("layer", LAYERS)
def test_a_program_cannot_reach_the_network(layer):
    if layer == "process" and not sandbox._unshare_net():
        pytest.skip("unshare --net does not work here: the fallback cannot take the network away")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=3)\n"
    with server:
        # the same program outside the sandbox does connect: the server would see the sandboxed one
        subprocess.run([sys.executable, "-c", program], check=True, timeout=30)
        server.accept()[0].close()
        r = _run(program, layer)
        with pytest.raises(TimeoutError):
            server.accept()
    assert not r["passed"] and ("refused" in r["result"] or "unreachable" in r["result"]), r


@pytest.mark.unit
@pytest.mark.parametrize("layer", LAYERS)
def test_memory_bombs_and_endless_programs_are_stopped_quickly(layer):
    cases = [
        ("x = bytearray(64 << 30)\n", ("failed: MemoryError",)),
        # filling the address space page by page may take longer than its second of CPU
        ("a = []\nwhile True:\n    a.append(bytearray(1 << 20))\n", ("failed: MemoryError", "timed out")),
        ("open('big', 'wb').write(bytes(64 << 20))\n", ("File too large",)),
        ("while True:\n    pass\n", ("timed out",)),
        ("import time\ntime.sleep(3600)\n", ("timed out",)),
    ]
    for program, says in cases:
        start = time.monotonic()
        r = _run(program, layer, timeout=1.0)
        assert any(s in r["result"] for s in says) and not r["passed"], (program, r)
        assert time.monotonic() - start < 1.0 + sandbox.STARTUP + 1.5, program


@pytest.mark.unit
@pytest.mark.parametrize("layer", LAYERS)
def test_a_program_sees_no_secret_runs_unprivileged_and_under_limits(layer, monkeypatch):
    monkeypatch.setenv("HPD_TEST_SECRET", "hunter2")
    program = f"""import os, resource
assert "hunter2" not in repr(os.environ), sorted(os.environ)
assert set(os.environ) <= {{"PATH", "LANG", "HOME", "TMPDIR", "PWD", "LC_CTYPE"}}, sorted(os.environ)
assert os.getuid() != 0 and os.geteuid() != 0 and 0 not in os.getgroups(), os.getuid()
R = resource
for limit, want in ((R.RLIMIT_NPROC, 1), (R.RLIMIT_CORE, 0), (R.RLIMIT_CPU, 2), (R.RLIMIT_AS, {sandbox.MEMORY}),
                    (R.RLIMIT_FSIZE, {sandbox.FILE_SIZE}), (R.RLIMIT_NOFILE, {sandbox.OPEN_FILES})):
    assert R.getrlimit(limit)[0] == want, (limit, R.getrlimit(limit))
assert os.listdir(".") == ["program.py"]
"""
    r = _run(program, layer, timeout=2.0)
    assert r == {"passed": True, "result": "passed"}, r
    if ROOT or layer == "bwrap":
        assert _run("import os\nassert os.getuid() == 65534\n", layer)["passed"]


@pytest.mark.unit
@pytest.mark.parametrize("layer", LAYERS)
def test_the_work_directory_is_removed(layer, monkeypatch, open_dir):
    open_dir.chmod(0o755)  # only hpd may write here; the sandbox's directories are made inside
    monkeypatch.setattr(tempfile, "tempdir", str(open_dir))
    assert _run("open('left.txt', 'w').write('x')\nimport os\nos.mkdir('sub')\n", layer)["passed"]
    assert list(open_dir.iterdir()) == []


@pytest.mark.unit
@pytest.mark.parametrize("layer", LAYERS[:1])
def test_bwrap_shows_only_the_system_and_a_private_tmp(layer):
    escape = Path(tempfile.gettempdir()) / f"hpd-escape-{os.getpid()}"
    program = f"""import os
assert not os.path.exists({str(Path(sandbox.__file__))!r})  # hpd's checkout, the runs, /root, /home: absent
assert not os.path.exists("/etc/passwd") and not os.path.exists("/root")
open({str(escape)!r}, "w").write("x")  # /tmp is the sandbox's own
assert os.listdir("/") and open("/proc/1/cmdline").read()  # its own process namespace: pid 1 is bwrap
import socket
assert socket.gethostname() == "sandbox"
"""
    r = _run(program, layer)
    assert r["passed"], r
    assert not escape.exists()


# -- through the verifier and a run --------------------------------------------------------------------------------
MALICIOUS = {  # test code of HumanEval-style prompts; each would leave MARK behind outside a sandbox
    "shell": "def check(f):\n    import posix\n    assert posix.system('id > {mark}') == 0\n",
    "open": "def check(f):\n    open({mark!r}, 'w').write('owned')\n",
    "fork": "def check(f):\n    import os\n    os.fork()\n",
    "loop": "def check(f):\n    while True:\n        pass\n",
}


def _code_prompts(path: Path, mark: Path) -> Path:
    """Prompts the tiny math tokenizer can write ("1" answered "+2" is the Python `1+2`): one honest test, then
    the malicious ones."""
    rows = [{"prompt": "1", "response": "+2", "entry_point": "1", "test": "def check(f):\n    assert f + 2 == 3\n"}]
    rows += [
        {"prompt": str(i + 2), "response": "+2", "entry_point": "1", "test": t.format(mark=str(mark))}
        for i, t in enumerate(MALICIOUS.values())
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_run_counts_malicious_tests_as_failed_and_refuses_without_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv(sandbox.ENV, raising=False)
    mark = tmp_path / "mark"
    sets = [
        'run.name="code"',
        'value.function="verifier"',
        'value.judge="generate"',
        "value.timeout=1.0",
        f'generate.prompts="{_code_prompts(tmp_path / "code.jsonl", mark)}"',
    ]
    refused = hpd_cli(tmp_path / "home", "run", "--until", "judge", overrides=sets)
    assert refused.exit_code != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "code.execute=true" in refused.stderr
    assert not (tmp_path / "home" / "runs").exists()  # before any stage
    result = hpd_cli(tmp_path / "home", "run", "--until", "judge", overrides=[*sets, "code.execute=true"])
    assert result.exit_code == 0, result.output
    _, prompt_index, values = ValueStore(tmp_path / "home" / "runs" / "code" / "judge" / "values").arrays()
    assert values[np.argsort(prompt_index)].tolist() == [1.0] + [0.0] * len(MALICIOUS)
    assert not mark.exists()
