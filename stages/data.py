"""data: materialise the built-in task as JSONL files (train and held-out), or nothing for user data."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import HpdError
from storage import atomic
from storage.fingerprint import digest, file_digest

from .tasks import arithmetic

BUILTINS = {"math"}


def run(ctx, cfg: dict, inputs: dict) -> dict:
    name = cfg["builtin"]
    if not name:
        return {"builtin": "", "fingerprint": digest("no built-in data")}
    if name not in BUILTINS:
        raise HpdError(f"unknown built-in task data.builtin={name!r}; choose one of {sorted(BUILTINS)} or \"\"")
    if min(cfg["operands"], cfg["digits"]) < 1 or cfg["operands"] > 9:
        raise HpdError("data.operands must be 1-9 and data.digits at least 1")
    final = ctx.stage_dir("data") / name
    tmp = final.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    heldout = arithmetic.write_split(tmp / "heldout.jsonl", cfg["heldout_examples"], ctx.seed * 1000 + 2,
                                     cfg["operands"], cfg["digits"])
    arithmetic.write_split(tmp / "train.jsonl", cfg["train_examples"], ctx.seed * 1000 + 1,
                           cfg["operands"], cfg["digits"], exclude=heldout)
    atomic.publish_dir(tmp, final)
    files = {f: file_digest(final / f) for f in ("train.jsonl", "heldout.jsonl")}
    return {"builtin": name, "train": str(final / "train.jsonl"), "heldout": str(final / "heldout.jsonl"),
            "train_examples": cfg["train_examples"], "heldout_examples": cfg["heldout_examples"],
            "fingerprint": digest(files)}


def published(outputs: dict) -> bool:
    return not outputs["builtin"] or all(Path(outputs[s]).is_file() for s in ("train", "heldout"))
