"""LTB and BMTAS: gated supernet training, plan extraction, the exact resource loss, and runs through the harness."""
import dataclasses
import itertools
import json
import math

import pytest
import torch
from torch import nn

import baselines.bmtas  # noqa: F401  (registers bmtas, bmtas_r)
import baselines.ltb  # noqa: F401  (registers ltb, ltb_r)
from baselines import gates
from baselines.bmtas import BMTAS
from baselines.ltb import LTB
from benchmarks import compare
from conftest import differs
from mtsl_plugin.config import load_preset
from mtsl_plugin.experiment import build_data, build_stages, build_trainer, run_method, seed_everything
from mtsl_plugin.methods import build_method
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import StageSpec
from mtsl_plugin.plan import BranchingPlan, StageCost
from mtsl_plugin.tasks import build_tasks

OUT = {"S": 5, "D": 1, "E": 1}


@pytest.fixture(scope="module")
def stages():
    return build_stages(load_preset("smoke"))  # the smoke preset's narrow ResNet18


def make(architecture, stages, tasks="SDE", **arch_args):
    heads = {t: stages.build_head(OUT[t]) for t in tasks}
    return architecture(list(tasks), lambda: stages, heads, False, False, "cpu", **arch_args)


def set_gates(model, choices, scale=1.0):
    """Logits that make ``choices[i][j]`` the most likely choice of row ``j`` of the ``i``-th gate matrix (LTB:
    parents at gate level ``i + 1``; BMTAS: operations at location ``i``)."""
    with torch.no_grad():
        for gate, rows in zip(model.gates.values(), choices):
            gate.zero_()
            for row, choice in enumerate(rows):
                gate[row, choice] = scale


@pytest.mark.parametrize("architecture", [LTB, BMTAS])
def test_candidate_nodes_start_from_independent_draws(stages, architecture):
    """As LibMTL's LTB (``encoder_class()`` once per task) and brdav's supernet (every candidate operation
    initialised on its own): slot 0 holds the run's own network, the other slots other draws of it."""
    model = make(architecture, stages)
    for location in range(stages.num_locations):
        assert not differs(model.node(location, 0), stages.build(location))
        assert differs(model.node(location, 1), model.node(location, 0))
        assert differs(model.node(location, 2), model.node(location, 1))
    identical = make(architecture, stages, candidates="identical")
    assert not any(differs(identical.node(l, j), stages.build(l)) for l in range(stages.num_locations) for j in (1, 2))
    with pytest.raises(ValueError, match="candidates must be one of"):
        make(architecture, stages, candidates="same")
    with pytest.raises(ValueError, match="stages TinyStages cannot draw their initialisation again.*'identical'"):
        architecture(list("SDE"), TinyStages, {t: TinyHead() for t in "SDE"}, False, False, "cpu")


# ------------------------------------------------------------------------------------ training in both settings
@pytest.mark.parametrize("architecture", [LTB, BMTAS])
@pytest.mark.parametrize("setting", ["encoder-decoder", "encoder", "authors"])
def test_search_trains_gates_and_yields_a_valid_plan(smoke, architecture, setting):
    config = smoke(tasks="SDE")  # "authors": the encoder-decoder setting on the authors' network
    config = config.replace(network="authors") if setting == "authors" else config.replace(setting=setting)
    seed_everything(0)
    data, dataset = build_data(config)
    tasks = build_tasks(config.tasks, dataset.num_classes)
    stages = build_stages(config)
    spec = build_method(architecture.label.lower(), config, stages.num_locations)
    trainer = build_trainer(config, tasks, None, stages, architecture=spec.architecture, arch_args=spec.arch_args)
    model = trainer.model
    assert isinstance(model, architecture)
    model.warmup_epochs, model.total_epochs = 1, 40  # LTB's tau: (40/20)/sqrt(2) in the second epoch
    batches = iter(data.batches(data.train, key=(0, 0)))

    model.epoch = 0  # warm-up: the gates take no part
    images, gts = next(batches)
    losses, _ = trainer.train_step(images, gts)
    assert torch.isfinite(losses).all()
    assert all(g.grad is None for g in model.gates.values())

    model.epoch = 1  # search: gradients reach every gate
    before = {k: g.detach().clone() for k, g in model.gates.items()}
    if architecture is BMTAS:  # the architecture step moves the gates; the weights step leaves them
        model.architecture_epoch(trainer, [next(batches)], progress=False)
        assert all(not torch.equal(before[k], g) for k, g in model.gates.items())
        before = {k: g.detach().clone() for k, g in model.gates.items()}
    images, gts = next(batches)
    losses, _ = trainer.train_step(images, gts)
    assert torch.isfinite(losses).all()
    # candidates that are still identical (e.g. location 0's, trained alike in the warm-up) give no gradient
    assert any(gate.grad.abs().sum() > 0 for gate in model.gates.values())
    for key, gate in model.gates.items():
        assert gate.grad is not None and torch.isfinite(gate.grad).all(), key
        moved = not torch.equal(before[key], gate)
        assert moved == (architecture is LTB), key  # LTB's gates are in the run's optimizer, BMTAS's are not

    plan = model.derived_plan()
    assert isinstance(plan, BranchingPlan)
    assert plan.tasks == ("S", "D", "E") and plan.num_locations == stages.num_locations
    model.eval()
    with torch.no_grad():
        first, second = model(images), model(images)
    assert all(torch.equal(first[t], second[t]) for t in "SDE")
    assert all(first[t].shape == (images.shape[0], tasks[t].out_channels, 32, 32) for t in "SDE")


@pytest.mark.parametrize("multiplier", [1.0, 100.0])
def test_ltb_gates_learn_at_their_own_multiple_of_the_learning_rate(smoke, multiplier):
    """Option ``gate_lr_multiplier``: the gates form a parameter group at that multiple of the run's rate and their
    first search step moves each logit by it (Adam's first step is lr x sign of the gradient); at 1, LibMTL's,
    they stay in the one group. Not a positive number: refused."""
    config = smoke(tasks="SDE")
    seed_everything(0)
    data, dataset = build_data(config)
    stages = build_stages(config)
    trainer = build_trainer(config, build_tasks(config.tasks, dataset.num_classes), None, stages, architecture=LTB,
                            arch_args={"search_space": "reference", "gate_lr_multiplier": multiplier})
    model, lr = trainer.model, config.optimizer["lr"]
    gate_ids = {id(g) for g in model.gates.values()}
    groups = trainer.optimizer.param_groups
    assert len(groups) == (1 if multiplier == 1 else 2)
    assert {id(p) for p in groups[-1]["params"]} >= gate_ids and groups[-1]["lr"] == pytest.approx(lr * multiplier)
    model.warmup_epochs, model.total_epochs, model.epoch = 0, 40, 0  # searching from the first step
    before = {k: g.detach().clone() for k, g in model.gates.items()}
    trainer.train_step(*next(iter(data.batches(data.train, key=(0, 0)))))
    moved = torch.cat([(g.detach() - before[k]).abs().flatten() for k, g in model.gates.items()])
    assert float(moved.max()) <= lr * multiplier * 1.0001 and float(moved.max()) > lr * multiplier * 0.5
    with pytest.raises(ValueError, match="gate_lr_multiplier must be a finite number > 0, got 0"):
        make(LTB, stages, gate_lr_multiplier=0)


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan"), "fast", None, True])
def test_ltb_gate_lr_multiplier_that_is_not_a_positive_number_is_refused_naming_it(stages, value):
    """Refused in one line naming the option when the supernet is built: an infinite rate would only show as a NaN
    loss once the gates learn, a string or None as float()'s message, which names no option."""
    with pytest.raises(ValueError, match=r"^LTB gate_lr_multiplier must be a finite number > 0, got "):
        make(LTB, stages, gate_lr_multiplier=value)


def test_schedules_are_the_references():
    """LibMTL's LTB: warm-up while epoch < E/100, tau = (E/20)/sqrt(epoch + 1). brdav's BMTAS: E//20 warm-up
    epochs, then tau linear from 5.0 to 0.1."""
    assert [gates.ltb_warmup(e, 80) for e in range(3)] == [True, False, False]
    assert [gates.ltb_warmup(e, 250) for e in range(4)] == [True, True, True, False]
    assert gates.ltb_temperature(0, 80) == pytest.approx(4.0) and gates.ltb_temperature(3, 80) == pytest.approx(2.0)
    taus = [gates.bmtas_temperature(e, 40, 2) for e in range(40)]
    assert taus[:2] == [None, None] and taus[2] == pytest.approx(5.0) and taus[-1] == pytest.approx(0.1)
    steps = [a - b for a, b in zip(taus[2:], taus[3:])]
    assert all(s == pytest.approx(4.9 / 37) for s in steps)
    assert gates.bmtas_warmup_epochs(40) == 2 and gates.bmtas_warmup_epochs(19) == 0


def test_ltb_warmup_ends_exactly_at_one_percent_of_the_epochs():
    """epoch < E/100 strictly: a 100-epoch run warms up for its first epoch only, a 200-epoch run for two."""
    assert [gates.ltb_warmup(e, 100) for e in range(3)] == [True, False, False]
    assert [gates.ltb_warmup(e, 200) for e in range(4)] == [True, True, False, False]


def test_ltb_search_space(stages):
    """LibMTL gates the inputs of layer1-4 only; the wide option gates every location and the heads."""
    assert make(LTB, stages).gate_keys() == ["loc1", "loc2", "loc3", "loc4"]
    assert make(LTB, stages, search_space="all").gate_keys() == [f"loc{l}" for l in range(1, 10)] + ["heads"]
    with pytest.raises(ValueError, match="search_space"):
        make(LTB, stages, search_space="wide")


# ------------------------------------------------------------------------------------ plan extraction
def test_hand_set_gates_give_the_encoded_tree(stages):
    """S and D share locations 0-1, E splits at 0: the D node at 2 reads the S node at 1; the D node at 1
    (reading E's node at 0) is on no task's chain and is dropped."""
    model = make(LTB, stages, search_space="all")
    identity = [0, 1, 2]
    parents = [identity for _ in range(stages.num_locations)]  # levels 1..9 and the heads
    parents[0] = [0, 2, 2]  # location 1: S reads S, D reads E (unused), E reads E
    parents[1] = [0, 0, 2]  # location 2: S and D read S's node at 1
    set_gates(model, parents)
    expected = BranchingPlan("SDE", [[["S", "D"], ["E"]]] * 2 + [[["S"], ["D"], ["E"]]] * 8)
    assert model.derived_plan() == expected

    parents[-1] = [1, 1, 2]  # the S and D heads both read D's last node: they now share every location
    set_gates(model, parents)
    assert model.derived_plan() == BranchingPlan("SDE", [[["S", "D"], ["E"]]] * 10)


def test_bmtas_tasks_that_part_never_rejoin(stages):
    """BMTAS: S and D pick the same operations at 0-1 and share there; E and D pick operation 2 at location 2
    but parted before, so each gets its own copy of it."""
    model = make(BMTAS, stages)
    ops = [[0, 0, 2], [1, 1, 1], [0, 2, 2]] + [[0, 1, 2]] * 7  # per location: the operation of S, D, E
    set_gates(model, ops)
    expected = BranchingPlan("SDE", [[["S", "D"], ["E"]]] * 2 + [[["S"], ["D"], ["E"]]] * 8)
    assert model.derived_plan() == expected
    assert model.derived_nodes()[(2, ("D",))] == model.derived_nodes()[(2, ("E",))] == 2


@pytest.mark.parametrize("architecture", [LTB, BMTAS])
def test_ties_keep_the_own_slot(stages, architecture):
    model = make(architecture, stages)
    assert model.derived_plan() == BranchingPlan.single_task("SDE", stages.num_locations)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("network", ["compact", "authors"])
@pytest.mark.parametrize("architecture", [LTB, BMTAS])
def test_evaluation_runs_exactly_the_derived_branched_network(stages, seed, network, architecture):
    """With random gates, the supernet in eval mode runs one node per group of its derived plan, and computes
    what a BranchedNetwork of that plan computes with those nodes' weights (decoder skips included; on the
    authors' network every head reads four locations of its chain)."""
    if network == "authors":
        stages = build_stages(load_preset("smoke").replace(network="authors"))
    torch.manual_seed(seed)
    model = make(architecture, stages, **({"search_space": "all"} if architecture is LTB else {}))
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(torch.randn_like(gate))
    model.eval()
    plan = model.derived_plan()
    assert plan != BranchingPlan.single_task("SDE", stages.num_locations)
    calls = []
    hooks = [node.register_forward_hook(lambda *_, n=name: calls.append(n)) for name, node in model.nodes.items()]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        preds = model(x)
    for hook in hooks:
        hook.remove()
    assert len(calls) == sum(len(p) for p in plan.partitions)

    branched = BranchedNetwork(plan, stages, dict(model.heads))
    for (location, group), slot in model.derived_nodes().items():
        branched.node(location, group).load_state_dict(model.node(location, slot).state_dict())
    branched.eval()
    derived = model.derived_network().eval()  # what a retrained or exported search result starts from
    with torch.no_grad():
        expected, _ = branched(x)
        built, _ = derived(x)
    for task in "SDE":
        torch.testing.assert_close(preds[task], expected[task])
        torch.testing.assert_close(built[task], expected[task])
    costs = model.stage_gmac(32, 32)  # the logged cost: every node the derived network runs, one per group
    assert model.search_record()["derived_gmac"] == pytest.approx(sum(costs[int(n.split("-")[0])] for n in calls))


# ------------------------------------------------------------------------------------ LTB's sampling
@pytest.mark.parametrize("network", ["compact", "authors"])
def test_sampled_parents_run_the_same_chains_as_hard_parents(stages, network):
    """During the search every node runs on its straight-through mixture of parents; the values (every head
    location's, for the authors' four-location heads) are those of running the sampled chains alone, and the
    gates get a gradient."""
    if network == "authors":
        stages = build_stages(load_preset("smoke").replace(network="authors"))
    torch.manual_seed(0)
    model = make(LTB, stages, search_space="all")
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(torch.randn_like(gate))
        for p in model.nodes.parameters():  # candidates that differ (identical ones give the gates no gradient)
            p.add_(0.1 * torch.randn_like(p))
    sampled = [gates.sample_parents(model.gates[model.gate_key(l)], 1.0) for l in model.gated_levels]
    selections, parents = [s for s, _ in sampled], [p for _, p in sampled]
    assert any(p != list(range(3)) for p in parents)  # some task reads another's node
    x = torch.randn(2, 3, 32, 32)
    mixed = model.run_trunk(x, parents, selections)
    with torch.no_grad():
        hard = model.run_chains(x, gates.task_chains(parents))
    for task in "SDE":
        assert len(mixed[task]) == len(stages.head_locations)
        for a, b in zip(mixed[task], hard[task]):
            torch.testing.assert_close(a, b)
    sum(f.sum() for feats in mixed.values() for f in feats).backward()
    assert model.gates["heads"].grad is not None and model.gates["heads"].grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [4.0, 1.0, 0.1])
def test_sampled_parents_follow_softmax_of_the_logits_at_every_temperature(temperature):
    """Chi-square goodness of fit of 3000 draws per row against softmax(logits) (not softmax(logits / tau)):
    the statistic of each row (2 degrees of freedom) stays below 13.8, its 0.999 quantile."""
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0], [-0.5, 0.0, 1.5]])
    draws = 3000
    selection, parents = gates.sample_parents(logits.repeat(draws, 1), temperature)
    parents = torch.tensor(parents)
    assert torch.equal(selection.argmax(dim=1), parents)
    counts = torch.nn.functional.one_hot(parents, 3).float().view(draws, 3, 3).sum(dim=0)
    expected = draws * logits.softmax(dim=1)
    chi_square = ((counts - expected) ** 2 / expected).sum(dim=1)
    assert (chi_square < 13.8).all(), chi_square
    if temperature != 1.0:  # the tempered law is clearly rejected
        tempered = draws * (logits / temperature).softmax(dim=1)
        assert ((counts - tempered) ** 2 / tempered).sum(dim=1).max() > 50


def test_ltb_warmup_feeds_every_gated_child_the_sum_of_its_parents(stages):
    model = make(LTB, stages)
    model.train()
    model.epoch, model.total_epochs = 0, 80
    assert model.in_warmup() and model.temperature is None
    seen = {}
    hooks = [model.node(l, j).register_forward_hook(lambda m, i, o, key=(l, j): seen.__setitem__(key, (i[0], o)))
             for l in range(3) for j in range(3)]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    for location in (1, 2):  # gated levels: each child reads the sum of the three parents
        total = sum(seen[(location - 1, k)][1] for k in range(3))
        for j in range(3):
            torch.testing.assert_close(seen[(location, j)][0], total)
    model.epoch = 1
    assert not model.in_warmup() and model.temperature == pytest.approx(4 / 2 ** 0.5)


@pytest.mark.parametrize("architecture, epoch, expected", [(LTB, 3, 2.0), (BMTAS, 4, 5.0), (BMTAS, 79, 0.1)])
def test_the_search_samples_at_the_epochs_temperature(stages, monkeypatch, architecture, epoch, expected):
    """Every Gumbel-softmax draw of a search step uses the schedule's temperature (LTB's (80 / 20) / sqrt(4) at
    0-based epoch 3; BMTAS's 5 after its warm-up of 80 // 20 epochs, falling to 0.1 at the last): a draw at another
    temperature left every other test of the search passing."""
    model = make(architecture, stages).train()
    model.epoch, model.total_epochs = epoch, 80
    assert model.searching and model.temperature == pytest.approx(expected)
    drawn, draw = [], torch.nn.functional.gumbel_softmax
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax",
                        lambda logits, tau, **kwargs: drawn.append(tau) or draw(logits, tau=tau, **kwargs))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert drawn and all(tau == pytest.approx(expected) for tau in drawn), drawn


# ------------------------------------------------------------------------------------ BMTAS resource loss
class TinyStages:
    """Two locations of 1x1 convolutions: enough to enumerate every choice."""

    specs = (StageSpec("a", 3, 4, 1), StageSpec("b", 4, 4, 1))
    num_locations = 2
    head_locations = (1,)

    def build(self, location):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(location)
            return nn.Conv2d(self.specs[location].in_channels, self.specs[location].out_channels, 1)


class TinyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 1, 1)

    def forward(self, features, size):
        return self.conv(features[-1])


def brute_force_gflops(model, costs):
    """Expected GFLOPs of the derived network over all 3^6 joint choices, each costed by the plan it describes."""
    probs = [logits.detach().softmax(dim=-1) for logits in model.choice_logits()]
    num = len(model.tasks)
    table = [StageCost(0, c) for c in costs]
    total = 0.0
    for outcome in itertools.product(range(num), repeat=num * len(probs)):
        ops = [outcome[l * num:(l + 1) * num] for l in range(len(probs))]
        weight = 1.0
        for location, row in enumerate(ops):
            for task, op in enumerate(row):
                weight *= float(probs[location][task, op])
        chains = [[ops[l][t] for l in range(len(probs))] for t in range(num)]
        total += weight * gates.plan_from_chains(model.tasks, chains)[0].cost(table).gmac
    return total


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_resource_loss_equals_the_brute_force_expectation(seed):
    costs = [0.7, 1.3]
    model = BMTAS(list("SDE"), TinyStages, {t: TinyHead() for t in "SDE"}, False, False, "cpu",
                  stage_gflops=costs, resource_weight=0.5, candidates="identical")
    torch.manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(torch.randn_like(gate))
    expected = brute_force_gflops(model, costs)
    assert float(model.expected_gflops().detach()) == pytest.approx(expected, rel=1e-6)
    assert float(model.architecture_loss().detach()) == pytest.approx(0.5 * expected, rel=1e-6)


def brdav_brute_force(probabilities):
    """brdav's ``BranchingLoss`` written out over the set partitions (not the package's tables): per location, the
    probability that the operations group the tasks exactly as ``k`` (all joint choices enumerated) times the
    previous location's probabilities of the non-split partitions ``k`` refines; the fully split one takes the
    rest; the expected number of groups."""
    num = probabilities[0].shape[0]
    tasks = list(range(num))

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for smaller in partitions(rest):
            for i in range(len(smaller)):
                yield smaller[:i] + [[first] + smaller[i]] + smaller[i + 1:]
            yield [[first]] + smaller

    canon = lambda part: frozenset(frozenset(g) for g in part)  # noqa: E731
    parts = [canon(p) for p in partitions(tasks) if len(p) < num]
    refines = lambda k, c: all(any(g <= h for h in c) for g in k)  # noqa: E731
    counts, previous = [], None
    for probs in probabilities:
        exactly = dict.fromkeys(parts, 0.0)
        for ops in itertools.product(tasks, repeat=num):
            groups = canon([[t for t in tasks if ops[t] == op] for op in set(ops)])
            if groups in exactly:
                exactly[groups] += float(torch.prod(torch.stack([probs[t, ops[t]] for t in tasks])))
        current = {k: exactly[k] * (1.0 if previous is None else sum(previous[c] for c in parts if refines(k, c)))
                   for k in parts}
        counts.append(sum(p * len(k) for k, p in current.items()) + (1 - sum(current.values())) * num)
        previous = current
    return counts


@pytest.mark.parametrize("num", [2, 3, 4])
def test_brdav_resource_form_is_its_branching_loss(num):
    torch.manual_seed(num)
    probabilities = [torch.randn(num, num, dtype=torch.float64).mul(2).softmax(-1) for _ in range(3)]
    got = gates.brdav_group_counts(probabilities)
    assert got.tolist() == pytest.approx(brdav_brute_force(probabilities), rel=1e-9)
    assert got[0] == pytest.approx(float(gates.expected_group_counts(probabilities)[0]))  # the same at the first


def test_brdav_resource_form_counts_tasks_that_regroup_after_parting_as_split():
    """Operations that group tasks across an earlier split: brdav counts every task apart, the exact form (and the
    derived network, which gives each regrouped task its own copy) the groups that are left."""
    eye = torch.eye(4, dtype=torch.float64)
    choices = [eye[[0, 0, 1, 1]], eye[[0, 0, 0, 1]]]  # {SD}{EN}, then operations {SDE}{N}: groups {SD}{E}{N}
    assert gates.brdav_group_counts(choices).tolist() == [2.0, 4.0]
    assert gates.expected_group_counts(choices).tolist() == [2.0, 3.0]
    nested = [eye[[0, 0, 1, 1]], eye[[2, 2, 1, 3]]]  # a refinement: both forms are exact
    assert gates.brdav_group_counts(nested).tolist() == gates.expected_group_counts(nested).tolist() == [2.0, 3.0]


def test_bmtas_resource_option(stages):
    exact = make(BMTAS, stages, stage_gflops=[1.0] * stages.num_locations)
    brdav = make(BMTAS, stages, stage_gflops=[1.0] * stages.num_locations, resource="brdav")
    brdav.load_state_dict(exact.state_dict())
    probs = [logits.detach().softmax(-1) for logits in exact.choice_logits()]
    got, exact_cost = float(brdav.expected_gflops().detach()), float(exact.expected_gflops().detach())
    assert got == pytest.approx(float(gates.brdav_group_counts(probs).sum()))
    assert got > exact_cost + 0.1  # uniform choices: brdav overstates (28.79 against 28.63 nodes in all)
    with pytest.raises(ValueError, match="resource must be one of"):
        make(BMTAS, stages, resource="approximate")
    with pytest.raises(ValueError, match="8 tasks is more than the 7"):
        gates.brdav_group_counts([torch.full((8, 8), 1 / 8)])


@pytest.mark.parametrize("resource,limit", [("brdav", gates.MAX_BRDAV_TASKS), ("exact", gates.MAX_EXACT_TASKS)])
def test_bmtas_refuses_more_tasks_than_its_resource_form_serves_when_built(stages, resource, limit):
    """The resource loss is first computed after the first epoch (the search's record, the architecture step): a
    task count its form cannot serve is refused when the supernet is built, before any training, in one line."""
    def build(count):
        tasks = [f"t{i}" for i in range(count)]
        return BMTAS(tasks, lambda: stages, {t: stages.build_head(1) for t in tasks}, False, False, "cpu",
                     resource=resource, candidates="identical", stage_gflops=[1.0] * stages.num_locations)

    assert float(build(limit).expected_gflops().detach()) > 0
    with pytest.raises(ValueError, match=rf"^BMTAS resource '{resource}' serves at most {limit} tasks, got "
                                         rf"{limit + 1}") as caught:
        build(limit + 1)
    assert "\n" not in str(caught.value)


def test_extremes_of_the_resource_loss(stages):
    model = make(BMTAS, stages, stage_gflops=[1.0] * stages.num_locations)
    set_gates(model, gates.identity_parents(3, stages.num_locations), scale=100)
    assert float(model.expected_gflops().detach()) == pytest.approx(3.0 * stages.num_locations)  # three networks
    set_gates(model, [[1, 1, 1]] * stages.num_locations, scale=100)
    assert float(model.expected_gflops().detach()) == pytest.approx(1.0 * stages.num_locations)  # one network


def test_node_costs_are_the_references_gflops_at_512x512(stages):
    """Two FLOPs per multiply-add, one node per location, counted on one 512x512 image."""
    model = make(BMTAS, stages)
    gmac = model.stage_gmac(512, 512)
    torch.testing.assert_close(model.stage_gflops(), 2 * torch.tensor(gmac))
    assert model.stage_gmac(64, 64)[0] == pytest.approx(gmac[0] / 64, rel=1e-6)


def test_counting_the_node_costs_leaves_the_supernet_in_its_mode_when_it_raises(stages, monkeypatch):
    """The node costs are counted in evaluation mode; an error while counting (caught by the caller, who goes on
    searching) leaves the supernet in the mode it was in."""
    import baselines.supernet

    def fails(run):
        raise RuntimeError("cannot count")

    model = make(BMTAS, stages)
    monkeypatch.setattr(baselines.supernet, "count_gmac", fails)
    for training in (True, False):
        model.train(training)
        with pytest.raises(RuntimeError, match="cannot count"):
            model.stage_gmac(32, 32)
        assert all(m.training == training for m in model.modules())


def test_descending_the_resource_loss_shares_nodes(stages):
    model = make(BMTAS, stages, stage_gflops=[1.0] * stages.num_locations)
    torch.manual_seed(0)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(torch.randn_like(gate) * 0.01)  # off the uniform point, where the gradient is zero
    optimizer = torch.optim.Adam(model.architecture_parameters(), lr=0.05)
    start = float(model.expected_gflops().detach())
    trace = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = model.architecture_loss()
        loss.backward()
        optimizer.step()
        trace.append(float(model.expected_gflops().detach()))
    assert trace[5] < start and trace[-1] < 0.8 * start and trace[-1] >= stages.num_locations - 1e-6
    nodes = sum(len(p) for p in model.derived_plan().partitions)
    assert nodes < 3 * stages.num_locations


def test_the_architecture_step_counts_the_resource_term_once_per_task(smoke, monkeypatch):
    """brdav backpropagates every task's loss with the resource term added before one architecture step, so
    the resource gradient on the gates is T times that of one resource term (here with task losses that give
    the gates no gradient: T = 3 times exactly)."""
    config = smoke(tasks="SDE")
    seed_everything(0)
    data, dataset = build_data(config)
    stages = build_stages(config)
    trainer = build_trainer(config, build_tasks(config.tasks, dataset.num_classes), None, stages,
                            architecture=BMTAS, arch_args={"resource_weight": 0.05, "warmup_epochs": 0})
    model = trainer.model
    model.epoch = 1
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(0.3 * torch.randn(gate.shape, generator=torch.Generator().manual_seed(0)))
    params = model.architecture_parameters()
    once = torch.autograd.grad(model.architecture_loss(), params)
    monkeypatch.setattr(trainer, "task_losses", lambda preds, gts: torch.stack([preds[t].sum() * 0 for t in "SDE"]))
    model.architecture_epoch(trainer, [next(iter(data.batches(data.train, key=(0, 0))))], progress=False)
    for gradient, param in zip(once, params):
        torch.testing.assert_close(param.grad, 3 * gradient)


def test_the_architecture_step_computes_no_weight_gradient(smoke):
    """An architecture step needs the gates' gradient only: no weight's gradient is computed (each would cost a
    backward pass of its own over the batch and be discarded), and the gates still move."""
    config = smoke(tasks="SDE")
    seed_everything(0)
    data, dataset = build_data(config)
    trainer = build_trainer(config, build_tasks(config.tasks, dataset.num_classes), None, build_stages(config),
                            architecture=BMTAS, arch_args={"warmup_epochs": 0})
    model = trainer.model
    model.epoch = 1
    gates = model.architecture_parameters()
    computed = []
    for name, param in model.named_parameters():
        if not any(param is gate for gate in gates):
            param.register_hook(lambda grad, name=name: computed.append(name))
    before = [gate.detach().clone() for gate in gates]
    model.architecture_epoch(trainer, [next(iter(data.batches(data.train, key=(0, 0))))], progress=False)
    assert computed == []
    assert any(not torch.equal(old, gate) for old, gate in zip(before, gates))


def search_smoke(smoke, resource_weight, epochs=3):
    """A BMTAS search on the smoke data (3 tasks, warm-up of one epoch)."""
    config = smoke(tasks="SDE")
    config = config.replace(epochs=epochs, mtsl=dataclasses.replace(config.mtsl, total_epochs=epochs))  # one budget
    seed_everything(0)
    data, dataset = build_data(config)
    tasks = build_tasks(config.tasks, dataset.num_classes)
    stages = build_stages(config)
    trainer = build_trainer(config, tasks, None, stages, architecture=BMTAS,
                            arch_args={"resource_weight": resource_weight, "warmup_epochs": 1})
    trainer.fit(data, epochs, progress=False)
    return trainer, data


def test_resource_gradient_on_the_gates_is_not_negligible(smoke):
    """At λ = 0.05 in the reference's units, the resource loss's gradient on the gates against the task
    losses', after a short search on the smoke preset, on a batch (printed: run pytest -s to read it). At the
    uniform start it is zero by symmetry; once the choices spread (logits of spread 0.3, which the
    architecture steps reach in a few dozen steps at lr 0.01) it is a sizeable share."""
    trainer, data = search_smoke(smoke, 0.05)
    model = trainer.model
    model.train()
    images, gts = next(iter(data.batches(data.train, key=(9, 0))))
    params = model.architecture_parameters()

    def ratio() -> float:
        task = torch.autograd.grad(trainer.task_losses(model(images), gts).sum(), params)
        resource = torch.autograd.grad(model.architecture_loss(), params)
        return float(torch.cat([g.flatten() for g in resource]).norm() / torch.cat([g.flatten() for g in task]).norm())

    near_uniform = ratio()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(0.3 * torch.randn(gate.shape, generator=generator))
    spread = ratio()
    print(f"BMTAS smoke, lambda 0.05: |grad resource| / |grad tasks| on the gates = {near_uniform:.4f} after the "
          f"search's first steps, {spread:.3f} at logits of spread 0.3")
    assert near_uniform < spread and spread > 0.02


def test_a_larger_resource_weight_gives_a_cheaper_expected_network(smoke):
    small, _ = search_smoke(smoke, 0.05, epochs=4)
    large, _ = search_smoke(smoke, 5.0, epochs=4)
    assert float(large.model.expected_gflops().detach()) < float(small.model.expected_gflops().detach())
    history = large.history
    assert all("gate_entropy" in h and "expected_gflops" in h and "derived_gmac" in h for h in history)


# ------------------------------------------------------------------------------------ through the harness
@pytest.mark.parametrize("method", ["ltb", "bmtas"])
def test_run_method_reports_the_derived_plan(smoke, stages, tmp_path, method):
    result = run_method(smoke(tasks=("S", "D", "E")), method, tmp_path / method, progress=False)
    plan = BranchingPlan.from_dict(result["plan"])
    assert plan.tasks == ("S", "D", "E") and plan.num_locations == 10
    assert BranchingPlan.from_dict(json.loads((tmp_path / method / "plan.json").read_text())) == plan
    assert all(torch.isfinite(torch.tensor(v)) for v in result["metrics"].values())
    # the reported cost is the derived branched network's, not the supernet's
    heads = {"S": stages.build_head(10), "D": stages.build_head(1), "E": stages.build_head(1)}
    derived = BranchedNetwork(plan, stages, heads)
    assert result["gmac"] == pytest.approx(derived.cost(32, 32).gmac, rel=1e-6)
    assert result["params_m"] == pytest.approx(sum(p.numel() for p in derived.parameters()) / 1e6)


def test_retrained_variants_start_from_fresh_weights_with_the_searched_plan(tmp_path, monkeypatch):
    """LTB-R and MTSL-R retrain their source's final plan from the initialisation every method starts from,
    not from the source's trained weights."""
    from mtsl_plugin.trainer import MTLTrainer
    initial = {}
    fit = MTLTrainer.fit

    def recording_fit(self, data, total_epochs, **kwargs):
        initial.setdefault(len(initial), {k: v.clone() for k, v in self.model.state_dict().items()})
        return fit(self, data, total_epochs, **kwargs)

    monkeypatch.setattr(MTLTrainer, "fit", recording_fit)
    out = tmp_path / "r"
    code = compare.main(["--methods", "ltb_r,mtsl_r,bmtas_r", "--preset", "smoke", "--tasks", "S,D", "--out",
                         str(out), "--no-progress"])
    assert code == 0
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(runs) == ["stn", "onenet", "ltb", "ltb_r", "mtsl", "mtsl_r", "bmtas", "bmtas_r"]
    assert all(r["status"] == "ok" for r in runs.values())
    assert (out / "search.png").is_file()  # the search curves of ltb and bmtas
    history = {m: json.loads((out / m / "seed0" / "result.json").read_text())["history"] for m in ("ltb", "bmtas")}
    assert "expected_gflops" in history["bmtas"][-1] and "gate_entropy" in history["ltb"][-1]
    starts = dict(zip(runs, initial.values()))

    config = load_preset("smoke").replace(tasks=("S", "D"))
    stages = build_stages(config)
    tasks = build_tasks(["S", "D"], build_data(config)[1].num_classes)
    for retrained, source in (("ltb_r", "ltb"), ("mtsl_r", "mtsl"), ("bmtas_r", "bmtas")):
        assert runs[retrained]["plan"] == runs[source]["plan"]
        plan = BranchingPlan.from_dict(runs[source]["plan"])
        fresh = build_trainer(config, tasks, plan, stages).model.state_dict()
        start = starts[retrained]
        assert start.keys() == fresh.keys()
        assert all(torch.equal(start[k], fresh[k]) for k in fresh)
        trained = torch.load(out / source / "seed0" / "model.pt", weights_only=True)["model"]
        start_nodes, trained_nodes = node_weights(start), node_weights(trained)
        assert start_nodes.keys() == trained_nodes.keys()
        assert not any(torch.equal(start_nodes[k], trained_nodes[k]) for k in start_nodes)


def node_weights(state):
    """``{(location, parameter name): tensor}`` of the first node at each location of a state dict (LTB's
    supernet and the branched network name their nodes differently)."""
    nodes = {}
    for key, value in state.items():
        if ".nodes." in f".{key}" and key.endswith("weight"):
            node, rest = key.split("nodes.", 1)[1].split(".", 1)
            nodes.setdefault((node.split("-")[0], rest), value)
    return nodes


def test_ltb_warmup_shares_every_node_below_its_last_gate_with_every_task(stages):
    """In the warm-up every gated child reads the sum of its parents, so every node below the last gated level
    feeds every task's loss: LibMTL's gradient weightings (PCGrad, MGDA, ...) must see them as shared (they saw
    none, so those methods fell back to the summed loss for the warm-up). After it, only nodes on every task's
    sampled chain are."""
    model = make(LTB, stages)
    model.train()
    model.epoch, model.total_epochs = 0, 80
    model(torch.randn(4, 3, 32, 32))
    last_gate = max(model.gated_levels)
    expected = {id(p) for l in range(last_gate) for j in range(3) for p in model.node(l, j).parameters()}
    assert {id(p) for p in model.get_share_params()} == expected and 0 < last_gate < model.num_locations
    model.epoch = 1
    set_gates(model, [[0, 1, 2]] * len(model.gated_levels), scale=50.0)  # every task keeps its own chain
    model(torch.randn(4, 3, 32, 32))
    assert list(model.get_share_params()) == []
    set_gates(model, [[0, 0, 2]] * len(model.gated_levels), scale=50.0)  # two tasks of three share a chain
    model(torch.randn(4, 3, 32, 32))
    assert list(model.get_share_params()) == []  # (MGDA's minimum-norm point was the third's zero gradient)


def test_gate_entropy_is_log_t_when_uniform_and_falls_as_the_gates_decide(stages):
    model = make(LTB, stages)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.zero_()
    assert model.gate_entropy() == pytest.approx(math.log(3)) == model.search_record()["max_entropy"]
    set_gates(model, [[0, 1, 2]] * len(model.gates), scale=30.0)
    assert 0 <= model.gate_entropy() < 1e-6


@pytest.mark.parametrize("training", [True, False])
def test_counting_the_stage_cost_keeps_the_models_mode(stages, training):
    model = make(BMTAS, stages).train(training)
    assert model.stage_gmac(32, 32) and model.training == training
