"""Prompt files: JSONL / JSON / Parquet / Arrow files or saved dataset directories, read with `datasets`,
with a one-line error for every way one can be wrong (generate reads prompts and responses; judge's verifier
reads whole rows, the fields its checker needs)."""

from __future__ import annotations

import json
from pathlib import Path

from hpd.common.errors import HpdError


def open_prompt_file(path: str, fields=()):
    """The file as a `datasets.Dataset`, checked to have rows and `fields`."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise HpdError(f"prompts file {p} does not exist; set generate.prompts to a JSONL, Parquet or Arrow file")
    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
        elif p.suffix in (".jsonl", ".json"):
            ds = _read_json(p)
        elif p.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(p))
        elif p.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(p))
        else:
            raise HpdError(f"prompts file {p}: unknown format {p.suffix!r}; use .jsonl, .json, .parquet or .arrow")
    except HpdError:
        raise
    except Exception as e:  # noqa: BLE001
        raise HpdError(f"prompts file {p} cannot be read ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise HpdError(f"{p} holds several splits ({', '.join(ds)}); point generate.prompts at one split")
    if len(ds) == 0:
        raise HpdError(f"{p} has no rows; give a file with at least one prompt")
    for field in filter(None, fields):
        if field not in ds.column_names:
            raise HpdError(
                f"{p} has no field {field!r} (fields: {', '.join(ds.column_names)}); "
                f"set generate.prompt_field / generate.response_field"
            )
    return ds


def prompt_rows(path: str, prompt_field: str, limit: int = 0) -> list[dict]:
    """The first `limit` rows (0: all) as dicts, every field included."""
    ds = open_prompt_file(path, (prompt_field,))
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    try:
        return ds.to_list()
    except UnicodeDecodeError:
        raise HpdError(_not_utf8(Path(path))) from None


def read_prompts(path: str, prompt_field: str, response_field: str | None, limit: int = 0):
    """(prompts, responses) from a JSONL / JSON / Parquet / Arrow file or a saved dataset directory."""
    p = Path(path)
    ds = open_prompt_file(path, (prompt_field, response_field))
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    try:
        prompts = list(ds[prompt_field])  # datasets gives a lazy column; decode every row here
        responses = list(ds[response_field]) if response_field else None
    except UnicodeDecodeError:  # Arrow's JSON reader takes the bytes as they are; Python's strings do not
        raise HpdError(_not_utf8(p)) from None
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise HpdError(f"{p} row {i + 1}: the prompt is empty; fill it in or remove the row")
    if responses is not None:
        for i, text in enumerate(responses):
            if not isinstance(text, str) or not text:
                raise HpdError(
                    f"{p} row {i + 1}: the response is empty; fill it in, remove the row, "
                    f'or use generate.mode="teacher"'
                )
    return prompts, responses


def _not_utf8(p: Path) -> str:
    where = ""
    if p.is_file():
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    where = f" line {n}"
                    break
    return f"{p}{where} is not UTF-8 text; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


def _read_json(p: Path):
    import datasets

    try:
        return datasets.Dataset.from_json(str(p))
    except Exception:
        # datasets' own error does not say where; find the first bad line for the user.
        seen = False
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise HpdError(_not_utf8(p)) from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HpdError(f"{p} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
                if not isinstance(obj, dict):
                    raise HpdError(f'{p} line {n} is not a JSON object; each line must be {{"prompt": ...}}') from None
                seen = True
        if not seen:
            raise HpdError(f"{p} has no rows; give a file with at least one prompt") from None
        raise
