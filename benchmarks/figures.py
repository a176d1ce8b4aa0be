"""Figures beyond the architectures: the effect of alignment on similarity (paper Fig. 4, compare.py), a sweep's
values (sensitivity.py) and the searches' curves of LTB and BMTAS (compare.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def summed_similarity(record: Mapping) -> dict[str, float]:
    """Each task's summed similarity with the other tasks, from a sibling set's ``{"tasks", "matrix"}``."""
    matrix = np.asarray(record["matrix"], dtype=float)
    return {t: float(matrix[i].sum() - matrix[i, i]) for i, t in enumerate(record["tasks"])}


def alignment_figure(with_align: Sequence[Mapping], without_align: Sequence[Mapping], path: str | Path,
                     location: int = 0) -> Path:
    """Bar chart: each task's summed CKA with the other tasks at ``location``, with and without alignment,
    mean ± sample std over seeds (as the tables). Each argument is one sibling-set record (``{"tasks", "matrix"}``)
    per seed."""
    if not with_align or not without_align:
        raise ValueError("the alignment figure needs at least one run with and one without alignment")
    tasks = list(with_align[0]["tasks"])
    fig = Figure(figsize=(1.2 * len(tasks) + 2, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(tasks))
    lowest = np.inf
    for offset, (label, records) in zip((-0.2, 0.2), (("with alignment", with_align),
                                                       ("without alignment", without_align))):
        values = np.array([[summed_similarity(r)[t] for t in tasks] for r in records])
        ax.bar(x + offset, values.mean(0), 0.4, yerr=values.std(0, ddof=1) if len(values) > 1 else None, label=label,
               capsize=3)
        lowest = min(lowest, float(values.min()))
    ax.set_ylim(bottom=max(0.0, lowest - 0.1 * (len(tasks) - 1 - lowest) - 0.01))  # zoom on the differences
    ax.set_xticks(x, tasks)
    ax.set_ylabel("summed CKA with other tasks")
    ax.set_title(f"Task similarity at location {location} before the first grouping")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def sweep_figure(xs: Sequence[float], panels: Mapping[str, Sequence[float | None]], path: str | Path,
                 xlabel: str, kind: str = "line") -> Path:
    """One subplot per entry of ``panels`` (y label → one value per x, ``None`` where a run failed), as lines
    over numeric ``xs`` (``kind="line"``, joined in increasing x whatever their order in ``xs``) or bars over
    categorical ``xs`` (``kind="bar"``). A failed run draws no point, and no bar but the word "failed" (a bar of 0
    would read as a result)."""
    if kind not in ("line", "bar"):
        raise ValueError(f"kind must be 'line' or 'bar', got {kind!r}")
    fig = Figure(figsize=(3.6 * len(panels), 3.0))
    FigureCanvasAgg(fig)
    for index, (ylabel, values) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), index + 1)
        ys = np.array([np.nan if v is None else v for v in values], dtype=float)
        if kind == "line":
            order = np.argsort(np.asarray(xs, dtype=float), kind="stable")
            ax.plot(np.asarray(xs, dtype=float)[order], ys[order], marker="o")
        else:
            ax.bar(np.arange(len(xs)), ys)
            for i in np.flatnonzero(np.isnan(ys)):
                ax.text(i, 0, "failed", ha="center", va="bottom", rotation=90, fontsize=8, color="grey")
            ax.set_xticks(np.arange(len(xs)), [str(x) for x in xs], rotation=30, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


SEARCH_PANELS = {"gate_entropy": "gate entropy (nats)", "derived_gmac": "derived network's trunk GMac",
                 "expected_gflops": "BMTAS expected GFLOPs at 512x512"}


def search_figure(results: Sequence[Mapping], path: str | Path) -> Path:
    """The searches of LTB and BMTAS per epoch (paper-style search curves): mean gate entropy (with its maximum
    ``log T`` dashed), the trunk GMac of the network the gates derive at that epoch, and BMTAS's expected trunk
    GFLOPs (the resource loss without λ). One line per run; ``results`` are run records whose history carries
    ``gate_entropy`` (others are skipped)."""
    runs = [r for r in results if r.get("history") and "gate_entropy" in r["history"][0]]
    if not runs:
        raise ValueError("the search figure needs at least one LTB or BMTAS run with a search history")
    panels = [key for key in SEARCH_PANELS if any(key in h for r in runs for h in r["history"])]
    fig = Figure(figsize=(3.8 * len(panels), 3.0))
    FigureCanvasAgg(fig)
    for index, key in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        for color, run in enumerate(runs):
            points = [(h["epoch"], h[key]) for h in run["history"] if key in h]
            if points:  # one colour per run across the panels
                ax.plot(*zip(*points), color=f"C{color}", label=f"{run['method']} seed {run.get('seed', 0)}")
        if key == "gate_entropy":
            ax.axhline(runs[0]["history"][0]["max_entropy"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(SEARCH_PANELS[key])
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
