"""BranchingPlan: validation, frontier and siblings, merge, JSON, cost."""
import itertools

import pytest

from mtsl_plugin.plan import BranchingPlan, PlanError, StageCost

TASKS = ("S", "D", "E", "N", "A")


def test_constructors_and_canonical_order():
    stn = BranchingPlan.single_task(TASKS, 4)
    one = BranchingPlan.one_net(TASKS, 4)
    assert all(len(p) == 5 for p in stn.partitions)
    assert all(p == (TASKS,) for p in one.partitions)
    # the same sharing written in another order is the same plan
    a = BranchingPlan(TASKS, [[["A", "N"], ["E", "S", "D"]]])
    b = BranchingPlan(TASKS, [[["S", "D", "E"], ["N", "A"]]])
    assert a == b and hash(a) == hash(b)
    assert a.partitions[0] == (("S", "D", "E"), ("N", "A"))


@pytest.mark.parametrize("partitions, message", [
    ([[["S", "D"]]], "missing"),
    ([[["S", "D", "E"], ["S"]]], "repeated"),
    ([[["S", "D", "X"], ["E"]]], "unknown"),
    ([[["S"], ["D"], ["E"]], [["S", "D"], ["E"]]], "re-merge"),
    ([[["S", "D", "E"], []]], "empty"),
    ([], "at least one location"),
])
def test_validation_errors_name_the_problem(partitions, message):
    with pytest.raises(PlanError, match=message):
        BranchingPlan(("S", "D", "E"), partitions)


def test_duplicate_tasks_rejected():
    with pytest.raises(PlanError, match="distinct"):
        BranchingPlan(("S", "S"), [[["S"]]])


def test_frontier_and_siblings_follow_the_parents():
    plan = BranchingPlan(TASKS, [
        [TASKS],
        [["S", "E"], ["D", "N"], ["A"]],
        [["S"], ["E"], ["D", "N"], ["A"]],
        [[t] for t in TASKS],
    ])
    frontier = plan.frontier()
    assert frontier["S"].location == 2 and frontier["S"].parent == ("S", "E")
    assert frontier["A"].location == 1 and frontier["A"].parent == TASKS
    assert frontier["D"].location == 3 and frontier["D"].parent == ("D", "N")
    # A is alone under its parent at location 1 (S, E, D, N are shared there): it has no sibling
    assert plan.siblings() == [(2, ("S", "E")), (3, ("D", "N"))]
    assert BranchingPlan.one_net(TASKS, 3).frontier()["S"].location is None
    assert BranchingPlan.one_net(TASKS, 3).siblings() == []
    assert BranchingPlan.single_task(TASKS, 3).siblings() == [(0, TASKS)]


def test_merge_builds_the_tree_one_location_at_a_time():
    plan = BranchingPlan.single_task(TASKS, 4)
    plan = plan.merge(0, [TASKS])
    plan = plan.merge(1, [["S", "E"], ["D", "N", "A"]])
    plan = plan.merge(2, [["D", "N"]])
    assert plan.partitions[0] == (TASKS,)
    assert plan.partitions[1] == (("S", "E"), ("D", "N", "A"))
    assert plan.partitions[2] == (("S",), ("D", "N"), ("E",), ("A",))
    assert plan.partitions[3] == tuple((t,) for t in TASKS)
    assert plan.describe() == "0: SDENA | 1: SE DNA | 2: S DN E A | 3: S D E N A"


def test_describe_spans_runs_of_identical_locations_inclusively():
    """``describe`` joins a run of identical locations into one ``first-last`` span, both ends included."""
    plan = BranchingPlan.single_task("SDE", 8).merge(0, ["SDE"]).merge(1, ["SDE"]).merge(2, ["SDE"])
    plan = plan.merge(3, ["SD", "E"]).merge(4, ["SD", "E"])
    assert plan.describe() == "0-2: SDE | 3-4: SD E | 5-7: S D E"
    assert BranchingPlan.from_json(plan.to_json()) == plan


def test_merge_rejects_non_siblings():
    plan = BranchingPlan.single_task(TASKS, 3).merge(0, [["S", "E"], ["D", "N", "A"]])
    with pytest.raises(PlanError, match="different parents"):
        plan.merge(1, [["S", "D"]])
    with pytest.raises(PlanError, match="task node at location 1"):
        plan.merge(2, [["S", "E"]])
    with pytest.raises(PlanError, match="outside"):
        plan.merge(3, [["S", "E"]])


def test_json_round_trip_and_bad_json():
    plan = BranchingPlan.single_task(TASKS, 5).merge(0, [TASKS]).merge(1, [["S", "E"]])
    assert BranchingPlan.from_json(plan.to_json()) == plan
    assert BranchingPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(PlanError, match="does not parse"):
        BranchingPlan.from_json("{not json")
    with pytest.raises(PlanError, match="'tasks' and 'partitions'"):
        BranchingPlan.from_json('{"tasks": ["S"]}')


def test_cost_counts_one_node_per_group():
    stages = [StageCost(10, 1.0), StageCost(100, 2.0), StageCost(1000, 4.0)]
    heads = {t: StageCost(1, 0.5) for t in ("S", "D", "E")}
    stn = BranchingPlan.single_task(("S", "D", "E"), 3)
    one = BranchingPlan.one_net(("S", "D", "E"), 3)
    mixed = one.__class__(("S", "D", "E"), [[["S", "D", "E"]], [["S", "D"], ["E"]], [["S"], ["D"], ["E"]]])
    assert stn.cost(stages, heads) == StageCost(3 * 1110 + 3, 3 * 7.0 + 1.5)
    assert one.cost(stages, heads) == StageCost(1110 + 3, 7.0 + 1.5)
    assert mixed.cost(stages) == StageCost(10 + 200 + 3000, 1.0 + 4.0 + 12.0)
    with pytest.raises(PlanError, match="3 locations"):
        stn.cost(stages[:2])


def test_every_merge_sequence_stays_valid():
    """Property: merging sibling sets in any order from STN only ever yields valid, refining plans."""
    tasks = ("S", "D", "E", "N")
    for first, second in itertools.product([[tasks], [tasks[:2], tasks[2:]], [tasks[:3]]], repeat=2):
        plan = BranchingPlan.single_task(tasks, 3).merge(0, first)
        for location, sibling in plan.siblings():
            if location == 1:
                plan = plan.merge(1, [[t for t in sibling if t in g] for g in second])
        for loc in range(1, 3):
            for group in plan.partitions[loc]:
                assert set(group) <= set(plan.group_of(loc - 1, group[0]))


def test_json_of_another_shape_is_a_plan_error():
    """A JSON value that is not a plan's dict (a list, a number) is refused as a PlanError, not a raw TypeError."""
    for text in ("[1, 2]", "3"):
        with pytest.raises(PlanError, match="needs the keys"):
            BranchingPlan.from_json(text)


@pytest.mark.parametrize("data, culprit", [
    ({"tasks": list("SD"), "partitions": [["SD"]]}, "location 0: a partition must be a list of groups"),  # not S|D
    ({"tasks": list("SD"), "partitions": [[["S", "D"]], None]}, "location 1: a partition must be a list"),
    ({"tasks": list("SD"), "partitions": [[["S", "D"], 3]]}, "location 0: a partition must be a list"),
    ({"tasks": "S,D", "partitions": [[["S", "D"]]]}, "'tasks' must be a list of task names, got 'S,D'"),
    ({"tasks": [1, 2], "partitions": [[[1, 2]]]}, "'tasks' must be a list of task names"),
    ({"tasks": ["S"], "partitions": {"0": [["S"]]}}, "'partitions' must be a list of one partition per location"),
    ({"tasks": ["S"]}, r"needs the keys 'tasks' and 'partitions' \(got \['tasks'\]\)"),
])
def test_a_plan_dict_of_another_shape_is_refused_naming_where(data, culprit):
    """JSON carries only lists and strings: a string where a group should be is a mistake, not its letters."""
    with pytest.raises(PlanError, match=culprit):
        BranchingPlan.from_dict(data)


def test_plans_of_the_same_groups_over_tasks_in_another_order_differ():
    """The task order is part of a plan (heads, tables, the canonical group order): equal plans hash alike."""
    a = BranchingPlan(("A", "B", "C"), [[["A", "C"], ["B"]]])
    b = BranchingPlan(("A", "C", "B"), [[["A", "C"], ["B"]]])
    assert a.partitions == b.partitions and a != b
    assert a == BranchingPlan(("A", "B", "C"), [[["B"], ["C", "A"]]]) and hash(a) == hash(
        BranchingPlan(("A", "B", "C"), [[["B"], ["C", "A"]]]))


def test_describe_joins_multi_letter_task_names_with_plus():
    """Multi-letter task names stay readable in ``describe``: a group's names are joined with ``+``."""
    plan = BranchingPlan(["seg", "depth", "E"], [[["seg", "depth", "E"]], [["seg", "depth"], ["E"]]])
    assert plan.describe() == "0: seg+depth+E | 1: seg+depth E"
