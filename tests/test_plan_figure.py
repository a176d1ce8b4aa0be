"""Drawing branching plans: valid PNGs, distinct images for distinct plans, no global matplotlib state."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plan_figure import draw_plan, draw_plans, figure_size, task_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ("S", "E", "D", "N", "A")


def _mtsl_plan() -> BranchingPlan:
    return BranchingPlan(TASKS, [[TASKS]] * 6 + [[("S", "E"), ("D", "N", "A")]] * 3 + [[("S", "E"), ("D",), ("N", "A")]])


def _random_plan(rng: np.random.Generator, num_tasks: int, num_locations: int) -> BranchingPlan:
    """A random valid plan: start from one group and split groups at random deeper down."""
    tasks = [f"t{i}" for i in range(num_tasks)]
    partition = [tasks]
    partitions = []
    for _ in range(num_locations):
        refined = []
        for group in partition:
            if len(group) > 1 and rng.random() < 0.3:
                cut = int(rng.integers(1, len(group)))
                shuffled = list(rng.permutation(group))
                refined += [shuffled[:cut], shuffled[cut:]]
            else:
                refined.append(group)
        partition = refined
        partitions.append(partition)
    return BranchingPlan(tasks, partitions)


def _pixels(path) -> np.ndarray:
    return imread(path)


def test_draw_plans_writes_a_valid_nontrivial_png(tmp_path):
    plans = {"MTSL": _mtsl_plan(), "STN": BranchingPlan.single_task(TASKS, 10)}
    path = draw_plans(plans, tmp_path / "sub" / "plans.png")
    assert path == tmp_path / "sub" / "plans.png"
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    pixels = _pixels(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 1000  # two wide panels side by side
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_different_plans_give_different_images(tmp_path):
    a = draw_plans({"plan": BranchingPlan.one_net(TASKS, 10)}, tmp_path / "a.png")
    b = draw_plans({"plan": BranchingPlan.single_task(TASKS, 10)}, tmp_path / "b.png")
    c = draw_plans({"plan": _mtsl_plan()}, tmp_path / "c.png")
    again = draw_plans({"plan": _mtsl_plan()}, tmp_path / "c_again.png")
    images = [_pixels(p) for p in (a, b, c)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert images[i].shape != images[j].shape or not np.array_equal(images[i], images[j])
    assert np.array_equal(_pixels(c), _pixels(again))  # drawing is deterministic


@pytest.mark.parametrize("num_tasks, num_locations", [(1, 1), (2, 12), (7, 1), (7, 12), (4, 5)])
def test_draws_any_size_from_one_to_seven_tasks_and_twelve_locations(tmp_path, num_tasks, num_locations):
    rng = np.random.default_rng(num_tasks * 100 + num_locations)
    plans = {"random": _random_plan(rng, num_tasks, num_locations),
             "stn": BranchingPlan.single_task([f"t{i}" for i in range(num_tasks)], num_locations)}
    path = draw_plans(plans, tmp_path / "plan.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 3_000


def test_draw_plan_draws_one_box_per_node_plus_input_and_heads():
    plan = _mtsl_plan()
    ax = draw_plan(plan, title="MTSL")
    nodes = sum(len(p) for p in plan.partitions)
    assert len(ax.patches) == nodes + 1 + len(plan.tasks)
    edges = nodes + len(plan.tasks)  # one per node to its parent (or the input), one per head
    assert len(ax.lines) == edges
    assert ax.get_title() == "MTSL"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["in", *map(str, range(10)), "heads"]


@pytest.mark.parametrize("tasks", [("S", "D", "E"), ("segmentation", "depth", "surface_normal"),
                                   ("a_very_long_task_name_indeed", "b")])
def test_every_name_fits_inside_its_box(tasks):
    """At the 5-point floor of the font a name of 8 letters or more overflowed its box, and on a dark node the
    white text beyond it vanished; the columns now widen for long names."""
    plan = BranchingPlan(tasks, [[list(tasks)]] * 2 + [[[t] for t in tasks]] * 2)
    figure = Figure(figsize=figure_size(plan))
    FigureCanvasAgg(figure)
    ax = draw_plan(plan, ax=figure.add_subplot())
    renderer = figure.canvas.get_renderer()
    boxes = [patch.get_window_extent(renderer) for patch in ax.patches[1:]]  # the nodes and heads
    for text in ax.texts[1:]:  # after the input's
        extent = text.get_window_extent(renderer)
        centre = ((extent.x0 + extent.x1) / 2, (extent.y0 + extent.y1) / 2)
        box = next(b for b in boxes if b.contains(*centre))
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text.get_text()


def test_shared_nodes_look_different_from_task_nodes():
    ax = draw_plan(_mtsl_plan())
    colours = {tuple(np.round(p.get_facecolor(), 3)) for p in ax.patches}
    # input, heads, and nodes shared by 1, 2, 3 and 5 tasks all differ
    assert len(colours) == 6


def test_every_node_box_covers_the_rows_of_its_tasks_and_no_other():
    plan = _mtsl_plan()
    ax, rows = draw_plan(plan), task_rows(plan)
    nodes = [group for partition in plan.partitions for group in partition]
    for group, box in zip(nodes, ax.patches[1:]):  # after the input's box, in drawing order
        covered = {t for t, row in rows.items() if box.get_y() <= row <= box.get_y() + box.get_height()}
        assert covered == set(group), group


def test_colour_max_gives_a_group_size_one_colour_in_every_panel():
    """A node shared by 2 tasks of a 2-task plan drawn with ``colour_max=5`` (as beside a 5-task plan) has the
    colour of a 2-task node of a 5-task plan, not the darkest colour of its own plan."""
    pair = draw_plan(BranchingPlan.one_net(("S", "E"), 3), colour_max=5).patches[1].get_facecolor()
    five = draw_plan(BranchingPlan(TASKS, [[("S", "E"), ("D", "N", "A")]] * 3)).patches[1].get_facecolor()
    alone = draw_plan(BranchingPlan.one_net(("S", "E"), 3)).patches[1].get_facecolor()
    assert np.allclose(pair, five) and not np.allclose(pair, alone)


def test_task_rows_keep_every_group_contiguous():
    rng = np.random.default_rng(0)
    for _ in range(50):
        plan = _random_plan(rng, int(rng.integers(1, 8)), int(rng.integers(1, 13)))
        rows = task_rows(plan)
        assert sorted(rows.values()) == list(range(len(plan.tasks)))
        for partition in plan.partitions:
            for group in partition:
                occupied = sorted(rows[t] for t in group)
                assert occupied == list(range(occupied[0], occupied[0] + len(group)))


def test_location_labels_are_used_and_checked(tmp_path):
    plan = _mtsl_plan()
    labels = [f"enc{i}" for i in range(6)] + [f"dec{i}" for i in range(4)]
    ax = draw_plan(plan, location_labels=labels)
    assert [t.get_text() for t in ax.get_xticklabels()][1:-1] == labels
    with pytest.raises(ValueError, match="plan 'MTSL' has 10 locations but location_labels has 3"):
        draw_plans({"MTSL": plan}, tmp_path / "x.png", location_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one plan"):
        draw_plans({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="plan 'bad' is a dict"):
        draw_plans({"bad": plan.to_dict()}, tmp_path / "x.png")


def test_drawing_leaves_pyplot_alone(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    ax = draw_plan(_mtsl_plan())
    assert isinstance(ax.figure, Figure)
    draw_plans({"p": _mtsl_plan()}, tmp_path / "p.png")
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
