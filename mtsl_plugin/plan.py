"""The branching plan: which tasks share a node at every merge location.

A multi-task network of the MTSL family is fully described by one partition of the tasks per merge location,
from the shallowest (0) to the deepest (L-1), each partition refining the one before it (tasks that split never
share a node again deeper down). The plan is plain data: no torch, hashable, JSON in and out.

Example (5 tasks, 10 locations)::

    location:  0..5 (encoder)     6, 7               8                  9 (decoder)
    groups:    [[S,E,D,N,A]] x 6  [[S,E],[D,N,A]] x2 [[S,E],[D,N,A]]    [[S,E],[D],[N,A]]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

Group = tuple[str, ...]
Partition = tuple[Group, ...]


class PlanError(ValueError):
    """A branching plan that is not valid, or an edit that would make it invalid."""


@dataclass(frozen=True)
class FrontierNode:
    """A task's task node: its earliest location not shared with any other task.

    ``location`` is ``None`` when the task shares every location (it has no task node left).
    ``parent`` is the group the task node hangs off (the task's group one location shallower),
    or ``None`` for a task node at location 0 (it hangs off the input) and for a task without a task node.
    """

    task: str
    location: int | None
    parent: Group | None


@dataclass(frozen=True)
class StageCost:
    """The cost of one node at one location: parameters and multiply-accumulates (GMac) per image."""

    params: int
    gmac: float


class BranchingPlan:
    """One partition of ``tasks`` per location; validated on construction.

    Groups are kept in a canonical order: tasks inside a group in ``tasks`` order, groups ordered by the
    position of their first task. Two plans with the same sharing are therefore equal and hash equally.
    """

    def __init__(self, tasks: Sequence[str], partitions: Sequence[Iterable[Iterable[str]]]):
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.tasks:
            raise PlanError("a branching plan needs at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise PlanError(f"task names must be distinct, got {list(self.tasks)}")
        if not partitions:
            raise PlanError("a branching plan needs at least one location")
        order = {t: i for i, t in enumerate(self.tasks)}
        canon: list[Partition] = []
        for location, partition in enumerate(partitions):
            groups = [tuple(group) for group in partition]
            flat = [t for g in groups for t in g]
            unknown = sorted(set(flat) - set(self.tasks))
            if unknown:
                raise PlanError(f"location {location} names unknown task(s) {unknown}; tasks are {list(self.tasks)}")
            if any(len(g) == 0 for g in groups):
                raise PlanError(f"location {location} has an empty group")
            if len(flat) != len(set(flat)) or set(flat) != set(self.tasks):
                missing = sorted(set(self.tasks) - set(flat))
                repeated = sorted({t for t in flat if flat.count(t) > 1})
                raise PlanError(
                    f"location {location} must hold every task exactly once (missing {missing}, repeated {repeated})"
                )
            groups = [tuple(sorted(g, key=order.__getitem__)) for g in groups]
            canon.append(tuple(sorted(groups, key=lambda g: order[g[0]])))
        for location in range(1, len(canon)):
            for group in canon[location]:
                if not set(group) <= set(self._group_of(canon[location - 1], group[0])):
                    raise PlanError(
                        f"location {location} groups {list(group)} together although they are split at "
                        f"location {location - 1}; tasks never re-merge deeper down"
                    )
        self.partitions: tuple[Partition, ...] = tuple(canon)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def single_task(cls, tasks: Sequence[str], num_locations: int) -> "BranchingPlan":
        """The STN plan: every task alone at every location."""
        return cls(tasks, [[[t] for t in tasks]] * num_locations)

    @classmethod
    def one_net(cls, tasks: Sequence[str], num_locations: int) -> "BranchingPlan":
        """The One-Net plan: all tasks share every location (only the heads are task-specific)."""
        return cls(tasks, [[list(tasks)]] * num_locations)

    # ----------------------------------------------------------------- queries
    @property
    def num_locations(self) -> int:
        return len(self.partitions)

    @staticmethod
    def _group_of(partition: Partition, task: str) -> Group:
        for group in partition:
            if task in group:
                return group
        raise PlanError(f"task {task!r} is not in the partition")

    def group_of(self, location: int, task: str) -> Group:
        """The group holding ``task`` at ``location``."""
        self._check_location(location)
        return self._group_of(self.partitions[location], task)

    def parent_of(self, location: int, group: Sequence[str]) -> Group | None:
        """The group one location shallower that ``group`` hangs off (``None`` at location 0)."""
        self._check_location(location)
        if location == 0:
            return None
        return self._group_of(self.partitions[location - 1], group[0])

    def frontier(self) -> dict[str, FrontierNode]:
        """Each task's task node: earliest location where the task is alone, and the group it hangs off."""
        result = {}
        for task in self.tasks:
            location = next((l for l, p in enumerate(self.partitions) if self._group_of(p, task) == (task,)), None)
            parent = None if location in (None, 0) else self.group_of(location - 1, task)
            result[task] = FrontierNode(task, location, parent)
        return result

    def siblings(self) -> list[tuple[int, Group]]:
        """Sets of sibling task nodes (at least two) as ``(location, tasks)``: task nodes at the same location
        that hang off the same parent, in location order. Only siblings may merge."""
        buckets: dict[tuple[int, Group | None], list[str]] = {}
        for node in self.frontier().values():
            if node.location is not None:
                buckets.setdefault((node.location, node.parent), []).append(node.task)
        return [(loc, tuple(ts)) for (loc, _), ts in sorted(buckets.items(), key=lambda kv: kv[0][0]) if len(ts) > 1]

    # ----------------------------------------------------------------- edits
    def merge(self, location: int, groups: Iterable[Iterable[str]]) -> "BranchingPlan":
        """A new plan where each of ``groups`` shares one node at ``location``; deeper locations are unchanged,
        so each merged task keeps its own nodes there, now hanging off the group node.

        Each group must consist of sibling task nodes at ``location``: tasks alone at ``location`` that hang
        off the same parent. Tasks not named in any group are unchanged; a group of one task is ignored.
        """
        self._check_location(location)
        partition = [list(g) for g in self.partitions[location]]
        frontier = self.frontier()
        for group in groups:
            group = list(group)
            if len(group) < 2:
                continue
            for task in group:
                if task not in frontier:
                    raise PlanError(f"cannot merge unknown task {task!r}")
                if frontier[task].location != location:
                    raise PlanError(
                        f"cannot merge {group} at location {location}: task {task!r} has its task node at "
                        f"location {frontier[task].location}"
                    )
            parents = {frontier[t].parent for t in group}
            if len(parents) > 1:
                raise PlanError(f"cannot merge {group} at location {location}: they hang off different parents")
            partition = [g for g in partition if g[0] not in group] + [group]
        partitions = list(self.partitions)
        partitions[location] = tuple(tuple(g) for g in partition)
        return BranchingPlan(self.tasks, partitions)

    # ----------------------------------------------------------------- cost
    def cost(self, stages: Sequence[StageCost], heads: Mapping[str, StageCost] | None = None) -> StageCost:
        """Parameters and GMac of the network this plan describes: one node per (location, group), costed by
        ``stages[location]`` (the cost of one node there), plus each task's head from ``heads``."""
        if len(stages) != self.num_locations:
            raise PlanError(f"cost table has {len(stages)} stages but the plan has {self.num_locations} locations")
        params = sum(stages[l].params * len(p) for l, p in enumerate(self.partitions))
        gmac = sum(stages[l].gmac * len(p) for l, p in enumerate(self.partitions))
        for task in self.tasks if heads is not None else ():
            params += heads[task].params
            gmac += heads[task].gmac
        return StageCost(params=params, gmac=gmac)

    # ----------------------------------------------------------------- value semantics
    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "partitions": [[list(g) for g in p] for p in self.partitions]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "BranchingPlan":
        """The plan of :meth:`to_dict`'s form: ``tasks`` a list of names, ``partitions`` one list of groups (each a
        list of names) per location. Anything else is a :class:`PlanError` naming where, not read another way (a
        group written as the string ``"SD"`` is not the group of its letters here, as it is in Python)."""
        if not isinstance(data, Mapping) or not {"tasks", "partitions"} <= data.keys():
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise PlanError(f"a plan needs the keys 'tasks' and 'partitions' (got {got})")
        tasks, partitions = data["tasks"], data["partitions"]
        if not _names(tasks):
            raise PlanError(f"a plan's 'tasks' must be a list of task names, got {tasks!r:.200}")
        if not isinstance(partitions, list):
            raise PlanError(f"a plan's 'partitions' must be a list of one partition per location, got "
                            f"{partitions!r:.200}")
        for location, partition in enumerate(partitions):
            if not (isinstance(partition, list) and all(_names(group) for group in partition)):
                raise PlanError(f"location {location}: a partition must be a list of groups, each a list of task "
                                f"names, got {partition!r:.200}")
        return cls(tasks, partitions)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "BranchingPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan JSON does not parse: {exc}") from None
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BranchingPlan) and (self.tasks, self.partitions) == (other.tasks, other.partitions)

    def __hash__(self) -> int:
        return hash((self.tasks, self.partitions))

    def __repr__(self) -> str:
        return f"BranchingPlan({self.describe()})"

    def describe(self) -> str:
        """One line, one ``|``-separated part per run of identical locations, e.g. ``0-5: SEDNA | 6-7: SE DNA``
        (a group's names run together when all are one letter long, else joined by ``+``)."""
        parts, start = [], 0
        for l in range(1, self.num_locations + 1):
            if l == self.num_locations or self.partitions[l] != self.partitions[start]:
                span = f"{start}" if l - 1 == start else f"{start}-{l - 1}"
                groups = " ".join("".join(g) if all(len(t) == 1 for t in g) else "+".join(g)
                                  for g in self.partitions[start])
                parts.append(f"{span}: {groups}")
                start = l
        return " | ".join(parts)

    def _check_location(self, location: int) -> None:
        if not 0 <= location < self.num_locations:
            raise PlanError(f"location {location} is outside 0..{self.num_locations - 1}")


def _names(value: object) -> bool:
    """Whether ``value`` is a list of strings (a plan dict's list of task names)."""
    return isinstance(value, list) and all(isinstance(name, str) for name in value)
