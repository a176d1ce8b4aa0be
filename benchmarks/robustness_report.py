"""The tables, CSV and figures of a robustness report (``benchmarks/robustness.py``): the mean ± std over seeds of
every run's clean, corrupted and attacked metrics, as ``robustness.json``, ``robustness.csv``, ``robustness.md``,
``corruptions.png`` and ``pgd.png``.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.report import (escape_cell, first_line_of, significant_decimals, with_failures,
                               with_provenance_note, write_markdown, write_rows_csv)
from mtsl_plugin.experiment import write_json
from mtsl_plugin.tasks import HIGHER_IS_BETTER, METRIC_NAMES


def eps_key(eps: float) -> str:
    """The JSON/CSV key and table label of a budget: ``0.25``, ``0.5``, ``1``, ``2`` (``{:g}``, as in every report
    so far; budgets that agree to its 6 significant digits are refused by
    :func:`~benchmarks.robustness.check_budgets`)."""
    return f"{eps:g}"


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label (first-seen order): ``{"ok", "runs", "errors", "clean", "categories", "pgd"}`` (the last three
    only when a seed succeeded), every number of the runs' records replaced by ``[mean, std, n]`` over the
    label's successful seeds (sample std, 0 for one)."""
    def stat(values: list[float]) -> list[float]:
        return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)]

    def merge(items: list[Any]) -> Any:
        if isinstance(items[0], Mapping):
            return {k: merge([i[k] for i in items]) for k in items[0]}
        return stat([float(i) for i in items])

    summary: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        group = [r for r in runs if r["label"] == label]
        ok = [r for r in group if r["status"] == "ok"]
        entry: dict[str, Any] = {"ok": len(ok), "runs": len(group),
                                 "errors": [r.get("error") or "unknown error" for r in group if r["status"] != "ok"]}
        if ok:
            entry.update({k: merge([r[k] for r in ok]) for k in ("clean", "categories", "pgd")})
        summary[label] = entry
    return summary


def _cell(stat: Sequence[float] | None) -> str:
    if stat is None:
        return "—"
    mean, std, n = stat
    places = significant_decimals(mean)  # 4 significant figures, as the comparison table's
    return f"{mean:.{places}f}" if n <= 1 else f"{mean:.{places}f} ± {std:.{places}f}"


def _header(task: str, labels: Mapping[str, str] | None = None) -> str:
    """``labels[task]`` when given (a run's own metric name and direction, see :func:`task_labels`), else the
    built-in task's label, e.g. ``S mIoU ↑``."""
    if labels and task in labels:
        return labels[task]
    return f"{task} {METRIC_NAMES.get(task, '')} {'↑' if HIGHER_IS_BETTER.get(task, True) else '↓'}".replace("  ", " ")


def task_labels(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Each task's column label from the runs' records (declared tasks bring their own metric and direction)."""
    labels: dict[str, str] = {}
    for run in runs:
        for task, higher in (run.get("higher_is_better") or {}).items():
            name = (run.get("metric_names") or {}).get(task, "")
            labels.setdefault(task, f"{task} {name} {'↑' if higher else '↓'}".replace("  ", " "))
    return labels


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _failed_row(label: str, entry: Mapping[str, Any], width: int) -> str:
    error = str(entry["errors"][0] if entry["errors"] else "unknown error")
    return _row([label, f"failed: {escape_cell(first_line_of(error))}"] + ["—"] * (width - 2))


def corruption_table(summary: Mapping[str, Mapping[str, Any]], tasks: Sequence[str],
                     categories: Sequence[str], labels: Mapping[str, str] | None = None) -> str:
    """Markdown: one row per label; per task a clean column and one per corruption category."""
    columns = ["clean", *categories]
    headers = ["Method"] + [f"{_header(t, labels)} {c}" if c == "clean" else f"{t} {c}" for t in tasks for c in columns]
    lines = [_row(headers), "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for label, entry in summary.items():
        if not entry["ok"]:
            lines.append(_failed_row(label, entry, len(headers)))
            continue
        cells = [_cell(entry["clean"].get(t) if c == "clean" else entry["categories"][c].get(t))
                 for t in tasks for c in columns]
        lines.append(_row([with_failures(label, entry["runs"] - entry["ok"], entry["runs"]), *cells]))
    return "\n".join(lines) + "\n"


def pgd_table(summary: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], attack_tasks: Sequence[str],
              epsilons: Sequence[float], labels: Mapping[str, str] | None = None) -> str:
    """Markdown: one row per label and attacked task; per task one column per ε."""
    headers = ["Method", "Attacked"] + [f"{_header(t, labels)} ε={e:g}" if i == 0 else f"{t} ε={e:g}"
                                        for t in tasks for i, e in enumerate(epsilons)]
    lines = [_row(headers), "|" + "|".join([":---", ":---"] + ["---:"] * (len(headers) - 2)) + "|"]
    for label, entry in summary.items():
        if not entry["ok"]:
            lines.append(_failed_row(label, entry, len(headers)))
            continue
        name = with_failures(label, entry["runs"] - entry["ok"], entry["runs"])
        for attacked in attack_tasks:
            cells = [_cell(entry["pgd"][attacked][eps_key(e)].get(t)) for t in tasks for e in epsilons]
            lines.append(_row([name, attacked, *cells]))
    return "\n".join(lines) + "\n"


def csv_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per number of every successful run: label, method, seed, kind (clean, corruption, category, pgd),
    perturbation (corruption, category or attacked task), level (severity or ε), task, metric, value."""
    rows = []

    def add(run: Mapping[str, Any], kind: str, perturbation: str, level: str, scores: Mapping[str, float]) -> None:
        for task, value in scores.items():
            rows.append({"label": run["label"], "method": run["method"], "seed": run["seed"], "kind": kind,
                         "perturbation": perturbation, "level": level, "task": task,
                         "metric": run["metric_names"].get(task, ""), "value": repr(float(value))})

    for run in (r for r in runs if r["status"] == "ok"):
        add(run, "clean", "", "", run["clean"])
        for name, levels in run["corruptions"].items():
            for severity, scores in levels.items():
                add(run, "corruption", name, severity, scores)
        for category, scores in run["categories"].items():
            add(run, "category", category, "", scores)
        for attacked, levels in run["pgd"].items():
            for eps, scores in levels.items():
                add(run, "pgd", attacked, eps, scores)
    return rows


def _plot(ax, x: Sequence[float], stats: Sequence[Sequence[float]], label: str) -> None:
    means, stds = [s[0] for s in stats], [s[1] for s in stats]
    ax.errorbar(x, means, yerr=stds if any(stds) else None, marker="o", capsize=3, label=label)


def corruption_figure(summary: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], categories: Sequence[str],
                      path: Path, labels: Mapping[str, str] | None = None) -> Path:
    """Per task a subplot: its metric on the clean and on each category's corrupted test set, one line per label."""
    fig = Figure(figsize=(3.2 * len(tasks) + 0.6, 3.2))
    FigureCanvasAgg(fig)
    columns = ["clean", *categories]
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for label, entry in summary.items():
            if entry["ok"]:
                _plot(ax, range(len(columns)), [entry["clean"][task]] + [entry["categories"][c][task]
                                                                           for c in categories], label)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_title(_header(task, labels))
        ax.legend(fontsize=7)
    fig.suptitle("Natural corruptions (mean over corruptions and severities 1-5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def pgd_figure(summary: Mapping[str, Mapping[str, Any]], attack_tasks: Sequence[str], epsilons: Sequence[float],
               path: Path, labels: Mapping[str, str] | None = None) -> Path:
    """Per attacked task a subplot: that task's metric against ε (0 = clean), one line per label."""
    fig = Figure(figsize=(3.6 * len(attack_tasks) + 0.6, 3.2))
    FigureCanvasAgg(fig)
    for i, task in enumerate(attack_tasks):
        ax = fig.add_subplot(1, len(attack_tasks), i + 1)
        for label, entry in summary.items():
            if entry["ok"]:
                _plot(ax, [0.0, *epsilons], [entry["clean"][task]] + [entry["pgd"][task][eps_key(e)][task]
                                                                        for e in epsilons], label)
        ax.set_xlabel("ε (0-255 scale)")
        ax.set_title(f"PGD on {task}: {_header(task, labels)}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_report(folder: Path, meta: Mapping[str, Any], runs: list[dict[str, Any]], tasks: Sequence[str],
                 categories: Sequence[str], epsilons: Sequence[float], attack_tasks: Sequence[str]) -> str:
    """Write robustness.json/.csv/.md and the figures into ``folder``; return the Markdown (with
    :func:`~benchmarks.report.provenance_note` under it when the runs were trained by other software or machines)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = task_labels(runs)
    summary = summarise(runs)
    write_json(folder / "robustness.json", {**meta, "runs": runs, "summary": summary})
    write_rows_csv(["label", "method", "seed", "kind", "perturbation", "level", "task", "metric", "value"],
                   csv_rows(runs), folder / "robustness.csv")
    parts = []
    if categories:
        parts.append(f"## Natural corruptions\n\nEach category: the mean over its corruptions and severities 1-5 "
                     f"({meta.get('corruptions_package') or 'package version not recorded'}).\n\n"
                     + corruption_table(summary, tasks, categories, labels))
        corruption_figure(summary, tasks, categories, folder / "corruptions.png", labels)
    if epsilons and attack_tasks:
        parts.append("## PGD attacks\n\nL∞ PGD on the attacked task's loss; ε on the 0-255 scale; every task's "
                     "metric under the attack.\n\n" + pgd_table(summary, tasks, attack_tasks, epsilons, labels))
        pgd_figure(summary, attack_tasks, epsilons, folder / "pgd.png", labels)
    text = "\n".join(parts) or "Nothing to evaluate: no corruption category and no PGD attack was asked for.\n"
    text = with_provenance_note(text, runs)
    write_markdown(text, folder / "robustness.md")  # every part, and the note, ends in a newline: the same text
    return text
