"""Drawing branching plans as in the MTSL paper's Fig. 2.

Locations run left to right (shallow to deep), one row per task. Every node, one per (location, group), is a box
spanning the rows of the tasks it serves, labelled with their names on their rows, and coloured by how many tasks
share it (pale: a task node; dark: shared by many). A line joins each node to the node it hangs off one location
shallower (the input for location 0); task heads close each row on the right.

Only the object-oriented matplotlib API is used (``Figure`` + ``FigureCanvasAgg``), never ``pyplot``, so drawing
changes no global matplotlib state (backend, current figure) of the calling program.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import FancyBboxPatch, Patch
from matplotlib.textpath import TextPath

from mtsl_plugin.plan import BranchingPlan

BOX_WIDTH = 0.62  # in location units
BOX_HEIGHT = 0.72  # in task-row units
COLUMN_INCHES = 0.68
ROW_INCHES = 0.42
DPI = 120
_CMAP = "YlGnBu"
_EDGE_COLOUR = "#555555"


def task_rows(plan: BranchingPlan) -> dict[str, int]:
    """Row of each task (0 = top), ordered so that every group of every location occupies adjacent rows.

    Sorting tasks by the index of their group at each location, shallow to deep, lists the plan's tree depth
    first; because each partition refines the previous one, every group is then a contiguous block.
    """
    def key(task: str) -> tuple[int, ...]:
        return tuple(next(i for i, g in enumerate(p) if task in g) for p in plan.partitions) + (
            plan.tasks.index(task),)

    return {task: row for row, task in enumerate(sorted(plan.tasks, key=key))}


def share_colour(group_size: int, num_tasks: int) -> tuple[float, float, float]:
    """Fill colour of a node shared by ``group_size`` of ``num_tasks`` tasks (pale for 1, dark for all)."""
    fraction = 0.0 if num_tasks <= 1 else (group_size - 1) / (num_tasks - 1)
    return to_rgb(matplotlib.colormaps[_CMAP](0.12 + 0.76 * fraction))


def _text_colour(fill: tuple[float, float, float]) -> str:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return "white" if luminance < 0.5 else "black"


def _font_size(names: Sequence[str]) -> float:
    """A font size (points): smaller for longer names, down to 5 points (:func:`column_inches` widens the boxes
    where the longest name would still overflow one)."""
    longest = max(len(n) for n in names)
    return max(5.0, min(9.0, 44.0 / max(longest, 1)))


def column_inches(names: Sequence[str]) -> float:
    """Inches per location: :data:`COLUMN_INCHES`, or wider where the widest name, in bold at :func:`_font_size`
    (as the heads write it), would overflow a box (it spilled out, white on white beside a dark node)."""
    font = FontProperties(weight="bold", size=_font_size(names))
    widest = max(TextPath((0, 0), name, prop=font).get_extents().width for name in names) / 72  # points to inches
    return max(COLUMN_INCHES, 1.5 * widest / BOX_WIDTH)  # the axes take about 3/4 of the width (the margins)


def figure_size(plan: BranchingPlan) -> tuple[float, float]:
    """Inches (width, height) of one panel: a column per location plus input and heads, a row per task."""
    return column_inches(plan.tasks) * (plan.num_locations + 2) + 0.5, ROW_INCHES * len(plan.tasks) + 1.9


def draw_plan(
    plan: BranchingPlan,
    ax: Axes | None = None,
    title: str | None = None,
    location_labels: Sequence[str] | None = None,
    *,
    colour_max: int | None = None,
) -> Axes:
    """Draw ``plan`` on ``ax`` (a fresh Agg-backed figure when ``None``) and return the axes.

    ``location_labels`` names the locations on the x axis (default ``0 .. L-1``); it needs one entry per location.
    ``colour_max`` is the group size drawn darkest (default, and at least: the plan's number of tasks); panels
    drawn side by side share one so that a colour means the same group size in all of them.
    """
    if not isinstance(plan, BranchingPlan):
        raise TypeError(f"draw_plan needs a BranchingPlan, got {type(plan).__name__}")
    num_locations = plan.num_locations
    if location_labels is None:
        location_labels = [str(l) for l in range(num_locations)]
    if len(location_labels) != num_locations:
        raise ValueError(
            f"location_labels has {len(location_labels)} entries but the plan has {num_locations} locations"
        )
    if ax is None:
        figure = Figure(figsize=figure_size(plan), dpi=DPI)
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()

    rows = task_rows(plan)
    num_tasks = len(plan.tasks)
    colour_max = num_tasks if colour_max is None else max(colour_max, num_tasks)
    font = _font_size(plan.tasks)
    half_w, half_h = BOX_WIDTH / 2, BOX_HEIGHT / 2

    def centre(group: Sequence[str]) -> float:
        return sum(rows[t] for t in group) / len(group)

    def box(x: float, top: float, bottom: float, fill, rounded: bool = True) -> None:
        style = "round,pad=0,rounding_size=0.08" if rounded else "square,pad=0"
        ax.add_patch(FancyBboxPatch((x - half_w, top - half_h), BOX_WIDTH, bottom - top + BOX_HEIGHT,
                                    boxstyle=style, facecolor=fill, edgecolor="#333333",
                                    linewidth=0.8 if rounded else 1.4, zorder=2))

    def edge(x_from: float, x_to: float, y: float) -> None:
        ax.plot([x_from + half_w, x_to - half_w], [y, y], color=_EDGE_COLOUR, linewidth=1.2, zorder=1)

    # the input: one box across all rows
    box(-1, 0, num_tasks - 1, "#e6e6e6")
    tall = num_tasks >= 3
    ax.text(-1, (num_tasks - 1) / 2, "input" if tall else "in", rotation=90 if tall else 0,
            ha="center", va="center", fontsize=font, zorder=3)

    for location, partition in enumerate(plan.partitions):
        for group in partition:
            fill = share_colour(len(group), colour_max)
            group_rows = [rows[t] for t in group]
            box(location, min(group_rows), max(group_rows), fill)
            for task in group:
                ax.text(location, rows[task], task, ha="center", va="center", fontsize=font,
                        color=_text_colour(fill), zorder=3)
            edge(location - 1, location, centre(group))

    # task heads, each hanging off its task's deepest node
    head_x = num_locations
    for task, row in rows.items():
        box(head_x, row, row, "white", rounded=False)
        ax.text(head_x, row, task, ha="center", va="center", fontsize=font, fontweight="bold", zorder=3)
        edge(head_x - 1, head_x, row)

    ax.set_xlim(-1.6, head_x + 0.6)
    ax.set_ylim(num_tasks - 1 + 0.7, -0.7)
    ax.set_aspect(ROW_INCHES / column_inches(plan.tasks), adjustable="box")  # rows and columns keep their size
    ax.set_xticks(range(-1, head_x + 1), ["in", *location_labels, "heads"], fontsize=max(font - 1, 5))
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("location (shallow → deep)", fontsize=8)
    if title is not None:
        ax.set_title(title, fontsize=10)
    return ax


def draw_plans(
    plans: Mapping[str, BranchingPlan],
    path: str | Path,
    location_labels: Sequence[str] | None = None,
) -> Path:
    """Draw ``plans`` side by side, one panel per plan titled with its key, and save a PNG at ``path``.

    ``location_labels`` applies to every panel, so then all plans need that many locations. Parent folders are
    created. Returns the path written.
    """
    if not plans:
        raise ValueError("draw_plans needs at least one plan")
    for name, plan in plans.items():
        if not isinstance(plan, BranchingPlan):
            raise TypeError(f"plan {name!r} is a {type(plan).__name__}, not a BranchingPlan")
        if location_labels is not None and len(location_labels) != plan.num_locations:
            raise ValueError(
                f"plan {name!r} has {plan.num_locations} locations but location_labels has {len(location_labels)}"
            )
    sizes = [figure_size(plan) for plan in plans.values()]
    figure = Figure(figsize=(sum(w for w, _ in sizes), max(h for _, h in sizes)), dpi=DPI)
    FigureCanvasAgg(figure)
    largest = max(len(plan.tasks) for plan in plans.values())
    axes = figure.subplots(1, len(plans), squeeze=False, width_ratios=[w for w, _ in sizes])[0]
    for ax, (name, plan) in zip(axes, plans.items()):
        draw_plan(plan, ax=ax, title=name, location_labels=location_labels, colour_max=largest)
    legend_sizes = sorted({1, largest} | {len(g) for plan in plans.values() for p in plan.partitions for g in p})
    figure.legend(
        handles=[Patch(facecolor=share_colour(k, largest), edgecolor="#333333",
                       label="task node" if k == 1 else f"shared by {k}") for k in legend_sizes],
        loc="lower center", ncol=len(legend_sizes), fontsize=7, frameon=False,
    )
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path
