"""data: materialise a built-in task as JSONL files (train and held-out) plus its tokenizer, or nothing
when the user brings their own prompts."""

from __future__ import annotations

import shutil

from hpd.common.errors import HpdError
from hpd.common.settings import Settings
from hpd.storage import atomic
from hpd.storage.fingerprint import digest, file_digest

from .artifacts import StageKind, TaskData
from .tasks import TASKS


def run(ctx, cfg: Settings) -> TaskData:
    name = cfg.data.builtin
    if not name:
        return TaskData(builtin="", fingerprint=digest("no built-in data"))
    final = ctx.stage_dir("data") / name
    tmp = final.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    task = TASKS[name]
    try:
        counts = task.write_data(tmp, cfg.data, ctx.seed)
    except ValueError as e:
        raise HpdError(str(e)) from None
    own_tokenizer = hasattr(task, "build_tokenizer")  # the chat prompts use the given teacher's
    if own_tokenizer:
        task.build_tokenizer(tmp / "train.jsonl", cfg.data).save_pretrained(tmp / "tokenizer")
    atomic.publish_dir(tmp, final)
    files = {f: file_digest(final / f) for f in ("train.jsonl", "heldout.jsonl")}
    if own_tokenizer:
        files["tokenizer"] = file_digest(final / "tokenizer" / "tokenizer.json")
    retention = final / "retention.jsonl"
    return TaskData(
        retention=str(retention) if retention.is_file() else "",
        builtin=name,
        train=str(final / "train.jsonl"),
        heldout=str(final / "heldout.jsonl"),
        tokenizer=str(final / "tokenizer") if own_tokenizer else "",
        train_examples=counts["train"],
        heldout_examples=counts["heldout"],
        fingerprint=digest(files),
    )


STAGE = StageKind("data", run, TaskData)
