"""A multi-task network built from a branching plan: one node per (location, group), one head per task."""
from __future__ import annotations

import contextlib
import copy
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from mtsl_plugin.network.cost import count_gmac
from mtsl_plugin.network.modes import evaluating
from mtsl_plugin.network.stages import StageFactory
from mtsl_plugin.plan import BranchingPlan, Group, PlanError, StageCost

NodeKey = tuple[int, Group]


def node_name(location: int, group: Group) -> str:
    """The module name of a node, e.g. ``"3-S+E"``; one name per node as long as no task name holds ``+`` (or a
    dot, which module names may not contain): :func:`check_task_names` refuses such names."""
    return f"{location}-{'+'.join(group)}"


def check_task_names(tasks: Sequence[str]) -> None:
    """Refuse, in one ``ValueError``, task names that cannot name the network's modules: empty, holding ``+``
    (which joins a group's tasks in node names, so two groups would share a node) or ``.`` (a module path), or
    an attribute of ``nn.Module`` (``float``, ``train``, ...), which ``nn.ModuleDict`` of heads refuses."""
    module = nn.ModuleDict()
    unnamable = [t for t in tasks if not t or "+" in t or "." in t or hasattr(module, t)]
    if unnamable:
        raise ValueError(f"task name(s) {unnamable} cannot name network modules: a task name may not be empty, "
                         "contain '+' or '.', or be an attribute of torch's nn.Module (such as float or train)")


#: Layers whose inputs and weights autocast casts to its lower precision, and layers it runs in float32.
_LOWER, _NORMS = (nn.modules.conv._ConvNd, nn.Linear), (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


#: What every ``nn.Module`` keeps in its ``__dict__`` (parameters, buffers, children, hooks, the mode).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@contextlib.contextmanager
def _python_state_kept(template: nn.Module):
    """Restore the plain Python attributes of ``template``'s modules after the block (a dict attribute as it was,
    its entries too). ``functional_call`` swaps parameters and buffers only: a module that caches a tensor
    computed from them (timm's EfficientViT-M keeps its attention biases in eval mode) would keep a tensor of
    the vmapped call, which fails anywhere else (a deep copy, an unfused forward)."""
    saved = [(m, {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(m).items()
                  if k not in _MODULE_INTERNALS}) for m in template.modules()]
    try:
        yield
    finally:
        for module, attributes in saved:
            for key in [k for k in vars(module) if k not in _MODULE_INTERNALS and k not in attributes]:
                del module.__dict__[key]
            module.__dict__.update(attributes)


@contextlib.contextmanager
def _autocast_by_hand(template: nn.Module, params: dict[str, torch.Tensor], device_type: str):
    """Yield ``params`` for a vmapped call of ``template``, with ``template`` set to cast as autocast casts.

    Inside ``torch.vmap`` autocast casts nothing (torch 2.x: the batching rules run before it), so a convolution
    would meet bf16 activations with float32 weights and fail, or silently run in float32. Under autocast,
    convolutions and linear layers get their weights and inputs in the autocast dtype (gradients reach the float32
    parameters through the casts, as with autocast); normalisation layers compute in float32 on float32 parameters
    and statistics (vmap's batch norm takes no mixed dtypes) and, as under autocast, batch norm returns its input's
    dtype while layer and group norm return float32; every other operation sees what autocast would give it, but
    runs in that dtype: one that autocast runs in float32 and a block calls as a function (softmax, or the norm
    in ``F.normalize``, in attention blocks such as EdgeNeXt's or MobileViT's) runs in bf16 here, so such nodes
    may differ from autocast by more than rounding (blocks of convolutions, norm layers and activations are cast
    exactly as autocast casts them). Without autocast, nothing changes."""
    if not torch.is_autocast_enabled(device_type):
        yield params
        return
    dtype = torch.get_autocast_dtype(device_type)
    modules = [(prefix, m) for prefix, m in template.named_modules() if isinstance(m, _LOWER + _NORMS)]
    lower = {f"{prefix}.{name}" if prefix else name
             for prefix, m in modules if isinstance(m, _LOWER) for name, _ in m.named_parameters(recurse=False)}
    params = {n: p.to(dtype) if n in lower else p for n, p in params.items()}
    input_dtypes: dict[int, torch.dtype] = {}

    def cast(module, inputs):
        input_dtypes[id(module)] = inputs[0].dtype
        to = dtype if isinstance(module, _LOWER) else torch.float32
        return tuple(t.to(to) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs)

    def back_to_input_dtype(module, _inputs, output):
        return output.to(input_dtypes[id(module)])

    handles = [m.register_forward_pre_hook(cast) for _, m in modules]
    handles += [m.register_forward_hook(back_to_input_dtype) for _, m in modules
                if isinstance(m, nn.modules.batchnorm._NormBase)]
    try:
        yield params
    finally:
        for handle in handles:
            handle.remove()


def _cumulative_momenta(modules: list[nn.Module]) -> dict[nn.Module, float] | None:
    """For a training call of ``modules`` (nodes of one architecture) as one ``torch.vmap``: the batch norms of
    ``modules[0]`` that keep a cumulative average (``momentum=None``), each with the momentum it uses in this
    step, ``1 / (batches tracked + 1)``, a Python float as batch norm computes it (it cannot read its counter
    inside ``vmap``); ``None`` when the nodes have tracked different numbers of batches (e.g. a fresh group node
    beside trained task nodes), so that no one value serves them all."""
    momenta: dict[nn.Module, float] = {}
    for name, module in modules[0].named_modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None and module.training
                and module.track_running_stats and module.num_batches_tracked is not None):
            counts = {int(m.get_submodule(name).num_batches_tracked) for m in modules}
            if len(counts) > 1:
                return None
            momenta[module] = 1.0 / float(counts.pop() + 1)
    return momenta


@contextlib.contextmanager
def _momenta_set(momenta: Mapping[nn.Module, float]):
    """Give each batch norm in ``momenta`` that momentum for the duration of the block, then ``None`` again."""
    for module, momentum in momenta.items():
        module.momentum = momentum
    try:
        yield
    finally:
        for module in momenta:
            module.momentum = None


class BranchedNetwork(nn.Module):
    """The network a :class:`BranchingPlan` describes.

    ``forward(x (N, 3, H, W))`` returns ``(predictions, features)``: predictions maps each task to its head's
    output at the input resolution; features maps each task that has a sibling task node (a task node that may
    still merge, see :meth:`BranchingPlan.siblings`) to that task node's output ``(N, C, h, w)``.

    Nodes are kept in canonical plan order, so two networks with the same plan have the same parameter order
    (what checkpoints and optimizer state rely on).
    """

    def __init__(self, plan: BranchingPlan, stages: StageFactory, heads: Mapping[str, nn.Module]):
        super().__init__()
        if plan.num_locations != stages.num_locations:
            raise PlanError(f"the plan has {plan.num_locations} locations but the backbone stages have "
                            f"{stages.num_locations}")
        missing = [t for t in plan.tasks if t not in heads]
        if missing:
            raise ValueError(f"no head given for task(s) {missing}")
        check_task_names(plan.tasks)
        self.plan = plan
        self.stages = stages
        self.specs = stages.specs
        self.nodes = nn.ModuleDict({node_name(l, g): stages.build(l) for l, p in enumerate(plan.partitions) for g in p})
        self.heads = nn.ModuleDict({t: heads[t] for t in plan.tasks})
        self.fused = False  # run the nodes of a location as one vmapped call (see run_fused)

    # ------------------------------------------------------------------ access
    def node(self, location: int, group: Group) -> nn.Module:
        return self.nodes[node_name(location, tuple(group))]

    def node_keys(self) -> list[NodeKey]:
        return [(l, g) for l, p in enumerate(self.plan.partitions) for g in p]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of nodes every task uses (LibMTL's "shared parameters", which its gradient weightings
        combine the tasks' gradients of). A node of some tasks only is not one: every other task's gradient there
        is zero, the minimum-norm combination MGDA and CAGrad find is then that zero (the node all but stopped
        learning) and IMTL divides by its norm (NaN); such a node gets the plain sum of its tasks' gradients, as a
        task's own nodes get their task's."""
        return [p for l, g in self.node_keys() if len(g) == len(self.plan.tasks) > 1
                for p in self.node(l, g).parameters()]

    # ------------------------------------------------------------------ forward
    def run_node(self, location: int, group: Group, outputs: list[dict[Group, torch.Tensor]], x: torch.Tensor,
                 module: nn.Module | None = None) -> torch.Tensor:
        """Run the node for ``group`` at ``location`` (or ``module`` in its place) on the outputs of shallower
        locations, ``outputs[l][group]``; ``x`` is the network input."""
        module = self.node(location, group) if module is None else module
        return module(*self._reads(location, group, outputs, x))

    def _reads(self, location: int, group: Group, outputs: list[dict[Group, torch.Tensor]], x: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
        """What the node for ``group`` at ``location`` is called with: its parent's output (``x`` at location 0),
        then, where the stage takes a skip connection, the output of ``group``'s node at ``skip_from``."""
        parent = self.plan.parent_of(location, group)
        inputs = x if parent is None else outputs[location - 1][parent]
        skip_from = self.specs[location].skip_from
        if skip_from is None:
            return (inputs,)
        return inputs, outputs[skip_from][self.plan.group_of(skip_from, group[0])]

    def run_locations(self, x: torch.Tensor, until: int | None = None) -> list[dict[Group, torch.Tensor]]:
        """Outputs of every node at locations ``0..until`` (all locations by default), per location and group;
        with :attr:`fused`, the nodes of a location run as one call (:meth:`run_fused`)."""
        last = self.plan.num_locations - 1 if until is None else until
        outputs: list[dict[Group, torch.Tensor]] = []
        for location in range(last + 1):
            groups = self.plan.partitions[location]
            if self.fused and len(groups) > 1:
                outputs.append(self.run_fused(location, groups, outputs, x))
            else:
                outputs.append({g: self.run_node(location, g, outputs, x) for g in groups})
        return outputs

    def run_fused(self, location: int, groups: list[Group], outputs: list[dict[Group, torch.Tensor]],
                  x: torch.Tensor) -> dict[Group, torch.Tensor]:
        """The nodes of ``groups`` at ``location`` as one ``torch.vmap`` over their stacked parameters (every
        node of a location is built from the same template, so they share one architecture): convolutions become
        one grouped convolution over the nodes, batch norm stays per node and per channel. Inputs (and skips)
        that all nodes read, e.g. the image at location 0 or a shared parent's output, are passed once;
        different ones are stacked (shared ones too where a random draw needs them per node). Equal to
        :meth:`run_node` per group up to float rounding (tested): the parameters are stacked on the fly, so
        gradients reach each node's own parameters and the optimizer, checkpoints and structural edits see the
        unfused network; batch-norm running statistics updated in training are written back to each node.
        Random operations inside the nodes (timm's ``drop_path_rate``, dropout) draw independently per node, as
        separate nodes would (equal in distribution, not in value). Batch norms with a cumulative average
        (``momentum=None``) use this step's momentum as a fixed one; where the nodes have counted different
        numbers of batches the location runs node by node. Under autocast the call is cast by hand
        (:func:`_autocast_by_hand`: autocast does not reach inside ``vmap``)."""
        modules = [self.node(location, g) for g in groups]
        momenta = _cumulative_momenta(modules) if modules[0].training else {}
        if momenta is None:  # one counter per node, different ones: no one momentum serves the stacked call
            return {g: self.run_node(location, g, outputs, x) for g in groups}
        reads = list(zip(*(self._reads(location, g, outputs, x) for g in groups)))  # per argument, one per node
        names = [n for n, _ in modules[0].named_parameters()]
        params = {n: torch.stack([m.get_parameter(n) for m in modules]) for n in names}

        def call(p, b, *tensors):
            return functional_call(modules[0], {**p, **b}, tensors)

        def vmapped(args: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            buffers = {n: torch.stack([m.get_buffer(n) for m in modules]) for n, _ in modules[0].named_buffers()}
            dims = [0 if stacked else None for _, stacked in args]
            with (_autocast_by_hand(modules[0], params, x.device.type) as cast, _momenta_set(momenta),
                  _python_state_kept(modules[0])):
                out = torch.vmap(call, in_dims=(0, 0, *dims), randomness="different")(cast, buffers,
                                                                                      *[a for a, _ in args])
            return out, buffers

        shared = [self._stack_or_share(tensors) for tensors in reads]
        try:
            out, buffers = vmapped(shared)
        except RuntimeError as error:
            # a random draw on an input the nodes share (timm's ResNeSt drops paths of its block's input) must
            # differ per node, so vmap needs that input per node: run again with it stacked (and fresh buffers)
            if "randomness" not in str(error) or all(stacked for _, stacked in shared):
                raise
            out, buffers = vmapped([(torch.stack(tensors), True) for tensors in reads])
        if modules[0].training:  # running statistics were updated in the stacked copies
            with torch.no_grad():
                for name, stacked in buffers.items():
                    for index, module in enumerate(modules):
                        module.get_buffer(name).copy_(stacked[index])
        return {g: out[i] for i, g in enumerate(groups)}

    @staticmethod
    def _stack_or_share(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, bool]:
        """One tensor when every node reads the same one, else the stack ``(nodes, N, C, H, W)``."""
        if all(t is tensors[0] for t in tensors):
            return tensors[0], False
        return torch.stack(tensors), True

    def head_inputs(self, outputs: list[dict[Group, torch.Tensor]], task: str) -> list[torch.Tensor]:
        """What ``task``'s head reads: the outputs of its nodes at the stages' head locations."""
        return [outputs[l][self.plan.group_of(l, task)] for l in self.stages.head_locations]

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        outputs = self.run_locations(x)
        size = (x.shape[-2], x.shape[-1])
        preds = {t: self.heads[t](self.head_inputs(outputs, t), size) for t in self.plan.tasks}
        features = {t: outputs[loc][(t,)] for loc, tasks in self.plan.siblings() for t in tasks}
        return preds, features

    # ------------------------------------------------------------------ structural edits
    def apply_plan(self, plan: BranchingPlan, created: Mapping[NodeKey, nn.Module]) -> list[nn.Module]:
        """Switch to ``plan``: install the ``created`` nodes, drop the nodes the plan no longer has, and return
        the dropped modules. Every node of the new plan must either exist already or be in ``created``; created
        nodes take the network's mode (training or evaluation)."""
        if plan.tasks != self.plan.tasks or plan.num_locations != self.plan.num_locations:
            raise PlanError("a structural edit cannot change the tasks or the number of locations")
        old = dict(self.nodes.items())
        new: dict[str, nn.Module] = {}
        for location, group in ((l, g) for l, p in enumerate(plan.partitions) for g in p):
            name = node_name(location, group)
            if (location, group) in created:  # in the network's mode (a fresh module is in training mode)
                new[name] = created[(location, group)].train(self.training)
            elif name in old:
                new[name] = old[name]
            else:
                raise PlanError(f"the new plan needs node {name} but it was neither kept nor created")
        removed = [m for name, m in old.items() if name not in new]
        self.nodes = nn.ModuleDict(new)
        self.nodes.training = self.training  # the container too (its children are in the network's mode)
        self.plan = plan
        return removed

    # ------------------------------------------------------------------ cost
    def stage_costs(self, height: int, width: int) -> tuple[list[StageCost], dict[str, StageCost]]:
        """The cost of one node per location and of each head, counted with ``torch.utils.flop_counter`` on one
        image of ``height`` x ``width`` (GMac = FLOPs / 2 / 1e9)."""
        like = next(self.parameters())
        x = torch.zeros(1, 3, height, width, device=like.device, dtype=like.dtype)
        stages: list[StageCost] = []
        with evaluating(self), torch.no_grad():
            outputs: list[dict[Group, torch.Tensor]] = []
            for location in range(self.plan.num_locations):
                group = self.plan.partitions[location][0]
                out: dict[Group, torch.Tensor] = {}
                gmac = count_gmac(lambda: out.setdefault(group, self.run_node(location, group, outputs, x)))
                outputs.append({g: out[group] for g in self.plan.partitions[location]})
                params = sum(p.numel() for p in self.node(location, group).parameters())
                stages.append(StageCost(params, gmac))
            heads = {}
            for task in self.plan.tasks:
                feats = self.head_inputs(outputs, task)
                gmac = count_gmac(lambda: self.heads[task](feats, (height, width)))
                heads[task] = StageCost(sum(p.numel() for p in self.heads[task].parameters()), gmac)
        return stages, heads

    def cost(self, height: int, width: int) -> StageCost:
        """Parameters and GMac of this network at ``height`` x ``width``, from the per-stage table."""
        stages, heads = self.stage_costs(height, width)
        return self.plan.cost(stages, heads)
