"""Content fingerprints: the identities that cache keys and stage manifests are built from."""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path


def digest(obj) -> str:
    """Stable sha256 of a JSON-able object (keys sorted, so dict order never changes a key)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def code_digest(*paths: str | os.PathLike) -> str:
    """Digest of Python modules as code: their syntax trees with docstrings left out, so a reworded comment or
    docstring, or a reformatted line, keeps every key built on it (a remembered HumanEval judgement is an hour of
    CPU), while any change to what the code does makes a new one."""
    trees = []
    for path in paths:
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
        trees.append(ast.dump(tree))
    return digest(trees)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Weight files of a 7B teacher are ~15 GB; hashing them on every `hpd run` would cost ~20 s each time,
# so digests are memoised per (path, size, mtime) next to the files they describe.
_MEMO_NAME = ".hpd-digests.json"


def files_digest(directory: str | os.PathLike, patterns: list[str]) -> str:
    """Digest of the files in `directory` that match any glob in `patterns` (names and contents)."""
    directory = Path(directory)
    memo_path = directory / _MEMO_NAME
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    parts, changed = {}, False
    names = sorted({p.name for pat in patterns for p in directory.glob(pat) if p.is_file()})
    for name in names:
        st = (directory / name).stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        entry = memo.get(name)
        if not entry or entry[0] != stamp:
            entry = [stamp, file_digest(directory / name)]
            memo[name], changed = entry, True
        parts[name] = entry[1]
    if changed:
        try:
            tmp = memo_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # a read-only model directory only loses the memo, never correctness
    return digest(parts)
