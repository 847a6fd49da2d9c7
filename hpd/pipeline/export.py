"""`hpd export`: a run's student, ready to run elsewhere: a GGUF file for llama.cpp and Ollama, or a plain transformers
directory, each with a model card (what taught it, from which cache and data, with which loss and steps, and how the
run's eval judged it). Written beside its final name and renamed into place: nothing half-written is ever there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hpd.common.errors import HpdError
from hpd.storage import gguf_export

from .report import metric_keys
from .stage import Runner

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "chat_template.jinja")


def student_stage(run: Runner, stage: str | None) -> str:
    """The stage whose student to export: the run's final one (its last round), or `stage` (a round, the
    baseline), finished."""
    students = [n for n in run.stages if run.stages[n].trains_student]
    name = stage or run.student_stages()[-1]
    if name not in students:
        raise HpdError(f"run {run.ctx.run_name} has no student stage {name}; its students: {', '.join(students)}")
    state, detail = run.state(name)
    if state != "done":
        raise HpdError(
            f"run {run.ctx.run_name}'s student {name} is {state}{f' ({detail})' if detail else ''}; "
            f"train it first: hpd run {name}"
        )
    return name


def card_facts(run: Runner, stage: str) -> dict:
    """What the model card says, from the run's manifests: teacher, cache, data, method, steps, eval."""
    cfg, student = run.cfg, run.outputs(stage)
    facts = {
        "run": run.ctx.run_name,
        "stage": stage,
        "teacher": cfg.teacher.path or "hpd's built-in teacher",
        "teacher_fingerprint": run.outputs("teacher").model_fingerprint,
        "method": student.report.get("method", cfg.distill.method),
        "steps": student.report.get("student_steps"),
        "parameters": student.report.get("parameters"),
        "data": cfg.data.builtin or cfg.generate.prompts or "",
        "sequences": run.outputs("generate").count if "generate" in run.stages else None,
    }
    if "score" in run.stages and run.state("score")[0] == "done":
        cache = run.outputs("score")
        facts.update(cache=cache.cache_id, encoding=cache.encoding, top_k=cache.top_k)
    if "eval" in run.stages and run.state("eval")[0] == "done" and stage == run.student_stages()[-1]:
        report = run.outputs("eval").report
        facts["eval"] = {row: report[row] for row in ("initial", "student", "baseline", "teacher") if row in report}
    return facts


def card_markdown(facts: dict, file_name: str) -> str:
    lines = [
        f"# {facts['run']}: a student distilled with hpd",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {facts['teacher']} (fingerprint {facts['teacher_fingerprint'][:12]}) |",
    ]
    if "cache" in facts:
        lines.append(f"| teacher cache | {facts['cache']} ({facts['encoding']}, top-{facts['top_k']}) |")
    lines += [
        f"| data | {facts['data']}, {facts['sequences']} teacher sequences |",
        f"| method | {facts['method']}, {facts['steps']} steps (stage {facts['stage']}) |",
        f"| parameters | {facts['parameters']:,} |" if facts.get("parameters") else "| parameters | - |",
    ]
    if facts.get("eval"):
        rows = facts["eval"]
        keys = metric_keys({k: v for r in rows.values() for k, v in r.items()})
        lines += ["", "## How the run's eval judged it (held-out data)", ""]
        lines.append("| model | " + " | ".join(label for _, label, _ in keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for row, r in rows.items():
            cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-" for k, _, _ in keys]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if file_name.endswith(".gguf"):
        lines += [
            "",
            "## Run it",
            "",
            f"llama.cpp: `llama-cli -m {file_name} -cnv`; Ollama: a Modelfile with `FROM ./{file_name}`, then "
            f"`ollama create NAME -f Modelfile`.",
        ]
    return "\n".join(lines) + "\n"


def _gguf_pre(run: Runner, student_dir: Path, tokenizer) -> str:
    """llama.cpp's pre-tokenizer name from a GGUF file this student's tokenizer came from (its teacher's, or the
    given student's), else "default"."""
    from transformers import AutoTokenizer

    given = run.outputs(run.student_stages()[0]).report.get("initial_dir")  # a given student, as converted
    for d in (Path(run.outputs("teacher").model_dir), Path(given or student_dir)):
        note = d / "hpd-gguf.json"
        if not note.is_file():
            continue
        source = Path(json.loads(note.read_text()).get("source", ""))
        if source.is_file() and AutoTokenizer.from_pretrained(d).get_vocab() == tokenizer.get_vocab():
            pre = gguf_export.read_metadata(source, "tokenizer.ggml.pre").get("tokenizer.ggml.pre")
            if pre:
                return pre
    return "default"


def _remove(path: Path) -> None:
    """A file or a directory, if it is there."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def export(
    run: Runner,
    fmt: str = "gguf",
    kind: str = "f16",
    stage: str | None = None,
    out: str | None = None,
    replace: bool = False,
) -> Path:
    """Write the run's student (see student_stage) as `fmt` ("gguf" with tensors of `kind`, or "hf") at `out`
    (default: <run dir>/export/; an existing one only with `replace`, once the new one is whole); returns the path."""
    from hpd.stages import hf_models

    if fmt not in ("gguf", "hf"):
        raise HpdError(f"--format {fmt} is unknown; choose gguf or hf")
    if kind not in gguf_export.TYPES:
        raise HpdError(f"--type {kind} is unknown; choose one of {', '.join(gguf_export.TYPES)}")
    name = student_stage(run, stage)
    student_dir = Path(run.outputs(name).student_dir)
    base = f"{run.ctx.run_name}-{name}"
    target = Path(out) if out else run.ctx.run_dir / "export" / (f"{base}.{kind}.gguf" if fmt == "gguf" else base)
    if target.exists() and not replace:
        raise HpdError(f"{target} exists; give --replace to write over it, or --out another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    _remove(tmp)  # a killed export's leftover
    facts = card_facts(run, name)
    card = card_markdown(facts, target.name)
    model, tok = hf_models.load_causal_lm(student_dir)
    try:
        if fmt == "hf":
            tmp.mkdir()
            model.save_pretrained(tmp)  # safetensors
            tok.save_pretrained(tmp)
            (tmp / "README.md").write_text(card)
        else:
            metadata = {
                "general.name": base,
                "general.description": f"distilled with hpd from {facts['teacher']} ({facts['method']}, "
                f"{facts['steps']} steps)",
                **{f"hpd.{k}": json.dumps(v) if isinstance(v, dict) else v for k, v in facts.items() if v is not None},
                "hpd.model_card": card,
            }
            try:
                gguf_export.write_gguf(model, tok, tmp, kind, metadata, pre=_gguf_pre(run, student_dir, tok))
            except gguf_export.ExportError as e:
                raise HpdError(str(e)) from None
        old = target.with_name(f".old-{target.name}")
        if target.is_dir():  # a directory cannot be renamed over: the old one steps aside first
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _remove(tmp)
    return target
