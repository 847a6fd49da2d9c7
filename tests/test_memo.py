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
