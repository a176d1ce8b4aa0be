"""LTB and BMTAS: gated supernet training, plan extraction, the exact resource loss, and runs through the harness."""
import itertools
import json

import pytest
import torch
from torch import nn

import baselines.bmtas  # noqa: F401  (registers bmtas, bmtas_r)
import baselines.ltb  # noqa: F401  (registers ltb, ltb_r)
from baselines import gates
from baselines.bmtas import BMTAS
from baselines.ltb import LTB
from benchmarks import compare
from mtsl_plugin.config import load_preset
from mtsl_plugin.experiment import build_data, build_stages, build_trainer, run_method, seed_everything
from mtsl_plugin.methods import build_method
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import ResNetStages, StageSpec
from mtsl_plugin.plan import BranchingPlan, StageCost
from mtsl_plugin.tasks import build_tasks

OUT = {"S": 5, "D": 1, "E": 1}


@pytest.fixture(scope="module")
def stages():
    return build_stages(load_preset("smoke"))  # the smoke preset's narrow ResNet18


def make(architecture, stages, tasks="SDE", **arch_args):
    heads = {t: stages.build_head(OUT[t]) for t in tasks}
    return architecture(list(tasks), lambda: stages, heads, False, False, "cpu", **arch_args)


def set_gates(model, parents):
    """Logits that make ``parents[i][j]`` the most likely parent of child ``j`` at gate level ``i + 1``."""
    with torch.no_grad():
        for key, rows in zip(model.gate_keys(), parents):
            model.gates[key].zero_()
            for child, parent in enumerate(rows):
                model.gates[key][child, parent] = 1.0


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
    assert isinstance(model, architecture) and spec.arch_args["warmup_epochs"] == 1
    model.total_epochs = 3
    batches = iter(data.batches(data.train, key=(0, 0)))

    model.epoch = 0  # warm-up: every child reads its own slot, the gates are not trained
    images, gts = next(batches)
    losses, _ = trainer.train_step(images, gts)
    assert torch.isfinite(losses).all()
    assert all(g.grad is None and not g.any() for g in model.gates.values())
    assert model.auxiliary_loss() is None if architecture is BMTAS else not hasattr(model, "auxiliary_loss")

    model.epoch = 1  # search: sampled parents, gradients reach every gate level, the optimizer moves the gates
    images, gts = next(batches)
    losses, _ = trainer.train_step(images, gts)
    assert torch.isfinite(losses).all()
    for key, gate in model.gates.items():
        assert gate.grad is not None and torch.isfinite(gate.grad).all() and gate.grad.abs().sum() > 0, key
        assert gate.any(), key
    if architecture is BMTAS:
        aux = model.auxiliary_loss()
        assert aux.dim() == 0 and torch.isfinite(aux) and 0 < aux <= spec.arch_args["resource_weight"]

    plan = model.derived_plan()
    assert isinstance(plan, BranchingPlan)
    assert plan.tasks == ("S", "D", "E") and plan.num_locations == stages.num_locations
    model.eval()
    with torch.no_grad():
        first, second = model(images), model(images)
    assert all(torch.equal(first[t], second[t]) for t in "SDE")
    assert all(first[t].shape == (images.shape[0], tasks[t].out_channels, 32, 32) for t in "SDE")


def test_temperature_is_fixed_during_warmup_then_decays_exponentially():
    taus = [gates.temperature(e, 10, 2, 1.0, 0.1) for e in range(10)]
    assert taus[:2] == [None, None]
    assert taus[2] == pytest.approx(1.0) and taus[-1] == pytest.approx(0.1)
    ratios = [b / a for a, b in zip(taus[2:], taus[3:])]
    assert all(r == pytest.approx(ratios[0]) for r in ratios) and ratios[0] < 1


# ------------------------------------------------------------------------------------ plan extraction
def test_hand_set_gates_give_the_encoded_tree(stages):
    """S and D share locations 0-1, E splits at 0: the D node at 2 reads the S node at 1; the D node at 1
    (reading E's node at 0) is on no task's chain and is dropped."""
    model = make(LTB, stages)
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


def test_ties_keep_the_own_slot(stages):
    model = make(LTB, stages)
    assert model.derived_plan() == BranchingPlan.single_task("SDE", stages.num_locations)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("network", ["compact", "authors"])
def test_evaluation_runs_exactly_the_derived_branched_network(stages, seed, network):
    """With random gates, the supernet in eval mode runs one node per group of its derived plan, and computes
    what a BranchedNetwork of that plan computes with those nodes' weights (decoder skips included; on the
    authors' network every head reads four locations of its chain)."""
    if network == "authors":
        stages = build_stages(load_preset("smoke").replace(network="authors"))
    torch.manual_seed(seed)
    model = make(LTB, stages)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(torch.randn_like(gate))
    model.eval()
    plan = model.derived_plan()
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
    with torch.no_grad():
        expected, _ = branched(x)
    for task in "SDE":
        torch.testing.assert_close(preds[task], expected[task])


@pytest.mark.parametrize("network", ["compact", "authors"])
def test_sampled_parents_run_the_same_chains_as_hard_parents(stages, network):
    """During the search every node runs on its straight-through mixture of parents; the values (every head
    location's, for the authors' four-location heads) are those of running the sampled chains alone, and the
    gates get a gradient."""
    if network == "authors":
        stages = build_stages(load_preset("smoke").replace(network="authors"))
    torch.manual_seed(0)
    model = make(LTB, stages)
    sampled = [gates.sample_parents(logits, 1.0) for logits in model.gate_logits()]
    selections, parents = [s for s, _ in sampled], [p for _, p in sampled]
    assert any(p != list(range(3)) for p in parents)  # some task reads another's node
    x = torch.randn(2, 3, 32, 32)
    mixed = model.run_trunk(x, parents, selections)
    with torch.no_grad():
        hard = model.run_trunk(x, parents)
    for task in "SDE":
        assert len(mixed[task]) == len(stages.head_locations)
        for a, b in zip(mixed[task], hard[task]):
            torch.testing.assert_close(a, b)
    sum(f.sum() for feats in mixed.values() for f in feats).backward()
    assert model.gates["heads"].grad is not None and model.gates["heads"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ BMTAS resource loss
class TinyStages:
    """Two locations of 1x1 convolutions: enough to enumerate every gate outcome."""

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


def brute_force_gmac(model, costs, temperature):
    """Expected GMac of the used nodes over all 3^6 joint gate outcomes, each costed by the plan it describes."""
    probs = [p.detach() for p in model.parent_probabilities(temperature)]
    num = len(model.tasks)
    table = [StageCost(0, c) for c in costs]
    total = 0.0
    for outcome in itertools.product(range(num), repeat=num * len(probs)):
        parents = [outcome[i * num:(i + 1) * num] for i in range(len(probs))]
        weight = 1.0
        for level, rows in enumerate(parents):
            for child, parent in enumerate(rows):
                weight *= float(probs[level][child, parent])
        total += weight * gates.plan_from_parents(model.tasks, parents)[0].cost(table).gmac
    return total


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_resource_loss_equals_the_brute_force_expectation(seed):
    costs = [0.7, 1.3]
    model = BMTAS(list("SDE"), TinyStages, {t: TinyHead() for t in "SDE"}, False, False, "cpu",
                  stage_gmac=costs, resource_weight=0.5, warmup_epochs=0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(torch.randn_like(gate) * 0.1)  # x gate_scale 10: logits of about one
    for temperature in (1.0, 0.3):
        expected = brute_force_gmac(model, costs, temperature)
        assert float(model.expected_gmac(temperature).detach()) == pytest.approx(expected, rel=1e-5)
    model.train()
    model.epoch, model.total_epochs = 1, 3  # the second of three search epochs
    tau = model.temperature
    assert tau == pytest.approx(0.1 ** 0.5)
    model(torch.randn(1, 3, 4, 4))
    expected = brute_force_gmac(model, costs, tau)
    assert float(model.auxiliary_loss().detach()) == pytest.approx(0.5 * expected / (3 * sum(costs)), rel=1e-5)
    model.eval()
    assert model.auxiliary_loss() is None


def test_sampled_parents_follow_the_tempered_gate_distribution():
    """The resource loss is an expectation under softmax(logits / tau): that is how parents are sampled."""
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0], [-0.5, 0.0, 0.5]])
    for tau in (1.0, 0.5):
        selection, parents = gates.sample_parents(logits.repeat(4000, 1), tau)  # 4000 draws of every row
        parents = torch.tensor(parents)
        assert torch.equal(selection.argmax(dim=1), parents)
        torch.testing.assert_close(selection.detach().sum(dim=1), torch.ones(12000))  # one-hot rows
        frequencies = torch.nn.functional.one_hot(parents, 3).float().view(4000, 3, 3).mean(dim=0)
        torch.testing.assert_close(frequencies, (logits / tau).softmax(dim=1), atol=0.03, rtol=0)


def test_extremes_of_the_resource_loss(stages):
    model = make(BMTAS, stages, stage_gmac=[1.0] * stages.num_locations)
    set_gates(model, gates.identity_parents(3, stages.num_locations))
    with torch.no_grad():
        for gate in model.gates.values():
            gate.mul_(100)
    assert float(model.resource_loss().detach()) == pytest.approx(1.0)  # single-task networks
    set_gates(model, [[0, 0, 0]] * stages.num_locations)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.mul_(100)
    assert float(model.resource_loss().detach()) == pytest.approx(1 / 3)  # one network


def test_descending_the_resource_loss_shares_nodes(stages):
    model = make(BMTAS, stages)
    model.input_size = (32, 32)  # node costs are counted at the first forward's size
    torch.manual_seed(0)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.copy_(torch.randn_like(gate) * 0.01)
    optimizer = torch.optim.Adam(model.gates.parameters(), lr=0.05)
    start = float(model.resource_loss().detach())
    trace = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = model.resource_loss()
        loss.backward()
        optimizer.step()
        trace.append(float(loss.detach()))
    assert trace[5] < start and trace[-1] < 0.8 * start and trace[-1] >= 1 / 3 - 1e-6  # 1/3: one network
    nodes = sum(len(p) for p in model.derived_plan().partitions)
    assert nodes < 3 * stages.num_locations


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
