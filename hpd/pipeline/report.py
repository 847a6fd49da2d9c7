"""Reports: markdown tables and PNG plots for one run (`hpd report RUN`) and for a comparison (`hpd compare`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hpd.common.stats import differences_t
from hpd.stages.losses import HPD_DIAGNOSTICS
from hpd.stages.metrics import LOWER_IS_BETTER, metric_keys


def student_name(stage: str, report: dict) -> str:
    """`distill (fkl)`, `baseline (sft)`, `distill-2 (hpd 90% offline + opd 10% refresh)`."""
    mixture = report.get("mixture", {})
    return f"{stage} ({_round_methods(report) if len(mixture) > 1 else report.get('method', '?')})"


def as_judged(report: dict) -> dict:
    """A stage's own held-out report (distill, teacher) under the eval report's metric names."""
    return {("accuracy" if k == "heldout_accuracy" else k): v for k, v in report.items()}


def summary_table(named: list[tuple[str, dict]]) -> str:
    """What `hpd run` and `hpd status` print at the end: one row per model (name, judged report), one column per
    metric any of them has, '-' where one lacks it (a teacher given as a directory has no held-out report)."""
    named = [(n, r) for n, r in named if r]
    metrics = metric_keys({k: v for _, r in named for k, v in r.items()})
    rows = [("model", "parameters", *(label for _, label, _ in metrics))]
    for name, r in named:
        rows.append(
            (
                name,
                f"{r['parameters'] / 1e3:,.0f}k" if "parameters" in r else "-",
                *(fmt.format(r[k]) if k in r else "-" for k, _, fmt in metrics),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _round_methods(report: dict) -> str:
    return " + ".join(f"{m['method']} {m['share']:.0%} {name}" for name, m in report.get("mixture", {}).items())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_logs(run) -> list[dict]:
    """The training logs of a run's finished student stages (a Runner's), in round order, with steps counted
    across rounds."""
    rows, offset = [], 0
    for stage in run.student_stages():
        if run.state(stage)[0] != "done":
            continue
        log = json.loads((Path(run.outputs(stage).student_dir) / "training_log.json").read_text())
        for e in log:
            if "loss" in e or any(k.startswith("curve_") for k in e):
                rows.append({**e, "student_step": e.get("student_step", offset + e["step"]), "stage": stage})
        offset += max((e.get("step", 0) for e in log), default=0)
    return rows


def run_report(run, out: Path) -> Path:
    """Markdown + PNGs for one run (a Runner): loss curves, HPD diagnostics, the learning curve and the evaluation."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    stages = run.student_stages()
    log = training_logs(run)
    steps = [e for e in log if "loss" in e]
    name = run.ctx.run_name
    lines = [f"# Run {name}", ""]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([e["student_step"] for e in steps], [e["loss"] for e in steps])
        for stage in stages[1:]:
            first = next((e["student_step"] for e in steps if e["stage"] == stage), None)
            if first is not None:
                ax.axvline(first, color="grey", lw=0.5)
        ax.set(xlabel="student step", ylabel="training loss", title=f"{name}: loss (rounds marked)")
        fig.tight_layout(), fig.savefig(out / "loss.png", dpi=100), plt.close(fig)
        lines += ["![loss](loss.png)", ""]
        diag = [k for k in HPD_DIAGNOSTICS if any(k in e or any(x.endswith("_" + k) for x in e) for e in steps)]
        if diag:
            fig, ax = plt.subplots(figsize=(6, 4))
            for k in diag:
                pts = [(e["student_step"], e.get(k, e.get(f"offline_{k}"))) for e in steps]
                pts = [(x, y) for x, y in pts if y is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=k)
            ax.set(xlabel="student step", title="HPD diagnostics (offline sequences)")
            ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(out / "hpd_diagnostics.png", dpi=100)
            plt.close(fig)
            lines += ["![HPD diagnostics](hpd_diagnostics.png)", ""]
    curve = [e for e in log if "curve_nll" in e]
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        key = "curve_accuracy" if "curve_accuracy" in curve[0] else "curve_nll"
        ax.plot([e["input_tokens"] for e in curve], [e[key] for e in curve], marker="o")
        ax.set(xlabel="training tokens (input, non-padding)", ylabel=key[6:], title="held-out learning curve")
        fig.tight_layout(), fig.savefig(out / "learning_curve.png", dpi=100), plt.close(fig)
        lines += ["![learning curve](learning_curve.png)", ""]
    if run.state("eval")[0] == "done":
        ev = run.outputs("eval").report
        keys = metric_keys(ev["student"])
        lines += ["| model | " + " | ".join(label for _, label, _ in keys) + " |", "|---|" + "---|" * len(keys)]
        for name in ("student", "teacher"):
            if name in ev:
                lines.append(
                    f"| {name} | "
                    + " | ".join(fmt.format(ev[name][k]) if k in ev[name] else "-" for k, _, fmt in keys)
                    + " |"
                )
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _mean_std(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(sd)}"


def paired_differences(results: list[dict], key: str) -> dict[str, list[float]]:
    """Per method, its metric minus the first method's on the same student seed (same initialisation and data
    order), for every seed both have: the seed-to-seed spread cancels, so the comparison is sharper than two
    means with their standard deviations."""
    first = results[0]["method"]
    ref = {
        r["seed"]: r["eval"]["student"][key] for r in results if r["method"] == first and key in r["eval"]["student"]
    }
    out: dict[str, list[float]] = {}
    for r in results:
        if r["method"] != first and r["seed"] in ref and key in r["eval"]["student"]:
            out.setdefault(r["method"], []).append(r["eval"]["student"][key] - ref[r["seed"]])
    return out


def paired_table(results: list[dict], keys: list[tuple[str, str, str]]) -> list[str]:
    """Markdown: every method against the first, paired by seed: the mean difference with its 95% interval (Student's
    t, n - 1 degrees of freedom; bold where it excludes 0), and on how many seeds the method came out better (lower
    NLL and KL, higher accuracy, ROUGE-L)."""
    diffs = {k: paired_differences(results, k) for k, _, _ in keys}
    methods = list(dict.fromkeys(m for d in diffs.values() for m in d))
    if not methods:
        return []
    first = results[0]["method"]
    lines = [
        f"Paired by student seed, each method minus {first}: mean difference [95% interval] (better on how many"
        " seeds); **bold**: the interval excludes 0, otherwise no difference is detected:",
        "",
        "| method | " + " | ".join(f"Δ {label}" for _, label, _ in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for m in methods:
        cells = []
        for k, _, fmt in keys:
            d = diffs[k].get(m, [])
            if not d:
                cells.append("-")
                continue
            lower_is_better = k in LOWER_IS_BETTER
            better = sum((x < 0) if lower_is_better else (x > 0) for x in d)
            t = differences_t(d)
            signed = fmt.replace(":", ":+")
            cell = f"{signed.format(t['mean'])} [{signed.format(t['ci95'][0])}, {signed.format(t['ci95'][1])}]"
            cells.append(f"{f'**{cell}**' if t['verdict'] != 'no difference detected' else cell} ({better}/{len(d)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def compare_report(results: list[dict], out: Path, title: str) -> Path:
    """results: one entry per (method, seed) with its eval report and training log; writes the markdown table
    (mean ± std over seeds) and the plots."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in results))
    keys = metric_keys(results[0]["eval"]["student"])
    teacher = results[0]["eval"].get("teacher", {})
    lines = [
        f"# {title}",
        "",
        "| method | seeds | " + " | ".join(label for _, label, _ in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        lines.append(
            f"| {m} | {len(rs)} | "
            + " | ".join(
                _mean_std([r["eval"]["student"][k] for r in rs if k in r["eval"]["student"]], fmt) for k, _, fmt in keys
            )
            + " |"
        )
    if teacher:
        lines.append(
            "| teacher | - | "
            + " | ".join(fmt.format(teacher[k]) if k in teacher else "-" for k, _, fmt in keys)
            + " |"
        )
    lines += ["", *paired_table(results, keys)]
    # Training curves per method (losses differ in scale between methods, so one panel each).
    cols = min(4, len(methods))
    rows_n = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), squeeze=False)
    for ax, m in zip(axes.flat, methods):
        for r in (r for r in results if r["method"] == m):
            steps = [e for e in r["log"] if "loss" in e]
            ax.plot([e["student_step"] for e in steps], [e["loss"] for e in steps], lw=0.8)
        ax.set_title(m, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.supxlabel("student step", fontsize=8), fig.supylabel("training loss (one line per seed)", fontsize=8)
    fig.tight_layout(), fig.savefig(out / "training_curves.png", dpi=100), plt.close(fig)
    lines += ["![training curves](training_curves.png)", ""]
    curve_key = "curve_accuracy" if any("curve_accuracy" in e for r in results for e in r["log"]) else "curve_nll"
    if any(curve_key in e for r in results for e in r["log"]):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = plt.get_cmap("tab20").colors  # 11 methods: the default cycle of 10 would repeat a colour
        for i, m in enumerate(methods):
            runs = [[e for e in r["log"] if curve_key in e] for r in results if r["method"] == m]
            n = min(len(c) for c in runs)
            if n:
                x = [runs[0][i]["input_tokens"] for i in range(n)]
                ax.plot(
                    x,
                    [statistics.mean(c[j][curve_key] for c in runs) for j in range(n)],
                    label=m,
                    marker=".",
                    color=colors[(2 * i) % 20 + (2 * i) // 20],
                    ls="-" if i % 2 == 0 else "--",
                )
        ax.set(xlabel="training tokens (input, non-padding)", ylabel=f"held-out {curve_key[6:]} (mean over seeds)")
        ax.legend(fontsize=7, ncol=2), fig.tight_layout()
        fig.savefig(out / "learning_curves.png", dpi=100), plt.close(fig)
        lines += [f"![{curve_key[6:]} against training tokens](learning_curves.png)", ""]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
