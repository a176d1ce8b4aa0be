"""The MTSL algorithm end to end on the smoke preset: every phase runs, and the decisions follow similarity."""
import json

import numpy as np
import pytest
import torch

from mtsl_plugin.experiment import build_data, build_stages, build_trainer, run_method, seed_everything
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plugins import similarity
from mtsl_plugin.plugins.builtin_grouping import group_value
from mtsl_plugin.tasks import build_tasks


def test_smoke_run_goes_through_every_phase(smoke, tmp_path):
    config = smoke()
    result = run_method(config, "mtsl", tmp_path, progress=False)
    phases = sorted(tmp_path.glob("phase_*.json"))
    assert len(phases) == config.mtsl.num_phases == 2
    for k, path in enumerate(phases):
        record = json.loads(path.read_text())
        assert record["phase"] == k
        if record["location"] is not None:
            matrix = torch.tensor(record["similarities"][0]["matrix"])
            assert matrix.shape == (3, 3) and torch.allclose(matrix, matrix.T)
        BranchingPlan.from_dict(record["plan"])
    assert len(result["history"]) == config.mtsl.total_epochs
    assert result["history"][0]["align"] > 0  # the alignment term is in the loss during task learning
    assert result["history"][-1]["align"] == 0  # and gone during fine-tuning
    assert set(result["metrics"]) == {"S", "D", "E"}
    assert BranchingPlan.from_dict(json.loads((tmp_path / "plan.json").read_text())) == \
        BranchingPlan.from_dict(result["plan"])


def frozen(smoke, **changes):
    """A run whose task branches never change (learning rate 0), so sibling task nodes stay identical."""
    config = smoke(task_epochs=(1,) + (0,) * 9, amalgamation_epochs=(1,) * 10, **changes)
    return config.replace(optimizer={"optim": "adam", "lr": 0.0, "weight_decay": 0.0}, lr_steps=(), epochs=1,
                          mtsl=config.mtsl.__class__.from_dict({**config.mtsl.to_dict(), "total_epochs": 1}))


def test_identical_tasks_merge_everywhere(smoke, tmp_path):
    result = run_method(frozen(smoke), "mtsl", tmp_path, progress=False)
    assert BranchingPlan.from_dict(result["plan"]) == BranchingPlan.one_net(("S", "D", "E"), 10)
    first = json.loads((tmp_path / "phase_0.json").read_text())
    assert first["merged"] == [["S", "D", "E"]]
    assert min(min(row) for row in first["similarities"][0]["matrix"]) > 0.999


def test_threshold_above_one_merges_nothing(smoke, tmp_path):
    result = run_method(frozen(smoke, threshold=1.01), "mtsl", tmp_path, progress=False)
    assert BranchingPlan.from_dict(result["plan"]) == BranchingPlan.single_task(("S", "D", "E"), 10)


@pytest.mark.parametrize("grouping", ["authors", "fewest_groups", "authors_local"])
def test_threshold_zero_shares_every_location(smoke, tmp_path, grouping):
    """Trained (not frozen) branches whose similarities are below one still all merge at γ = 0."""
    config = smoke(task_epochs=(1,) + (0,) * 9, amalgamation_epochs=(0,) * 10, threshold=0.0, grouping=grouping)
    result = run_method(config, "mtsl", tmp_path, progress=False)
    assert BranchingPlan.from_dict(result["plan"]) == BranchingPlan.one_net(("S", "D", "E"), 10)
    first = json.loads((tmp_path / "phase_0.json").read_text())
    assert min(min(row) for row in first["similarities"][0]["matrix"]) < 0.999


@pytest.mark.parametrize("flag", ["align", "amalgamate"])
def test_ablation_switches_change_the_algorithm(smoke, flag, tmp_path):
    config = smoke(**{flag: False})
    result = run_method(config, "mtsl", tmp_path, progress=False)
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("phase_*.json"))]
    if flag == "align":
        assert all(h["align"] == 0 for h in result["history"])
    else:
        assert any(r["merged"] for r in records)  # group nodes were created, and none was distilled
        assert all(r["amalgamation_losses"] == [] for r in records)


def test_alignment_loss_is_lambda_times_mean_dissimilarity(smoke):
    learner = StructuralLearner(smoke().mtsl)
    plan = BranchingPlan.single_task("SDE", 10)
    gen = torch.Generator().manual_seed(0)
    feats = {t: torch.randn(8, 16, 2, 2, generator=gen) for t in "SDE"}
    cka = similarity("cka")
    pooled = {t: f.mean(dim=(2, 3)) for t, f in feats.items()}
    expected = 0.2 * torch.stack([1 - cka(pooled[a], pooled[b]) for a, b in ("SD", "SE", "DE")]).mean()
    torch.testing.assert_close(learner.alignment_loss(plan, feats), expected)
    assert learner.alignment_loss(BranchingPlan.one_net("SDE", 10), {}) is None


def test_alignment_loss_sums_the_sibling_sets_each_its_mean_over_pairs(smoke):
    """Two sibling sets, (S, D, E) and (N, A), of different sizes and dissimilarities: λ times the sum over the
    sets of each set's mean (1 − CKA), not a mean over the sets nor one mean over all pairs."""
    learner = StructuralLearner(smoke(tasks="SDENA").mtsl)
    plan = BranchingPlan.single_task("SDENA", 10).merge(0, ["SDE", "NA"])
    assert plan.siblings() == [(1, ("S", "D", "E")), (1, ("N", "A"))]
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, 2, 2, generator=gen)
    feats = {t: base + scale * torch.randn(8, 16, 2, 2, generator=gen)
             for t, scale in zip("SDENA", (0.1, 0.2, 0.3, 1.0, 3.0))}
    cka = similarity("cka")
    pooled = {t: f.mean(dim=(2, 3)) for t, f in feats.items()}
    first = torch.stack([1 - cka(pooled[a], pooled[b]) for a, b in ("SD", "SE", "DE")]).mean()
    second = 1 - cka(pooled["N"], pooled["A"])
    assert abs(float(second - first)) > 0.05  # the ways of averaging differ here
    torch.testing.assert_close(learner.alignment_loss(plan, feats), 0.2 * (first + second))


def test_a_similarity_without_gradient_cannot_drive_the_alignment(smoke):
    """RSA decides groupings (MTSL-RSA) but has no gradient: as the alignment measure it is refused clearly."""
    plan = BranchingPlan.single_task("SD", 10)
    feats = {t: torch.randn(8, 16, 2, 2, requires_grad=True) for t in "SD"}
    grouping_only = StructuralLearner(smoke(tasks="SD", similarity="rsa").mtsl)
    assert grouping_only.alignment_loss(plan, feats).requires_grad  # alignment stays CKA
    with pytest.raises(ValueError, match="'rsa' returns no gradient"):
        StructuralLearner(smoke(tasks="SD", align_similarity="rsa").mtsl).alignment_loss(plan, feats)


def trainer_for(config, plan):
    seed_everything(config.seed)
    data, dataset = build_data(config)
    tasks = build_tasks(config.tasks, dataset.num_classes)
    return build_trainer(config, tasks, plan, build_stages(config), StructuralLearner(config.mtsl)), data


def test_alignment_gradients_pull_sibling_task_nodes_together(smoke):
    """Sibling task nodes that differ: the alignment term has a gradient on those nodes and the shared node they
    read (nothing deeper, no head), and descending it alone raises their CKA."""
    config = smoke(tasks=("S", "D"))
    plan = BranchingPlan.single_task("SD", 10).merge(0, ["SD"])  # task nodes at location 1
    trainer, data = trainer_for(config, plan)
    net, learner = trainer.network, trainer.learner
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in net.node(1, ("D",)).parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    images, _ = next(iter(data.batches(data.train)))
    cka = similarity("cka")

    def aligned():
        trainer.model(images)
        feats = trainer.model.task_node_features
        pooled = {t: f.detach().mean((2, 3)) for t, f in feats.items()}
        return learner.alignment_loss(net.plan, feats), float(cka(pooled["S"], pooled["D"]))

    loss, before = aligned()
    assert loss > 1e-3
    trainer.model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {key: [p.grad for p in net.node(*key).parameters()] for key in net.node_keys()}
    for key, node_grads in grads.items():
        moved = any(g is not None and g.abs().sum() > 0 for g in node_grads)
        assert moved == (key in ((0, ("S", "D")), (1, ("S",)), (1, ("D",)))), key
    assert all(p.grad is None for head in net.heads.values() for p in head.parameters())
    optimizer = torch.optim.SGD([p for t in "SD" for p in net.node(1, (t,)).parameters()], lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        aligned()[0].backward()
        optimizer.step()
    assert aligned()[1] > before


@pytest.mark.parametrize("grouping, merged", [("fewest_groups", [("S", "D", "E")]),
                                              ("exhaustive", [("S", "D", "E")]),
                                              ("authors", [])])  # the authors' rule: strictly above γ
def test_a_group_whose_value_is_the_threshold_up_to_float_noise_reaches_it(smoke, grouping, merged):
    """Pairs 0.05, 0.2 and 0.35: the group's value is 0.2, computed as 0.19999999999999998. At γ = 0.2 the
    solvers compare in units of 1e-12 (float noise never breaks a tie), and the learner merges what they return
    as reaching γ: it compares alike."""
    learner = StructuralLearner(smoke(threshold=0.2, grouping=grouping).mtsl)
    matrix = np.array([[1.0, 0.05, 0.2], [0.05, 1.0, 0.35], [0.2, 0.35, 1.0]])
    assert group_value(matrix, [0, 1, 2]) < 0.2
    partition, chosen = learner.decide(matrix, ("S", "D", "E"))
    assert chosen == merged
    assert partition == ([["S", "D", "E"]] if merged else [["S"], ["D"], ["E"]])


def test_a_phase_merges_each_sibling_set_by_its_own_similarities_and_amalgamation_touches_nothing_else(smoke):
    """Two sibling sets at one location: (S, D) similar enough is merged; (E, N), whose group the solver forms but
    whose own similarity is below γ, is kept apart. Amalgamation (ATT) trains only the new group node: every
    other node, head, BN statistic and optimizer state is as before the phase."""
    config = smoke(tasks=("S", "D", "E", "N"), amalgamation_epochs=(2, 2), grouping="fewest_groups")
    plan = BranchingPlan.single_task("SDEN", 10).merge(0, ["SD", "EN"])
    trainer, data = trainer_for(config, plan)
    images, gts = next(iter(data.batches(data.train, key=(0, 0))))
    trainer.train_step(images, gts)  # Adam state and BN statistics to guard
    net, learner, opt = trainer.network, trainer.learner, trainer.optimizer
    matrices = [(1, ("S", "D"), np.array([[1.0, 0.95], [0.95, 1.0]])),
                (1, ("E", "N"), np.array([[1.0, 0.7], [0.7, 1.0]]))]
    learner.measure = lambda *args: matrices
    replaced = [net.node(1, (t,)) for t in "SD"]
    average = {k: (replaced[0].state_dict()[k] + replaced[1].state_dict()[k]) / 2
               for k in replaced[0].state_dict() if replaced[0].state_dict()[k].is_floating_point()}
    kept = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in
            [*((n, m) for n, m in net.nodes.items() if m not in replaced), *net.heads.items()]}
    kept_state = {p: {k: v.clone() for k, v in opt.state[p].items()} for m in net.nodes.values() if m not in replaced
                  for p in m.parameters()}
    averaged_state = [{k: (opt.state[a][k] + opt.state[b][k]) / 2 for k in opt.state[a]}
                      for a, b in zip(*(m.parameters() for m in replaced))]
    record = learner.structural_phase(net, trainer.model, opt, lambda: data.batches(data.train, key=(1, 0)),
                                      lambda: data.batches(data.holdout), torch.device("cpu"))
    assert record.merged == [["S", "D"]]
    assert [s["partition"] for s in record.similarities] == [[["S", "D"]], [["E", "N"]]]
    assert net.plan.partitions[1] == (("S", "D"), ("E",), ("N",))
    assert len(record.amalgamation_losses) == 2 and record.amalgamation_losses[-1] < record.amalgamation_losses[0]
    group = net.node(1, ("S", "D"))
    assert any(not torch.equal(group.state_dict()[k], v) for k, v in average.items())  # distilled, not just averaged
    nodes_and_heads = {**dict(net.nodes.items()), **dict(net.heads.items())}
    for name, state in kept.items():
        assert all(torch.equal(v, nodes_and_heads[name].state_dict()[k]) for k, v in state.items()), name
    for p, state in kept_state.items():
        assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items())
    # amalgamation has an Adam of its own: task learning continues from the task nodes' averaged state
    for p, state in zip(group.parameters(), averaged_state):
        assert all(torch.allclose(opt.state[p][k], v) for k, v in state.items())


def test_sibling_sets_at_two_locations_are_measured_aligned_and_merged_in_one_phase(smoke):
    """(E, N) are siblings at location 1 and (S, D) at location 2: one phase measures each set at its own location,
    the alignment loss covers both, and both merge (their nodes start identical), as in the authors' code."""
    config = smoke(tasks=("S", "D", "E", "N"))
    plan = BranchingPlan.single_task("SDEN", 10).merge(0, ["SDEN"]).merge(1, ["SD"])
    assert plan.siblings() == [(1, ("E", "N")), (2, ("S", "D"))]
    trainer, data = trainer_for(config, plan)
    net, learner = trainer.network, trainer.learner
    images, _ = next(iter(data.batches(data.train)))
    trainer.model(images)
    feats = trainer.model.task_node_features
    assert set(feats) == set("SDEN")
    assert tuple(feats["E"].shape[1:]) == tuple(net.run_locations(images, until=1)[1][("E",)].shape[1:])
    cka = similarity("cka")
    expected = 0.2 * sum(1 - cka(feats[a].mean((2, 3)), feats[b].mean((2, 3))) for a, b in ("EN", "SD"))
    torch.testing.assert_close(learner.alignment_loss(net.plan, feats), expected)
    record = learner.structural_phase(net, trainer.model, trainer.optimizer,
                                      lambda: data.batches(data.train, key=(1, 0)), lambda: data.batches(data.holdout),
                                      torch.device("cpu"))
    assert [(s["location"], s["tasks"]) for s in record.similarities] == [(1, ["E", "N"]), (2, ["S", "D"])]
    assert record.location == 1 and record.merged == [["E", "N"], ["S", "D"]]
    assert net.plan == plan.merge(1, ["EN"]).merge(2, ["SD"])
    assert net.plan.siblings() == [(2, ("E", "N")), (3, ("S", "D"))]  # the next phase measures one deeper each
    assert len(record.amalgamation_losses) == config.mtsl.amalgamation_epochs[0]


def test_amalgamation_epochs_are_consumed_by_the_phases_that_merge(smoke):
    """Phase 0 merges nothing, phase 1 merges: phase 1 amalgamates for amalgamation_epochs[0] (the first merge's),
    not amalgamation_epochs[1], as in the authors' code."""
    config = smoke(tasks=("S", "D"), amalgamation_epochs=(1, 3), grouping="fewest_groups")
    trainer, data = trainer_for(config, BranchingPlan.single_task("SD", 10))
    net, learner = trainer.network, trainer.learner
    phase_args = (net, trainer.model, trainer.optimizer, lambda: data.batches(data.train, key=(1, 0)),
                  lambda: data.batches(data.holdout), torch.device("cpu"))
    learner.measure = lambda *args: [(0, ("S", "D"), np.array([[1.0, 0.5], [0.5, 1.0]]))]
    assert learner.structural_phase(*phase_args).merged == []
    learner.measure = lambda *args: [(0, ("S", "D"), np.array([[1.0, 0.9], [0.9, 1.0]]))]
    record = learner.structural_phase(*phase_args)
    assert record.merged == [["S", "D"]] and len(record.amalgamation_losses) == 1


def _recording(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Make ``optimizer`` an instance of a subclass of its class that records the keyword arguments of every new
    instance (the amalgamation's own optimizer is built from the run's class); returns the record."""
    calls = []

    class Recording(type(optimizer)):
        def __init__(self, params, **kwargs):
            calls.append(kwargs)
            super().__init__(params, **kwargs)

    optimizer.__class__ = Recording
    return calls


def merging_phase(trainer, data):
    trainer.learner.measure = lambda *args: [(0, ("S", "D"), np.array([[1.0, 0.9], [0.9, 1.0]]))]
    return trainer.learner.structural_phase(trainer.network, trainer.model, trainer.optimizer,
                                            lambda: data.batches(data.train, key=(1, 0)),
                                            lambda: data.batches(data.holdout), torch.device("cpu"))


def test_amalgamation_distils_at_the_runs_learning_rate_after_a_learning_rate_step(smoke):
    """A phase after a learning-rate step still amalgamates with the run's rate, as the authors' code builds its
    amalgamation optimizer from the command line's rate (it took the decayed rate of the moment)."""
    config = smoke(tasks=("S", "D"), amalgamation_epochs=(1, 1), grouping="fewest_groups")
    trainer, data = trainer_for(config, BranchingPlan.single_task("SD", 10))
    run_rate = trainer.optimizer.param_groups[0]["lr"]
    trainer.scheduler.milestones.update({1: 1})  # a step after the first epoch, as the paper's at 60 and 70
    trainer.optimizer.step()  # (no gradients: changes nothing) the order the scheduler expects
    trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(run_rate * 0.1)
    calls = _recording(trainer.optimizer)
    assert merging_phase(trainer, data).merged == [["S", "D"]] and [c["lr"] for c in calls] == [run_rate]


@pytest.mark.parametrize("optimizer, kind", [
    ({"optim": "adam", "lr": 1e-3, "weight_decay": 5e-5, "betas": (0.8, 0.9)}, torch.optim.Adam),
    ({"optim": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}, torch.optim.SGD),
])
def test_amalgamation_builds_the_runs_optimizer_with_its_settings(smoke, optimizer, kind):
    """The authors' ``fuse`` builds its optimizer with ``get_optimizer``, from the command line's optimizer and
    settings: an SGD run amalgamates with SGD and its momentum (it took Adam at SGD's rate, which tripled D's
    held-out loss in one phase), an Adam run with its weight decay and betas."""
    config = smoke(tasks=("S", "D"), amalgamation_epochs=(1, 1), grouping="fewest_groups").replace(
        optimizer=optimizer)
    trainer, data = trainer_for(config, BranchingPlan.single_task("SD", 10))
    assert isinstance(trainer.optimizer, kind)
    calls = _recording(trainer.optimizer)
    assert merging_phase(trainer, data).merged == [["S", "D"]] and len(calls) == 1
    assert {key: calls[0][key] for key in optimizer if key != "optim"} == {
        key: tuple(value) if isinstance(value, tuple) else value for key, value in optimizer.items() if key != "optim"}


def test_the_group_node_distils_in_training_mode_and_its_batch_norms_count_every_amalgamation_batch(smoke):
    """The frozen task nodes run in evaluation mode, the new group node in training mode: its batch-norm
    statistics follow the amalgamation batches (each counted once per epoch) instead of staying the average."""
    config = smoke(tasks=("S", "D"), amalgamation_epochs=(2, 2), grouping="fewest_groups")
    trainer, data = trainer_for(config, BranchingPlan.single_task("SD", 10))
    net, learner = trainer.network, trainer.learner
    norms = [name for name, m in net.node(0, ("S",)).named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    average = {k: v.clone() for k, v in net.node(0, ("S",)).state_dict().items()}  # both task nodes start equal
    assert all(torch.equal(v, net.node(0, ("D",)).state_dict()[k]) for k, v in average.items())
    batches = len(list(data.batches(data.train, key=(1, 0))))
    learner.measure = lambda *args: [(0, ("S", "D"), np.array([[1.0, 0.9], [0.9, 1.0]]))]
    record = learner.structural_phase(net, trainer.model, trainer.optimizer,
                                      lambda: data.batches(data.train, key=(1, 0)),
                                      lambda: data.batches(data.holdout), torch.device("cpu"))
    assert record.merged == [["S", "D"]] and len(record.amalgamation_losses) == 2
    group = net.node(0, ("S", "D")).state_dict()
    for name in norms:
        prefix = f"{name}." if name else ""
        assert int(group[prefix + "num_batches_tracked"]) == int(average[prefix + "num_batches_tracked"]) + 2 * batches
        assert not torch.equal(group[prefix + "running_mean"], average[prefix + "running_mean"])


def test_a_phase_that_raises_leaves_the_network_in_the_mode_it_had(smoke, monkeypatch):
    """Measuring the held-out batches and amalgamating run the network in evaluation mode; an error inside either
    (caught by the caller, who goes on training or evaluating at once) leaves it in the mode it was in, not in
    evaluation mode."""
    config = smoke(tasks=("S", "D"), amalgamation_epochs=(1, 1), grouping="fewest_groups")
    trainer, data = trainer_for(config, BranchingPlan.single_task("SD", 10))
    net, learner = trainer.network, trainer.learner
    phase_args = (net, trainer.model, trainer.optimizer, lambda: data.batches(data.train, key=(1, 0)),
                  lambda: data.batches(data.holdout), torch.device("cpu"))

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(net, "run_locations", fails)
    for training in (True, False):
        net.train(training)
        with pytest.raises(RuntimeError, match="out of memory"):  # measuring
            learner.structural_phase(*phase_args)
        assert all(m.training == training for m in net.modules())
    learner.measure = lambda *args: [(0, ("S", "D"), np.array([[1.0, 0.9], [0.9, 1.0]]))]
    for training in (True, False):
        net.train(training)
        with pytest.raises(RuntimeError, match="out of memory"):  # amalgamating
            learner.structural_phase(*phase_args)
        assert all(m.training == training for m in net.modules())


def test_measuring_the_held_out_batches_moves_no_batch_norm_statistic(smoke):
    """Grouping decisions measure the held-out slice, which no method trains on: the network runs it in evaluation
    mode, so its batch-norm statistics count none of its batches, and the network is left in training mode."""
    trainer, data = trainer_for(smoke(tasks=("S", "D")), BranchingPlan.single_task("SD", 10))
    net = trainer.network
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    features = trainer.learner.node_features(net, lambda: data.batches(data.holdout), torch.device("cpu"))
    assert set(features) == {"S", "D"} and all(m.training for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
