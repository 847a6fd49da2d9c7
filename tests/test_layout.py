"""The code's shape, checked: layers import only downwards, and installing hpd adds one top-level name."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bottom to top: a package may import its own modules and those of the packages before it, never after
LAYERS = ["common", "storage", "stages", "pipeline"]


def _hpd_imports(path: Path) -> set[str]:
    """The hpd packages a module imports (absolute `hpd.X` imports; relative ones stay inside their package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "hpd" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in LAYERS:  # a bare `pipeline` / `storage` import would bypass the namespace
                found.add("bare " + parts[0])
    return found


def test_no_package_imports_one_above_it():
    wrong = []
    for i, layer in enumerate(LAYERS):
        for path in sorted((ROOT / "hpd" / layer).rglob("*.py")):
            for imported in _hpd_imports(path):
                if imported.startswith("bare ") or (imported in LAYERS and LAYERS.index(imported) > i):
                    wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert wrong == []


def test_benches_use_the_installed_package_only():
    for path in sorted((ROOT / "bench").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text and "monkeypatch" not in text, path.name
        assert not any(i.startswith("bare ") for i in _hpd_imports(path)), path.name


def test_the_wheel_installs_one_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("hpd-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"hpd", wheel.name.split("-py")[0] + ".dist-info"}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "hpd/__init__.py",
        "hpd/pipeline/cli.py",
        "hpd/common/settings.py",
        "hpd/stages/losses.py",
        "hpd/storage/logit_cache.py",
        "hpd/common/errors.py",
        "hpd/pipeline/presets/smollm2.toml",
    } <= names


def test_public_names_come_from_hpd():
    import hpd
    from hpd.pipeline.runs import open_run
    from hpd.stages.losses import distill_loss
    from hpd.storage.logit_cache import LogitCache

    assert (hpd.open_run, hpd.distill_loss, hpd.LogitCache) == (open_run, distill_loss, LogitCache)


def test_the_readme_python_example_runs(tiny_runner):
    """docs/guide.md "From Python": a cache read through the public names gives a loss with a gradient."""
    import torch

    from hpd import CacheBatch, LogitCache, distill_loss, open_run
    from hpd.storage.sequences import SequenceStore

    run = open_run("tiny", home=tiny_runner.ctx.home, log=lambda s: None)
    run.run(until="score")  # up to date: nothing reruns
    cache = run.outputs("score")
    store = SequenceStore(Path(run.outputs("generate").sequences))
    rows = [store.get(i) for i in (0, 1, 2)]
    length = max(len(ids) for ids, _ in rows)
    batch = LogitCache(cache.cache).batch([0, 1, 2], input_ids=[ids for ids, _ in rows], length=length)
    assert isinstance(batch, CacheBatch) and batch.k == cache.top_k
    labels = torch.full((3, length), -100)
    for b, (ids, plen) in enumerate(rows):
        labels[b, plen : len(ids)] = torch.tensor(ids[plen:].tolist())
    logits = torch.zeros(3, length, run.outputs("teacher").vocab_size, requires_grad=True)
    loss, diagnostics = distill_loss("hpd_fkl", logits, labels, teacher=batch)
    loss.backward()
    assert diagnostics["tokens"] == int((labels[:, 1:] != -100).sum()) and logits.grad.abs().sum() > 0


def test_every_relative_link_in_the_readme_and_docs_resolves():
    """A link or image in README.md or docs/*.md that names a file of the repository names one that exists,
    relative to the page it is on (a generated docs page once pointed its images at bench/ from docs/)."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if not path or "://" in path or path.startswith("mailto:"):
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
