"""Turning per-run results into the comparison table: Δ_MTL, aggregation over seeds, Markdown and CSV.

A run's result is a plain dict (one per method and seed)::

    {"method": "mtsl", "seed": 0, "metrics": {"S": 0.41, "D": 0.62, ...}, "delta_mtl": 1.3, "delta_sd": 2.0,
     "params_m": 31.2, "gmac": 18.4, "train_seconds": 812.0, "status": "ok", "error": None}

:func:`aggregate` groups runs by method into mean and sample standard deviation over seeds; :func:`format_table`
renders them as the paper-style table; :func:`write_csv` keeps every number at full precision.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mtsl_plugin.checkpoint import atomic_write
from mtsl_plugin.provenance import describe

#: Numeric fields of a run other than the per-task metrics, in table order.
SCALAR_FIELDS: tuple[str, ...] = ("delta_sd", "delta_mtl", "params_m", "gmac", "train_seconds")
_HEADERS = {"delta_sd": "Δ_SD (%)", "delta_mtl": "Δ_MTL (%)", "params_m": "Params (M)", "gmac": "GMac",
            "train_seconds": "Train (s)"}
_MISSING = "—"


def delta_mtl(
    metrics: Mapping[str, float],
    reference: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    tasks: Sequence[str] | None = None,
) -> float:
    """Δ_MTL in percent: the mean over ``tasks`` of ``±(M_multi − M_single) / |M_single| × 100``.

    The sign is ``+`` for metrics where higher is better and ``−`` where lower is better, so a positive Δ means
    the multi-task model beats the single-task ``reference`` on average. Dividing by the reference's magnitude
    (the usual ``M_single`` for the positive metrics of the built-in tasks) keeps that meaning for a metric that
    can be negative, e.g. a cosine similarity. ``tasks`` defaults to the reference's tasks; Δ_SD is
    ``tasks=("S", "D")``.
    """
    tasks = list(reference) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("delta_mtl needs at least one task")
    total = 0.0
    for task in tasks:
        for name, mapping in (("metrics", metrics), ("reference", reference), ("higher_is_better", higher_is_better)):
            if task not in mapping:
                raise ValueError(f"task {task!r} is missing from {name} (it has {sorted(mapping)})")
        for name, value in (("metric", metrics[task]), ("single-task reference", reference[task])):
            if not math.isfinite(value):  # a metric that saw no valid pixel is NaN: no Δ rather than a NaN one
                raise ValueError(f"task {task!r} has a {name} of {value}, so its relative change is undefined")
        if reference[task] == 0:
            raise ValueError(f"task {task!r} has a zero single-task reference, so its relative change is undefined")
        sign = 1.0 if higher_is_better[task] else -1.0
        total += sign * (metrics[task] - reference[task]) / abs(reference[task])
    return 100.0 * total / len(tasks)


# ----------------------------------------------------------------------------------------------- aggregation
def _stat(values: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "std", "n"}`` of ``values`` (sample std, 0 for a single value, NaN where a value is NaN or
    infinite, e.g. a metric over no valid pixel: the mean is then NaN or infinite too); ``None`` when empty."""
    if not values:
        return None
    if len(values) == 1:
        std = 0.0
    else:
        std = statistics.stdev(values) if all(map(math.isfinite, values)) else math.nan
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Group ``runs`` by method (first-seen order) and average every numeric field over the successful seeds.
    A run's ``label`` (a variant of a method, e.g. ``mtsl_threshold0.5``), when present, names its row instead.

    Returns ``{method: entry}`` with ``entry`` holding ``method`` (the row name), ``runs``, ``ok``, ``failed`` (counts),
    ``seeds`` and ``failed_seeds``, ``errors`` (the failed runs' messages), ``metrics`` (``{task: stat}``) and one
    stat per field of :data:`SCALAR_FIELDS`. A stat is ``{"mean", "std", "n"}`` (sample standard deviation,
    0 for one seed) over the successful runs that report the field, or ``None`` when none does. Failed runs are
    counted, never averaged.
    """
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for index, run in enumerate(runs):
        if "method" not in run:
            raise ValueError(f"run {index} has no 'method'")
        if run.get("status") not in ("ok", "failed"):
            raise ValueError(
                f"run {index} ({run['method']}) has status {run.get('status')!r}; expected 'ok' or 'failed'"
            )
        grouped.setdefault(str(run.get("label") or run["method"]), []).append(run)

    aggregated: dict[str, dict[str, Any]] = {}
    for method, group in grouped.items():
        ok = [r for r in group if r["status"] == "ok"]
        failed = [r for r in group if r["status"] == "failed"]
        tasks: list[str] = []
        for run in ok:
            tasks += [t for t in run.get("metrics", {}) if t not in tasks]
        entry: dict[str, Any] = {
            "method": method,
            "runs": len(group),
            "ok": len(ok),
            "failed": len(failed),
            "seeds": [r.get("seed") for r in ok],
            "failed_seeds": [r.get("seed") for r in failed],
            "errors": [str(r.get("error") or "unknown error") for r in failed],
            "metrics": {t: _stat([float(r["metrics"][t]) for r in ok if r["metrics"].get(t) is not None])
                        for t in tasks},
        }
        for field in SCALAR_FIELDS:
            entry[field] = _stat([float(r[field]) for r in ok if r.get(field) is not None])
        aggregated[method] = entry
    return aggregated


# ----------------------------------------------------------------------------------------------- Markdown
def significant_decimals(value: float, significant: int = 4) -> int:
    """Decimals showing ``significant`` significant figures of ``value`` (at most 6)."""
    if value == 0 or not math.isfinite(value):
        return significant
    return min(6, max(0, significant - 1 - math.floor(math.log10(abs(value)))))


def _cell(stat: Mapping[str, float] | None, decimals: int | None = None, signed: bool = False,
          seeds: int | None = None) -> str:
    """``"mean ± std"``, or just the mean for a single seed; ``decimals=None`` keeps 4 significant figures. A stat
    over fewer than the row's ``seeds`` successful runs (a Δ where the STN of some seed failed) adds
    ``"(n of seeds seeds)"``, so that it is not read as covering the same seeds as the rest of its row."""
    if stat is None:
        return _MISSING
    places = significant_decimals(stat["mean"]) if decimals is None else decimals
    mean = f"{stat['mean']:{'+' if signed else ''}.{places}f}"
    text = mean if stat["n"] <= 1 else f"{mean} ± {stat['std']:.{places}f}"
    return text if seeds is None or stat["n"] >= seeds else f"{text} ({stat['n']} of {seeds} seeds)"


def escape_cell(text: str) -> str:
    """``text`` as one Markdown table cell: on one line, its ``|`` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def first_line_of(error: str, limit: int = 60) -> str:
    """The first line of an error message, cut to ``limit`` characters."""
    first_line = (error.strip().splitlines() or ["unknown error"])[0]
    return first_line if len(first_line) <= limit else first_line[: limit - 1] + "…"


def with_failures(label: str, failed: int, runs: int) -> str:
    """A row's label, saying how many of its runs failed when some did (its cells then cover fewer seeds)."""
    return f"{label} ({failed} of {runs} runs failed)" if failed else label


def format_table(
    aggregated: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str],
    higher_is_better: Mapping[str, bool],
    metric_names: Mapping[str, str] | None = None,
) -> str:
    """The comparison table in Markdown, one row per method of :func:`aggregate`'s output.

    Columns: Method, one per task (``"S mIoU ↑"``: task, metric name, direction), Δ_SD (%), Δ_MTL (%),
    Params (M), GMac, Train (s). Cells read ``mean ± std`` (just the mean for one seed); ``—`` marks a missing
    value, and ``(n of k seeds)`` a value that fewer of the row's k successful seeds have (a Δ without its STN).
    ``metric_names`` defaults to the built-in tasks' names (a task without one shows its name only). A method whose
    runs all failed shows ``failed: <first error>``; a partly failed one notes the count.
    """
    if metric_names is None:
        from mtsl_plugin.tasks import METRIC_NAMES  # deferred: the tasks module pulls in torch

        metric_names = METRIC_NAMES
    for task in tasks:
        if task not in higher_is_better:
            raise ValueError(f"task {task!r} has no entry in higher_is_better")
    headers = ["Method"]
    for task in tasks:
        name = f"{task} {metric_names[task]}" if task in metric_names else task
        headers.append(f"{name} {'↑' if higher_is_better[task] else '↓'}")
    headers += [_HEADERS[f] for f in SCALAR_FIELDS]

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for method, entry in aggregated.items():
        label = escape_cell(method)
        if entry["ok"] == 0:
            first_error = entry["errors"][0] if entry["errors"] else "unknown error"
            cells = [f"failed: {escape_cell(first_line_of(first_error))}"] + [_MISSING] * (len(headers) - 2)
        else:
            label = with_failures(label, entry["failed"], entry["runs"])
            seeds = entry["ok"]
            cells = [_cell(entry["metrics"].get(task), seeds=seeds) for task in tasks]
            cells += [_cell(entry["delta_sd"], 2, signed=True, seeds=seeds),
                      _cell(entry["delta_mtl"], 2, signed=True, seeds=seeds), _cell(entry["params_m"], 2, seeds=seeds),
                      _cell(entry["gmac"], 2, seeds=seeds), _cell(entry["train_seconds"], 1, seeds=seeds)]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(results: Sequence[Mapping[str, Any]], lead: Sequence[str],
                  rows: Sequence[tuple[Sequence[str], str]]) -> str:
    """A sweep's or an ablation's table in Markdown: per row its ``lead`` cells (e.g. the threshold), then Δ_SD,
    Δ_MTL, params, GMac (mean ± std over seeds, ``(n of k seeds)`` as in :func:`format_table`) and the first seed's
    converged plan of the runs labelled ``label``. ``rows`` holds ``(lead cells, label)`` pairs; a row whose runs
    all failed says so."""
    entries = aggregate(results)
    plans: dict[str, str] = {}
    for r in results:
        if r.get("status") == "ok" and r.get("plan_text"):
            plans.setdefault(str(r.get("label") or r["method"]), r["plan_text"])
    headers = [*lead, "Δ_SD (%)", "Δ_MTL (%)", "Params (M)", "GMac", "Converged plan"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] * len(lead) + ["---:"] * 4 + [":---"]) + "|"]
    for cells, label in rows:
        entry = entries.get(label)
        if entry is None or entry["ok"] == 0:
            error = first_line_of(entry["errors"][0]) if entry and entry["errors"] else "not run"
            values = [f"failed: {escape_cell(error)}"] + [_MISSING] * 4
        else:
            seeds = entry["ok"]
            values = [_cell(entry["delta_sd"], 2, signed=True, seeds=seeds),
                      _cell(entry["delta_mtl"], 2, signed=True, seeds=seeds), _cell(entry["params_m"], 2, seeds=seeds),
                      _cell(entry["gmac"], 2, seeds=seeds), escape_cell(plans.get(label, _MISSING))]
        lines.append("| " + " | ".join([*cells, *values]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- files
def csv_rows(aggregated: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[dict[str, str]]]:
    """Column names and one flat row per method: counts, seeds, ``<task>_mean``/``<task>_std``/``<task>_n`` per
    task, then ``<field>_mean``/``<field>_std``/``<field>_n`` per scalar field (``_n``: the seeds the value is over,
    fewer than ``ok`` where the table says "(n of k seeds)"), and the failed runs' errors. Floats keep full
    precision (``repr``); missing values are empty strings."""
    tasks: list[str] = []
    for entry in aggregated.values():
        tasks += [t for t in entry["metrics"] if t not in tasks]
    stats = [(t, lambda e, t=t: e["metrics"].get(t)) for t in tasks]
    stats += [(f, lambda e, f=f: e[f]) for f in SCALAR_FIELDS]
    columns = ["method", "runs", "ok", "failed", "seeds", "failed_seeds"]
    columns += [f"{name}_{part}" for name, _ in stats for part in ("mean", "std", "n")] + ["errors"]
    rows = []
    for entry in aggregated.values():
        row = {"method": entry["method"], "runs": str(entry["runs"]), "ok": str(entry["ok"]),
               "failed": str(entry["failed"]), "seeds": ";".join(map(str, entry["seeds"])),
               "failed_seeds": ";".join(map(str, entry["failed_seeds"])), "errors": " || ".join(entry["errors"])}
        for name, get in stats:
            stat = get(entry)
            row[f"{name}_mean"] = "" if stat is None else repr(float(stat["mean"]))
            row[f"{name}_std"] = "" if stat is None else repr(float(stat["std"]))
            row[f"{name}_n"] = "" if stat is None else str(stat["n"])
        rows.append(row)
    return columns, rows


def write_csv(aggregated: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Write :func:`csv_rows` of ``aggregated`` to ``path`` (:func:`write_rows_csv`) and return the path."""
    return write_rows_csv(*csv_rows(aggregated), path)


def write_rows_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` under ``columns`` as CSV to ``path`` (parent folders created; atomically, as
    :func:`write_markdown`) and return the path."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def write_markdown(text: str, path: str | Path) -> Path:
    """Write ``text`` (ending in a newline) to ``path`` (parent folders created) and return the path. The file is
    written to a temporary one and renamed over ``path`` (:func:`~mtsl_plugin.checkpoint.atomic_write`): a
    command stopped or failing meanwhile (Ctrl-C, a full disk) leaves the previous table whole."""
    data = (text if text.endswith("\n") else text + "\n").encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def earlier_report(path: Path, matches: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any] | None:
    """The JSON report already at ``path`` when ``matches(report)`` (it was made with the same settings, so the new
    results extend it), ``None`` when there is none. A report that cannot be read or was made with other settings
    is refused with a ``ValueError`` of one sentence naming its folder: it is never replaced."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        same = matches(report)
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} cannot be read as {what}; it is kept: move it away or choose another --out") from None
    if not same:
        raise ValueError(f"{path.parent} holds {what} of other settings; it is kept: choose another --out or move "
                         "it away")
    return report


def provenance_note(results: Sequence[dict[str, Any]]) -> str | None:
    """A line for under a table whose finished runs were trained by different software, on different machines or
    data files (each run's ``trained_by`` entries as :func:`~mtsl_plugin.provenance.describe` words them): which
    runs each was, so that nobody reads a Δ against an STN of other code, or compares timings of two machines,
    unwarned. ``None`` when all agree."""
    rows: dict[str, dict[str, list[int]]] = {}  # what trained them -> row label -> seeds
    for r in results:
        if r["status"] == "ok":
            for entry in r.get("trained_by") or [None]:
                seeds = rows.setdefault(describe(entry), {}).setdefault(r.get("label") or r["method"], [])
                if r["seed"] not in seeds:
                    seeds.append(r["seed"])
    if len(rows) < 2:
        return None

    def runs(labels: dict[str, list[int]]) -> str:
        return ", ".join(f"{label} seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
                         for label, seeds in labels.items())

    return ("Note: these runs were not all trained by the same software on the same machine and data, so their "
            "numbers, and more so their times, may not compare (each run's result.json: trained_by): "
            + "; ".join(f"{runs(labels)}: {what}" for what, labels in rows.items()))


def with_provenance_note(table: str, results: Sequence[dict[str, Any]]) -> str:
    """``table`` with :func:`provenance_note` under it, when there is one."""
    note = provenance_note(results)
    return table if note is None else f"{table.rstrip()}\n\n{note}\n"
