"""Group-node creation averages weights and optimizer state; removal leaves no state behind."""
import numpy as np
import torch
from torch import nn

from mtsl_plugin.experiment import build_data, build_stages, build_trainer
from mtsl_plugin.learner.optim import average_module_state, average_parameter_state, sync_parameters
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.tasks import build_tasks


def trained_stn(config, steps=2):
    data, dataset = build_data(config)
    tasks = build_tasks(config.tasks, dataset.num_classes)
    stages = build_stages(config)
    trainer = build_trainer(config, tasks, BranchingPlan.single_task(config.tasks, 10), stages)
    for step, (images, gts) in enumerate(data.batches(data.train, key=(0, 0))):
        if step == steps:
            break
        trainer.train_step(images, gts)
    return trainer


def test_group_node_weights_and_adam_state_are_the_task_nodes_mean(smoke):
    config = smoke(tasks="SDE")
    trainer = trained_stn(config)
    net, opt = trainer.network, trainer.optimizer
    location = 2
    task_nodes = [net.node(location, (t,)) for t in "SD"]
    # the task nodes have diverged after training, so the mean is a real test
    first = [p for p in task_nodes[0].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(first, task_nodes[1].parameters()))
    learner = StructuralLearner(config.mtsl)
    created = learner._create(net, opt, location, [("S", "D")])
    group = created[(location, ("S", "D"))]
    for name, value in group.state_dict().items():
        values = [n.state_dict()[name] for n in task_nodes]
        if value.is_floating_point():
            torch.testing.assert_close(value, (values[0] + values[1]) / 2)
    for p, pa, pb in zip(group.parameters(), *(n.parameters() for n in task_nodes)):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], (opt.state[pa][key] + opt.state[pb][key]) / 2)
        assert any(p is q for q in opt.param_groups[0]["params"])


def test_removal_drops_exactly_the_removed_state(smoke):
    config = smoke(tasks="SDE")
    trainer = trained_stn(config)
    net, opt = trainer.network, trainer.optimizer
    learner = StructuralLearner(config.mtsl)
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    removed_params = {p for t in "SD" for p in net.node(0, (t,)).parameters()}
    created = learner._create(net, opt, 0, [("S", "D")])
    net.apply_plan(net.plan.merge(0, ["SD"]), created)
    sync_parameters(opt, trainer.model.parameters())
    held = opt.param_groups[0]["params"]
    assert not removed_params & set(opt.state) and not removed_params & set(held)
    assert held == list(trainer.model.parameters())
    for p, state in before.items():
        if p not in removed_params:
            assert all(torch.equal(state[k], opt.state[p][k]) for k in state)
    # the network still trains after the edit
    data, _ = build_data(config)
    images, gts = next(iter(data.batches(data.train)))
    losses, _ = trainer.train_step(images, gts)
    assert torch.isfinite(losses).all()


def test_without_average_initialisation_a_group_node_starts_fresh(smoke):
    """``average_init=False`` (paper Table 4): the group node gets the initialisation every node of its location
    starts from, and no optimizer state; the task nodes' trained weights are not used."""
    config = smoke(tasks="SDE", average_init=False)
    trainer = trained_stn(config)
    net, opt = trainer.network, trainer.optimizer
    created = StructuralLearner(config.mtsl)._create(net, opt, 2, [("S", "D")])
    group = created[(2, ("S", "D"))]
    fresh = net.stages.build(2).state_dict()
    trained = net.node(2, ("S",)).state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)  # training moved the task nodes
    assert all(torch.equal(v, fresh[k]) for k, v in group.state_dict().items())
    assert all(p not in opt.state or not opt.state[p] for p in group.parameters())
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in group.parameters())


def test_averaging_weighs_the_nodes_with_state_alike_keeps_float64_and_takes_the_largest_batch_count():
    """Three float64 nodes (conv, batch norm): one trained 3 Adam steps, one 5, one none (its batch norm counted
    one batch). Weights and running statistics are the float64 means (not rounded through float32); Adam's
    exp_avg, exp_avg_sq and step are the means over the two nodes with state (the third is left out, not counted
    as zeros: step 4, not 8/3); num_batches_tracked is the largest (5), not a mean. Written with numpy."""
    generator = torch.Generator().manual_seed(0)
    nodes = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double() for _ in range(3)]
    optimizer = torch.optim.Adam([p for node in nodes for p in node.parameters()], lr=0.1)
    steps = (3, 5, 0)
    for step in range(5):
        optimizer.zero_grad(set_to_none=True)
        trained = [node for node, count in zip(nodes, steps) if step < count]
        sum((node(torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=generator)) ** 2).mean()
            for node in trained).backward()
        optimizer.step()
    nodes[2](torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=generator))  # a batch norm update, no step
    average = average_module_state(nodes)
    for name, value in average.items():
        values = np.stack([node.state_dict()[name].numpy() for node in nodes])
        if name.endswith("num_batches_tracked"):
            assert values.tolist() == [3, 5, 1] and int(value) == 5
        else:
            assert value.dtype == torch.float64
            np.testing.assert_allclose(value.numpy(), values.mean(axis=0), rtol=1e-14, atol=0)
    for params, state in zip(zip(*(node.parameters() for node in nodes)), average_parameter_state(optimizer, nodes)):
        assert params[2] not in optimizer.state
        for key in ("exp_avg", "exp_avg_sq", "step"):
            values = np.stack([optimizer.state[p][key].numpy() for p in params[:2]])
            np.testing.assert_allclose(state[key].numpy(), values.mean(axis=0), rtol=1e-14, atol=0)
        assert float(state["step"]) == 4.0
