"""generate: prompts become token sequences (prompt + response) for the teacher to score.

Responses are either the data set's own (off-policy data, as the paper does for math) or N samples per
prompt from the teacher (SeqKD-style). Sequences are published in shards, so an interrupted teacher
sampling run resumes after its last shard.
"""
from __future__ import annotations

import json
from pathlib import Path


from hpd.common.errors import HpdError
from hpd.storage import sequences as seqstore
from hpd.storage.fingerprint import file_digest
from hpd.storage.sharded import ShardedWrite

from . import modeling
from .artifacts import Sequences, StageKind, TaskData, Teacher

VERSION = 2  # 2: sequences in zstd-framed shards


def read_prompts(path: str, prompt_field: str, response_field: str | None, limit: int = 0):
    """(prompts, responses) from a JSONL / JSON / Parquet / Arrow file or a saved dataset directory."""
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
    for field in filter(None, (prompt_field, response_field)):
        if field not in ds.column_names:
            raise HpdError(f"{p} has no field {field!r} (fields: {', '.join(ds.column_names)}); "
                           f"set generate.prompt_field / generate.response_field")
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
                raise HpdError(f"{p} row {i + 1}: the response is empty; fill it in, remove the row, "
                               f"or use generate.mode=\"teacher\"")
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
                    raise HpdError(f"{p} line {n} is not a JSON object; each line must be "
                                   f"{{\"prompt\": ...}}") from None
                seen = True
        if not seen:
            raise HpdError(f"{p} has no rows; give a file with at least one prompt") from None
        raise


def run(ctx, cfg: dict, data: TaskData, teacher: Teacher) -> Sequences:
    source = cfg["prompts"] or data.train
    from_data = cfg["mode"] == "dataset"
    prompts, responses = read_prompts(source, cfg["prompt_field"], cfg["response_field"] if from_data else None,
                                      cfg["num_prompts"])
    model, tokenizer = modeling.load_teacher(teacher)
    model = modeling.to_accelerator(model)
    context = modeling.context_length(model)
    pairs = [modeling.encode_pair(tokenizer, p, r) for p, r in
             zip(prompts, responses if from_data else [None] * len(prompts))]
    pairs, max_new, truncated = _fit_context(pairs, context, cfg, source, from_data)
    if truncated:
        ctx.log(f"warning: generate.too_long=\"truncate\": {truncated} of {len(pairs)} sequences cut to the "
                f"teacher's context of {context} tokens")

    final = ctx.stage_dir("generate") / "sequences"
    meta = {"config": cfg, "teacher": teacher.fingerprint, "source": file_digest(source)
            if Path(source).is_file() else str(source), "seed": ctx.seed}
    if from_data:
        manifest = _write_dataset(ctx, final, meta, pairs, cfg["shard_size"])
    else:
        manifest = modeling.sample_to_store(
            ctx, model, tokenizer, [p for p, _ in pairs], final, meta, samples_per_prompt=cfg["samples_per_prompt"],
            prompts_per_shard=cfg["shard_size"], max_new_tokens=max_new, temperature=cfg["temperature"],
            batch_size=cfg["batch_size"], seed=ctx.seed, desc="generate", engine=cfg["engine"],
            batch_tokens=cfg["batch_tokens"])
    tokens = sum(s["tokens"] for s in manifest["shards"])
    return Sequences(sequences=str(final), source=str(source), count=manifest["rows"], tokens=tokens,
                     truncated=truncated, fingerprint=manifest["fingerprint"])


def _fit_context(pairs: list, context: int, cfg: dict, source, from_data: bool) -> tuple[list, int, int]:
    """(pairs, max_new_tokens, number cut) with every sequence inside the teacher's context: refused, or with
    generate.too_long = "truncate" cut (dataset mode: the response's end; teacher mode: fewer new tokens)."""
    truncate, max_new, cut = cfg["too_long"] == "truncate", cfg["max_new_tokens"], 0
    for i, (p, r) in enumerate(pairs):
        n = len(p) + (len(r) if from_data else max_new)
        if n <= context:
            continue
        room = context - len(p)
        if not truncate or room < 1:
            what = "prompt + response" if from_data else "prompt + generate.max_new_tokens"
            fix = "its prompt alone fills the context; shorten or remove it" if room < 1 else \
                "shorten it, lower generate.max_new_tokens, or set generate.too_long=\"truncate\""
            raise HpdError(f"{source} row {i + 1}: {what} is {n} tokens, longer than the teacher's context of "
                           f"{context}; {fix}")
        cut += 1
        if from_data:
            pairs[i] = (p, r[:room])
        else:
            max_new = room
    return pairs, max_new, cut


def _write_dataset(ctx, final: Path, meta: dict, pairs: list, per_shard: int) -> dict:
    out = ShardedWrite(ctx, lambda rank: seqstore.SequenceWriter(final, {**meta, "shard_size": per_shard}, rank),
                       -(-len(pairs) // per_shard))
    for shard in out.todo():
        lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(pairs))
        out.write(shard, seqstore.rows_table(range(lo, hi), range(lo, hi), [len(pairs[i][0]) for i in range(lo, hi)],
                                             [pairs[i][0] + pairs[i][1] for i in range(lo, hi)]))
    return out.finish()


STAGE = StageKind("generate", run, Sequences, version=VERSION, distributed=True)  # ranks share the shards
