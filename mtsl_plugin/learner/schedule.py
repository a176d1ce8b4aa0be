"""When MTSL's structural phases happen, and the knobs of the algorithm (plain values); :func:`require`, the check
of a configuration value's type and range that these and the run configuration (:mod:`mtsl_plugin.config`) use."""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", list: "a list of integers",
          Mapping: "a mapping", str: "a string"}


def _is(value: Any, kind: type) -> bool:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # True is no epoch count
    if kind is int:
        return number and isinstance(value, numbers.Integral)
    if kind is float:
        return number and math.isfinite(value)
    return isinstance(value, kind)


def require(key: str, value: Any, kind: type, least: float | None = None, most: float | None = None,
            optional: bool = False, above: float | None = None) -> None:
    """Refuse, with a one-sentence ``ValueError`` naming ``key``, a configuration value that is not of ``kind`` or
    lies outside [``least``, ``most``] or not strictly above ``above``; ``None`` passes where ``optional``.
    ``kind`` is ``bool``, ``int`` (a bool is not one), ``float`` (any finite real number), ``list`` (a list or
    tuple of integers, each within the bounds), ``Mapping`` or ``str``."""
    if optional and value is None:
        return
    items = list(value) if kind is list and isinstance(value, (list, tuple)) else [value]
    element = int if kind is list else kind
    ok = (kind is not list or isinstance(value, (list, tuple))) and all(_is(v, element) for v in items)
    if ok and element in (int, float):
        ok = all((least is None or v >= least) and (most is None or v <= most) and (above is None or v > above)
                 for v in items)
    if not ok:
        bound = (f" from {least} to {most}" if least is not None and most is not None else
                 f" >= {least}" if least is not None else f" <= {most}" if most is not None else "")
        bound += f" > {above}" if above is not None else ""
        raise ValueError(f"{key} must be {_KINDS[kind]}{bound}{' or null' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class MTSLConfig:
    """Everything that defines one MTSL run's algorithm (not the data or the optimiser).

    ``task_epochs[k]`` task-learning epochs precede structural phase ``k``; the k-th phase that merges (not phase
    ``k``: phases that merge nothing use none, as in the authors' code) amalgamates its group nodes for
    ``amalgamation_epochs[k]`` epochs; after the last phase the network is fine-tuned until
    ``total_epochs`` task-learning epochs have been run (amalgamation epochs come on top, as in the paper: 48
    task-learning + 32 fine-tuning epochs = 80, plus 34 amalgamation epochs). A value of the wrong type or range
    is refused when the configuration is made, naming it (``mtsl.<field>``).
    """

    task_epochs: tuple[int, ...] = (2, 2, 2, 2, 4, 4, 8, 8, 8, 8)
    amalgamation_epochs: tuple[int, ...] = (1, 1, 2, 2, 2, 2, 4, 4, 8, 8)
    total_epochs: int = 80
    threshold: float = 0.8
    align_weight: float = 0.2
    similarity: str = "cka"  # the measure grouping decisions are made on (paper: CKA; MTSL-RSA: rsa)
    align_similarity: str = "cka"  # the measure the alignment loss raises; must be differentiable
    grouping: str = "authors"  # the authors' code; fewest_groups and exhaustive score as the paper's text
    amalgamator: str = "att"
    align: bool = True
    average_init: bool = True
    amalgamate: bool = True

    def __post_init__(self) -> None:
        for key, kind, least in (("task_epochs", list, 0), ("amalgamation_epochs", list, 0), ("total_epochs", int, 1),
                                 ("threshold", float, None), ("align_weight", float, 0), ("align", bool, None),
                                 ("average_init", bool, None), ("amalgamate", bool, None)):
            require(f"mtsl.{key}", getattr(self, key), kind, least)
        object.__setattr__(self, "task_epochs", tuple(int(e) for e in self.task_epochs))
        object.__setattr__(self, "amalgamation_epochs", tuple(int(e) for e in self.amalgamation_epochs))
        if len(self.task_epochs) != len(self.amalgamation_epochs):
            raise ValueError(f"task_epochs has {len(self.task_epochs)} phases but amalgamation_epochs has "
                             f"{len(self.amalgamation_epochs)}")
        if self.task_epochs[:1] == (0,):  # phases run after a task-learning epoch: this one would come after one
            raise ValueError("mtsl.task_epochs starts with 0, but the first structural phase needs task-learning "
                             "epochs before it (it measures what the tasks learnt)")
        if sum(self.task_epochs) > self.total_epochs:
            raise ValueError(f"the phases need {sum(self.task_epochs)} task-learning epochs but total_epochs is "
                             f"{self.total_epochs}")

    @property
    def num_phases(self) -> int:
        return len(self.task_epochs)

    @property
    def aligns(self) -> bool:
        """Whether task learning adds the alignment loss (which measures CKA on every training batch)."""
        return self.align and self.align_weight > 0

    def phase_ends(self) -> list[int]:
        """The task-learning epoch count after which each structural phase runs."""
        return list(itertools.accumulate(self.task_epochs))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MTSLConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MTSL option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def scale_schedule(config: MTSLConfig, total_epochs: int, num_phases: int | None = None) -> MTSLConfig:
    """The paper's schedule shrunk (or stretched) to ``total_epochs``, keeping its shape: the phases take the
    paper's share of the epochs (48/80 for all ten phases), each phase at least one epoch, amalgamation scaled
    alike (at least one epoch each, none where the schedule amalgamates for none).

    Task-learning epochs are apportioned, not rounded one by one: rounding every short phase up to one epoch would
    push the last merges late and leave little fine-tuning (20 epochs, 10 phases: phases would end at epoch 14,
    70 %, instead of 12). That costs accuracy: on the quick data and network, seed 0, MTSL's Δ_MTL was −29.9 % with
    phases ending at 14 and −24.1 % at 12 (One-Net −20.5 %). Each phase gets the floor of its quota (at least 1);
    missing epochs go to the largest remainders (the latest phase on ties), and when the minimum of one epoch
    overshoots, the earliest of the longest phases give theirs back, so later phases stay at least as long as
    earlier ones.
    """
    phases = config.num_phases if num_phases is None else num_phases
    require("num_phases", phases, int, 1, config.num_phases)
    ratio = total_epochs / config.total_epochs
    quotas = [e * ratio for e in config.task_epochs[:phases]]
    target = max(len(quotas), round(sum(quotas)))
    task = [max(1, math.floor(q)) for q in quotas]
    while sum(task) < target:
        task[max(range(len(task)), key=lambda i: (quotas[i] - task[i], i))] += 1
    while sum(task) > target:
        longest = max(task)
        task[task.index(longest)] -= 1
    amal = [max(1, round(e * ratio)) if e else 0 for e in config.amalgamation_epochs[:phases]]  # 0: none
    total = max(total_epochs, sum(task))
    return MTSLConfig.from_dict({**config.to_dict(), "task_epochs": tuple(task), "amalgamation_epochs": tuple(amal),
                                 "total_epochs": total})
