"""Property checks of the branched network's surgery on random nested plans (3 to 6 tasks, tiny widths): fused
execution against node by node, structural phases after fused and unfused training, merges of identical task
nodes, float64 networks, and resuming after a merge."""
import copy
import io
import random

import numpy as np
import pytest
import torch

from mtsl_plugin.learner.optim import sync_parameters
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import ResNetStages
from mtsl_plugin.plan import BranchingPlan

NAMES = "SDENAX"


@pytest.fixture(scope="module")
def stages():
    return ResNetStages("resnet18", backbone_args={"channels": (8, 8, 16, 16)})


def random_plan(tasks, num_locations: int, rng: random.Random) -> BranchingPlan:
    """A nested plan: shared or split at location 0, then each group split in two at random deeper down."""
    partitions = [[list(tasks)]] if rng.random() < 0.5 else [[[t] for t in tasks]]
    for _ in range(1, num_locations):
        deeper = []
        for group in partitions[-1]:
            group = list(group)
            if len(group) > 1 and rng.random() < 0.4:
                rng.shuffle(group)
                cut = rng.randint(1, len(group) - 1)
                deeper += [group[:cut], group[cut:]]
            else:
                deeper.append(group)
        partitions.append(deeper)
    return BranchingPlan(tasks, partitions)


def build(plan, stages, seed=0, dtype=torch.float64):
    """The network of ``plan`` in ``dtype``, every node perturbed differently (so nodes of a location differ)."""
    network = BranchedNetwork(plan, stages, {t: stages.build_head(2) for t in plan.tasks}).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return network


def loss_of(preds):
    return sum((p ** 2).mean() for p in preds.values())


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-10, atol=1e-10):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=rtol, atol=atol, msg=name)


def assert_same_adam(opt_a, opt_b, net_a, net_b, rtol=1e-7, atol=1e-12):
    """The optimizers hold the networks' parameters in the same order with the same state and settings."""
    assert [id(p) for p in opt_a.param_groups[0]["params"]] == [id(p) for p in net_a.parameters()]
    assert [id(p) for p in opt_b.param_groups[0]["params"]] == [id(p) for p in net_b.parameters()]
    assert set(map(id, opt_a.state)) <= set(map(id, net_a.parameters()))  # removed nodes left nothing behind
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=rtol, atol=atol, msg=f"{name} {key}")


@pytest.mark.parametrize("seed", range(3))
def test_fused_equals_unfused_on_random_plans_in_train_and_eval_mode(stages, seed):
    """Random nested plans (any task order, groups of unequal size): outputs, sibling features, gradients and
    batch-norm buffers (running statistics, num_batches_tracked) of two training steps and an evaluation."""
    rng = random.Random(seed)
    tasks = list(NAMES[:rng.randint(3, 6)])
    rng.shuffle(tasks)  # a task order other than the declared one
    plain = build(random_plan(tasks, stages.num_locations, rng), stages, seed)
    fused = copy.deepcopy(plain)
    fused.fused = True
    generator = torch.Generator().manual_seed(seed)
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        fused.train(mode == "train")
        x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=generator)
        (preds_a, feats_a), (preds_b, feats_b) = plain(x), fused(x)
        assert feats_a.keys() == feats_b.keys()
        for t in tasks:
            torch.testing.assert_close(preds_b[t], preds_a[t], rtol=1e-9, atol=1e-10)
        for t in feats_a:
            torch.testing.assert_close(feats_b[t], feats_a[t], rtol=1e-9, atol=1e-10)
        plain.zero_grad(set_to_none=True)
        fused.zero_grad(set_to_none=True)
        loss_of(preds_a).backward()
        loss_of(preds_b).backward()
        for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:  # relative to the parameter's largest gradient (BN on few pixels)
                torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-8 * float(a.grad.abs().max()) + 1e-14,
                                           msg=name)
        for (name, a), b in zip(plain.named_buffers(), fused.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)


def phase(network, optimizer, config, generator, fused_amalgamation=None):
    """One structural phase of ``network`` on random images (the held-out and amalgamation data alike)."""
    images = [torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=generator) for _ in range(2)]
    batches = lambda: [(x, {}) for x in images]  # noqa: E731
    learner = StructuralLearner(config)
    return learner.structural_phase(network, network, optimizer, batches, batches, torch.device("cpu"))


@pytest.mark.parametrize("seed", range(2))
def test_a_phase_after_fused_training_equals_a_phase_after_unfused_training(stages, seed):
    """Adam steps and a learning-rate step, fused and unfused, then a structural phase that merges (γ = 0) and
    distils (ATT): the same plan, weights, BN buffers, Adam state (removed nodes' state gone, learning rate kept),
    and the next step agrees too. Float64, so the networks keep their dtype through the edit."""
    rng = random.Random(10 + seed)
    tasks = NAMES[:rng.randint(3, 5)]
    plan = random_plan(tasks, stages.num_locations, rng)
    config = MTSLConfig(threshold=0.0, amalgamation_epochs=(1,) * 10)
    results = []
    for run_fused in (False, True):
        torch.manual_seed(0)  # the amalgamator's initialisation
        network = build(plan, stages, seed)
        network.fused = run_fused
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(2):
            optimizer.zero_grad()
            loss_of(network(torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=generator))[0]).backward()
            optimizer.step()
        scheduler.step()
        record = phase(network, optimizer, config, generator)
        assert record.merged, "γ = 0 merges every sibling set"
        assert {p.dtype for p in network.parameters()} == {torch.float64}
        assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
        optimizer.zero_grad()
        loss_of(network(torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=generator))[0]).backward()
        optimizer.step()
        results.append((network, optimizer, record))
    (net_a, opt_a, rec_a), (net_b, opt_b, rec_b) = results
    assert net_a.plan == net_b.plan and rec_a.merged == rec_b.merged
    assert_same_state(net_a, net_b, rtol=1e-7, atol=1e-9)
    assert_same_adam(opt_a, opt_b, net_a, net_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merging_identical_task_nodes_gives_back_exactly_that_network(stages, dtype):
    """Two tasks whose branches are identical, weights, BN statistics and Adam state: merging them at location 0
    gives a network that predicts exactly what each task predicted, and the group node carries exactly their
    state, in the network's own dtype. (Three identical nodes may average to one ulp off: (3a)/3 rounds.)"""
    tasks = "SD"
    single = build(BranchingPlan.single_task(tasks, stages.num_locations), stages, 0, dtype)
    reference = single.node(0, ("S",))
    with torch.no_grad():  # every task's branch equal to S's
        for location in range(stages.num_locations):
            source = single.node(location, ("S",)).state_dict()
            for t in tasks[1:]:
                single.node(location, (t,)).load_state_dict(source)
        for t in tasks[1:]:
            single.heads[t].load_state_dict(single.heads["S"].state_dict())
    optimizer = torch.optim.Adam(single.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    optimizer.zero_grad()
    loss_of(single(x)[0]).backward()
    optimizer.step()
    single.eval()
    with torch.no_grad():
        before = single(x)[0]
    node_state = copy.deepcopy(reference.state_dict())
    adam_state = [copy.deepcopy(optimizer.state[p]) for p in reference.parameters()]
    learner = StructuralLearner(MTSLConfig(amalgamate=False))
    learner.measure = lambda *args: [(0, tuple(tasks), np.ones((2, 2)))]
    record = learner.structural_phase(single, single, optimizer, lambda: [], lambda: [], torch.device("cpu"))
    assert record.merged == [list(tasks)]
    group = single.node(0, tuple(tasks))
    assert all(torch.equal(v, node_state[k]) and v.dtype == node_state[k].dtype
               for k, v in group.state_dict().items())
    for p, state in zip(group.parameters(), adam_state):
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())
    with torch.no_grad():
        after = single(x)[0]
    for t in tasks:
        assert torch.equal(after[t], before[t]), t


def test_resuming_after_a_merge_continues_bit_exactly(stages):
    """A merge, then the network and optimizer saved and loaded into a network built afresh from the new plan
    (what a checkpoint does): the next steps equal those of the network that never stopped."""
    rng = random.Random(3)
    plan = random_plan("SDEN", stages.num_locations, rng)
    network = build(plan, stages, 3)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(3)
    optimizer.zero_grad()
    loss_of(network(torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=generator))[0]).backward()
    optimizer.step()
    assert phase(network, optimizer, MTSLConfig(threshold=0.0, amalgamation_epochs=(1,) * 10), generator).merged
    buffer = io.BytesIO()
    torch.save({"model": network.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = BranchedNetwork(network.plan, stages, {t: stages.build_head(2) for t in plan.tasks}).double()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for net, opt in ((network, optimizer), (resumed, resumed_optimizer)):
        steps = torch.Generator().manual_seed(4)
        for _ in range(2):
            opt.zero_grad()
            loss_of(net(torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=steps))[0]).backward()
            opt.step()
    assert_same_state(network, resumed, rtol=0, atol=0)
    assert_same_adam(optimizer, resumed_optimizer, network, resumed, rtol=0, atol=0)


def test_sync_keeps_the_learning_rate_and_drops_only_what_left_the_model():
    """Optimizer surgery on a plain module: surviving parameters keep their state object's values, the
    scheduler's learning rate stays, a removed parameter leaves no state."""
    kept, gone, new = (torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(3))
    optimizer = torch.optim.Adam([kept, gone], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    (kept.sum() + gone.sum()).backward()
    optimizer.step()
    scheduler.step()
    before = {k: v.clone() for k, v in optimizer.state[kept].items()}
    sync_parameters(optimizer, [kept, new])
    assert optimizer.param_groups[0]["params"] == [kept, new] and gone not in optimizer.state
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert all(torch.equal(before[k], optimizer.state[kept][k]) for k in before)


def test_a_single_task_network_runs_fused_and_its_phases_change_nothing(stages):
    network = build(BranchingPlan.single_task("S", stages.num_locations), stages)
    network.fused = True
    preds, features = network(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert preds["S"].shape == (2, 2, 32, 32) and features == {}
    optimizer = torch.optim.Adam(network.parameters())
    record = phase(network, optimizer, MTSLConfig(threshold=0.0), torch.Generator().manual_seed(0))
    assert record.merged == [] and record.location is None and network.plan.partitions[0] == (("S",),)
