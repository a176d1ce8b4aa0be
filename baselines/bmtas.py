"""BMTAS (Bruggemann, Kanakis, Georgoulis & Van Gool, BMVC 2020): LTB's gated supernet plus a resource loss.

The resource loss is the expected inference cost of the sampled architecture, which pushes the gates towards
sharing. Exactly (see :func:`baselines.gates.expected_node_counts`)::

    resource = sum_l c_l * E[#nodes in use at l] / (T * sum_l c_l)
    auxiliary_loss = resource_weight * resource            (0-d tensor; None while the gates are fixed)

* ``c_l``: GMac of one node at location ``l`` on one image (``stage_gmac`` arch arg, or counted with
  ``torch.utils.flop_counter`` at the size of the first training batch);
* the expectation is over the independent gate choices of one training step, each row distributed as
  ``softmax(logits / tau)`` at the step's temperature ``tau`` (the law of the sampled parents);
* a node is in use iff it feeds a task head or a node in use one location deeper (nodes no task reaches are
  dropped from the derived network, so they cost nothing);
* normalised by the single-task networks' trunk cost ``T * sum_l c_l``, so the resource is a fraction in
  ``(0, 1]`` (1: nothing shared) and ``resource_weight`` means the same at every image size. The heads cost
  the same in every architecture and are left out.
"""
from __future__ import annotations

import torch
from torch import Tensor

from baselines import gates
from baselines.ltb import LTB, search_args
from mtsl_plugin.methods import MethodSpec, register_method

DEFAULT_RESOURCE_WEIGHT = 0.05


class BMTAS(LTB):
    """LTB with a resource loss (:meth:`auxiliary_loss`, which the trainer adds to the task losses).

    Extra ``arch_args``: ``resource_weight`` (λ, default 0.05) and ``stage_gmac`` (``L`` per-node GMac; default
    counted at the first training batch's image size).
    """

    label = "BMTAS"
    extra_args = frozenset({"resource_weight", "stage_gmac"})

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        self.resource_weight = float(kwargs.get("resource_weight", DEFAULT_RESOURCE_WEIGHT))
        costs = kwargs.get("stage_gmac")
        if costs is not None and len(costs) != self.num_locations:
            raise ValueError(f"stage_gmac has {len(costs)} entries but there are {self.num_locations} locations")
        self._stage_gmac: list[float] | None = None if costs is None else [float(c) for c in costs]

    def node_gmac(self) -> Tensor:
        """``(L,)`` GMac of one node per location (counted once, at the first forward's image size)."""
        if self._stage_gmac is None:
            if self.input_size is None:
                raise ValueError("BMTAS counts node costs at the input size of its first forward; run one "
                                 "forward first or pass arch_args stage_gmac")
            self._stage_gmac = self.stage_gmac(*self.input_size)
        return torch.tensor(self._stage_gmac, device=self.gates["heads"].device)

    def expected_gmac(self, temperature: float = 1.0) -> Tensor:
        """Expected trunk GMac per image of the architecture sampled from the gates at ``temperature``
        (0-d tensor)."""
        counts = gates.expected_node_counts(self.parent_probabilities(temperature))
        return (counts * self.node_gmac().to(counts.dtype)).sum()

    def resource_loss(self, temperature: float = 1.0) -> Tensor:
        """:meth:`expected_gmac` as a fraction of the single-task networks' trunk GMac."""
        return self.expected_gmac(temperature) / (len(self.tasks) * self.node_gmac().sum())

    def auxiliary_loss(self) -> Tensor | None:
        """``resource_weight * resource_loss(tau)`` at this epoch's temperature while the gates are searched;
        ``None`` during the warm-up and in evaluation (the architecture is fixed then)."""
        if not self.searching:
            return None
        return self.resource_weight * self.resource_loss(self.temperature)


@register_method("bmtas")
def bmtas(config, num_locations: int) -> MethodSpec:
    """BMTAS: LTB's search with the resource loss; reported cost is that of the derived network."""
    return MethodSpec(architecture=BMTAS, arch_args={**search_args(config), "resource_weight": DEFAULT_RESOURCE_WEIGHT},
                      final_plan=lambda model: model.derived_plan())


@register_method("bmtas_r")
def bmtas_r(config, num_locations: int) -> MethodSpec:
    """BMTAS-R: BMTAS's derived plan (same seed) retrained from a fresh initialisation."""
    return MethodSpec(retrains="bmtas")
