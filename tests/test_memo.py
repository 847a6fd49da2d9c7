"""Remembered results (hpd/storage/memo.py): made once per key, a torn file made again rather than trusted."""

import json

import pytest

from hpd.storage import memo

pytestmark = pytest.mark.unit


def test_made_once_per_key_and_remade_when_torn(tmp_path):
    calls = []

    def make(value):
        return lambda: calls.append(value) or {"value": value}

    assert memo.remembered(tmp_path / "m", "k1", make(1)) == {"value": 1}
    assert memo.remembered(tmp_path / "m", "k1", make(2)) == {"value": 1}  # remembered: not made again
    assert memo.remembered(tmp_path / "m", "k2", make(3)) == {"value": 3}
    assert calls == [1, 3]
    (tmp_path / "m" / "k1.json").write_text('{"value": ')  # torn
    assert memo.remembered(tmp_path / "m", "k1", make(4)) == {"value": 4}
    assert json.loads((tmp_path / "m" / "k1.json").read_text()) == {"value": 4}
    assert calls == [1, 3, 4] and not list((tmp_path / "m").glob(".*tmp"))


def test_the_code_key_ignores_comments_docstrings_and_layout_but_not_what_the_code_does(tmp_path):
    """Remembered judgements are keyed by the judging code (hpd/stages/evaluate.py): rewording a docstring once
    cost pair A's remembered HumanEval judgements of the teacher and the student before."""
    from hpd.storage.fingerprint import code_digest

    def key(source: str) -> str:
        path = tmp_path / "judge.py"
        path.write_text(source)
        return code_digest(path)

    base = key('"""Module."""\n\ndef f(x):\n    """Doubles x."""\n    return 2 * x  # why\n')
    assert key('"""Another module text."""\n\ndef f(x):\n    """Twice x,\n    reworded."""\n    return 2 * x\n') == base
    assert key("def f(x):\n    return (\n        2 * x\n    )\n") == base  # layout and no docstrings at all
    assert key('def f(x):\n    """Doubles x."""\n    return 3 * x\n') != base  # what it does
    assert key('def f(x):\n    return "2 * x"\n') != base  # a string that is not a docstring is code
