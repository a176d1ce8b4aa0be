"""Cross-stitch and MTAN baselines: shapes, LibMTL training steps, cross-stitch units, attention masks, cost,
and one harness run."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck

from baselines.cross_stitch import CrossStitch, CrossStitchUnit  # importing registers "cross_stitch"
from baselines.mtan import MTAN, last_block  # importing registers "mtan"
from benchmarks import cli, compare
from mtsl_plugin.config import load_preset
from mtsl_plugin.experiment import (build_data, build_stages, build_trainer, load_run, run_fingerprint, run_method,
                                   seed_everything)
from mtsl_plugin.learner.schedule import scale_schedule
from mtsl_plugin.methods import build_method
from mtsl_plugin.network.cost import model_cost
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.tasks import build_tasks

SETTINGS = ("encoder-decoder", "encoder", "authors")  # "authors": encoder-decoder on the authors' network
METHOD_NAME = {CrossStitch: "cross_stitch", MTAN: "mtan"}


@pytest.fixture(scope="module")
def built():
    """What :func:`setup` built, per setting, kept for the whole module (stages and data take a while)."""
    return {}


@pytest.fixture
def setup(built, smoke):
    """Per setting: config, tasks, stages and a batch of two 32x32 images (built once for the module)."""

    def get(setting):
        if setting not in built:
            config = smoke(tasks=("S", "D", "E"))
            config = (config.replace(network="authors") if setting == "authors" else config.replace(setting=setting))
            seed_everything(0)
            data, dataset = build_data(config)
            images, gts = next(iter(data.batches(data.train)))
            built[setting] = (config, build_tasks(config.tasks, dataset.num_classes), build_stages(config),
                              images[:2], {t: g[:2] for t, g in gts.items()})
        return built[setting]

    return get


def trainer_for(setup, architecture, setting="encoder-decoder", weighting="EW"):
    config, tasks, stages, images, gts = setup(setting)
    seed_everything(0)
    spec = build_method(METHOD_NAME[architecture], config, stages.num_locations)  # the registered arch_args
    trainer = build_trainer(config.replace(weighting=weighting), tasks, None, stages, architecture=architecture,
                            arch_args=spec.arch_args)
    return trainer, tasks, stages, images, gts


def parameter_groups(model):
    """Name -> module for every unit of the architecture that must learn."""
    net = model.encoder
    groups = {f"head {t}": head for t, head in model.decoders.items()}
    if isinstance(model, CrossStitch):
        groups.update({f"node {l} {t}": n for l, nodes in enumerate(net.nodes) for t, n in nodes.items()})
        groups.update({f"unit {l}": u for l, u in enumerate(net.units)})
    else:
        groups.update({f"node {l}": n for l, n in enumerate(net.nodes)})
        groups.update({f"attention {l} {t}": a for l, att in enumerate(net.attention) for t, a in att.items()})
        groups.update({f"refinement {l + 1}": r for l, r in enumerate(net.refinements)})
    return groups


# ---------------------------------------------------------------------------------------------- both architectures
@pytest.mark.parametrize("weighting", ["EW", "UW"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("architecture", [CrossStitch, MTAN])
def test_predictions_and_a_training_step_with_libmtl_weighting(setup, architecture, setting, weighting):
    trainer, tasks, stages, images, gts = trainer_for(setup, architecture, setting, weighting)
    model = trainer.model
    assert stages.num_locations == (6 if setting == "encoder" else 10)
    assert len(stages.head_locations) == (4 if setting == "authors" else 1)
    with torch.no_grad():
        preds = model(images)
    assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, task.out_channels, 32, 32)
                                                             for t, task in tasks.items()}
    shared_before = [p.detach().clone() for p in model.get_share_params()]
    losses, _ = trainer.train_step(images, gts)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name, module in parameter_groups(model).items():
        assert any(p.grad.abs().sum() > 0 for p in module.parameters()), f"{name} received no gradient"
    assert any(not torch.equal(a, b) for a, b in zip(shared_before, model.get_share_params()))
    if architecture is CrossStitch:  # one unit after every location; the units are the shared parameters
        assert [u.alpha.shape for u in model.encoder.units] == [(3, 3, s.out_channels) for s in stages.specs]
        assert [id(p) for p in model.get_share_params()] == [id(p) for p in model.encoder.units.parameters()]
        assert all(not torch.equal(a, u.alpha) for a, u in zip(shared_before, model.encoder.units))
    if weighting == "UW":
        assert not torch.equal(model.loss_scale.detach(), torch.full((3,), -0.5))
    assert_zero_grad_share_params_zeroes_only_shared_gradients_in_place(model)


def assert_zero_grad_share_params_zeroes_only_shared_gradients_in_place(model):
    shared = {id(p) for p in model.get_share_params()}
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert any(before[name].abs().sum() > 0 for name, p in model.named_parameters() if id(p) in shared)
    model.zero_grad_share_params()
    for name, p in model.named_parameters():
        assert p.grad is grads[name], f"{name}: gradient tensor replaced"  # LibMTL writes into .grad.data
        expected = torch.zeros_like(before[name]) if id(p) in shared else before[name]
        assert torch.equal(p.grad, expected), name


def test_libmtl_gradient_surgery_acts_on_mtan_shared_parameters(setup):
    """PCGrad changes the shared trunk's gradients and leaves the attention modules' and heads' as EW's."""
    grads = {}
    for weighting in ("PCGrad", "EW"):
        trainer, _, _, images, gts = trainer_for(setup, MTAN, weighting=weighting)
        trainer.optimizer.step = lambda: None
        losses, _ = trainer.train_step(images, gts)
        assert torch.isfinite(losses).all()
        grads[weighting] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        share = list(trainer.model.get_share_params())
        shared = {n for n, p in trainer.model.named_parameters() if any(p is q for q in share)}
    assert shared and any(not torch.allclose(grads["PCGrad"][n], grads["EW"][n]) for n in shared)
    for name in grads["EW"].keys() - shared:
        torch.testing.assert_close(grads["PCGrad"][name], grads["EW"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["cross_stitch", "mtan"])
def test_a_finished_run_of_an_architecture_without_plan_loads_for_evaluation(smoke, tmp_path, method):
    result = run_method(smoke(tasks=("S", "D")), method, tmp_path / method, progress=False)
    assert result["plan"] is None and not (tmp_path / method / "checkpoint.pt").exists()
    trainer, data, _ = load_run(tmp_path / method)
    assert trainer.evaluate(data.batches(data.test)) == result["metrics"]


@pytest.mark.parametrize("architecture", [CrossStitch, MTAN])
def test_unsupported_uses_are_refused_with_a_clear_error(setup, architecture):
    config, tasks, stages, _, _ = setup("encoder-decoder")
    with pytest.raises(ValueError, match="not plan-based"):
        build_trainer(config, tasks, BranchingPlan.one_net(config.tasks, 10), stages, architecture=architecture)
    heads = {"S": stages.build_head(1)}
    with pytest.raises(ValueError, match="no head"):
        architecture(["S", "X"], lambda: stages, heads, False, False, "cpu")
    with pytest.raises(ValueError, match="rep_grad"):
        architecture(["S"], lambda: stages, heads, True, False, "cpu")
    with pytest.raises(ValueError, match="multi_input"):
        architecture(["S"], lambda: stages, heads, False, True, "cpu")
    with pytest.raises(ValueError, match=r"got unknown arch_args \['candidate'\]"):  # a typo does not run the default
        architecture(["S"], lambda: stages, heads, False, False, "cpu", candidate="identical")


@pytest.mark.parametrize("architecture", [CrossStitch, MTAN])
def test_registered_as_non_plan_methods(smoke, architecture):
    spec = build_method(METHOD_NAME[architecture], smoke(), 10)
    assert spec.architecture is architecture and spec.plan is None and spec.learner is None


# ---------------------------------------------------------------------------------------------- cross-stitch
def test_architecture_options_are_part_of_a_runs_fingerprint(smoke):
    """A finished run is reused only by a run of the same architecture options (here the units' learning rate)."""
    config = smoke()
    spec = build_method("cross_stitch", config, 10)
    default = run_fingerprint("cross_stitch", config, spec)
    slow = dataclasses.replace(spec, arch_args={**spec.arch_args, "unit_lr_multiplier": 1.0})
    assert run_fingerprint("cross_stitch", config, slow) != default
    assert run_fingerprint("cross_stitch", config, build_method("cross_stitch", config, 10)) == default


@pytest.mark.parametrize("num_tasks, same, other", [(1, 1.0, None), (2, 0.9, 0.1), (3, 0.8, 0.1),
                                                     (5, 0.8, 0.05)])
def test_cross_stitch_units_start_as_the_reference_configures_them(num_tasks, same, other):
    """Two tasks 0.9 / 0.1 and five 0.8 / 0.05, the reference's NYUD and PASCAL settings; rows sum to one."""
    alpha = CrossStitchUnit(num_tasks, 7).alpha.detach()
    assert alpha.shape == (num_tasks, num_tasks, 7)
    for i in range(num_tasks):
        for j in range(num_tasks):
            expected = same if i == j else other
            torch.testing.assert_close(alpha[i, j], torch.full((7,), expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(num_tasks, 7))
    assert torch.equal(CrossStitchUnit(3, 2, self_weight=0.6).alpha.detach()[0, :, 0], torch.tensor([0.6, 0.2, 0.2]))


@pytest.mark.parametrize("multiplier", [100.0, 1.0])
def test_cross_stitch_units_learn_at_their_own_multiple_of_the_learning_rate(setup, multiplier):
    """The units form a parameter group at ``unit_lr_multiplier`` x the run's rate (the reference's optimizer builds
    them a 100x group); everything else stays in LibMTL's group, the LR steps scale both, and the first Adam step moves each
    unit weight by its group's rate (Adam's first step is lr x sign of the gradient)."""
    config, tasks, stages, images, gts = setup("encoder-decoder")
    seed_everything(0)
    trainer = build_trainer(config, tasks, None, stages, architecture=CrossStitch,
                            arch_args={"unit_lr_multiplier": multiplier})
    lr = config.optimizer["lr"]
    base, units = trainer.optimizer.param_groups
    unit_params = list(trainer.model.encoder.units.parameters())
    assert units["lr"] == pytest.approx(lr * multiplier) and base["lr"] == pytest.approx(lr)
    assert {id(p) for p in units["params"]} == {id(p) for p in unit_params}
    assert len(base["params"]) + len(unit_params) == len(list(trainer.model.parameters()))
    before = [p.detach().clone() for p in unit_params]
    trainer.model.train()
    trainer.train_step(images, gts)
    moved = torch.cat([(new.detach() - old).abs().flatten() for old, new in zip(before, unit_params)])
    step = lr * multiplier  # |g| / (|g| + eps): a hair less for the tiniest gradients
    assert float(moved.max()) <= step * 1.0001 and float(moved.median()) == pytest.approx(step, rel=1e-3)
    while trainer.scheduler.last_epoch < config.lr_steps[0]:
        trainer.scheduler.step()
    assert units["lr"] == pytest.approx(lr * multiplier * 0.1) and base["lr"] == pytest.approx(lr * 0.1)


def test_cross_stitch_unit_mixes_each_channel_with_its_own_weights():
    torch.manual_seed(0)
    unit = CrossStitchUnit(3, 4)
    with torch.no_grad():
        unit.alpha.copy_(torch.randn(3, 3, 4))
    xs = [torch.randn(2, 4, 5, 6) for _ in range(3)]
    ys = unit(xs)
    for i in range(3):
        for c in range(4):
            hand = sum(unit.alpha[i, j, c] * xs[j][:, c] for j in range(3))
            torch.testing.assert_close(ys[i][:, c], hand)


def test_identity_units_make_the_task_networks_independent(setup):
    trainer, _, _, images, _ = trainer_for(setup, CrossStitch)  # encoder-decoder: decoder skips included
    model = trainer.model
    nodes = model.encoder.nodes

    def grads_of_s_output():
        out = model(images, task_name="S")["S"].sum()
        params = {t: [p for loc in nodes for p in loc[t].parameters()] for t in ("S", "D", "E")}
        flat = [p for t in ("S", "D", "E") for p in params[t]]
        grads = torch.autograd.grad(out, flat, allow_unused=True)
        sums, k = {}, 0
        for t in ("S", "D", "E"):
            n = len(params[t])
            sums[t] = sum(0.0 if g is None else float(g.abs().sum()) for g in grads[k:k + n])
            k += n
        return sums

    for unit, spec in zip(model.encoder.units, model.encoder.specs):  # the architecture's units start at 0.9/0.05
        assert torch.equal(unit.alpha, CrossStitchUnit(3, spec.out_channels).alpha)
    stitched = grads_of_s_output()  # at 0.9/0.05 every task's network feeds task S's output
    assert all(v > 0 for v in stitched.values())
    with torch.no_grad():
        for unit in model.encoder.units:
            unit.alpha.copy_(torch.eye(3)[:, :, None].expand_as(unit.alpha))
    independent = grads_of_s_output()
    assert independent["S"] > 0 and independent["D"] == 0 and independent["E"] == 0


@pytest.mark.parametrize("candidates", ["independent", "identical"])
def test_cross_stitch_task_networks_start_from_independent_draws(setup, candidates):
    """As LibMTL's ``Cross_stitch`` builds them (``encoder_class()`` once per task); ``identical`` as STN's."""
    config, tasks, stages, _, _ = setup("encoder-decoder")
    heads = {t: stages.build_head(1) for t in "SDE"}
    model = CrossStitch(list("SDE"), lambda: stages, heads, False, False, "cpu", candidates=candidates)
    for location, nodes in enumerate(model.encoder.nodes):
        own = stages.build(location).state_dict()
        for task, node in nodes.items():
            same = all(torch.equal(v, own[k]) for k, v in node.state_dict().items())
            assert same == (task == "S" or candidates == "identical"), (location, task)


# ---------------------------------------------------------------------------------------------- MTAN
@pytest.mark.parametrize("setting", SETTINGS)
def test_mtan_masks_lie_in_the_open_unit_interval_and_gate_the_shared_features(setup, setting):
    trainer, _, stages, images, _ = trainer_for(setup, MTAN, setting)
    model = trainer.model.eval()
    with torch.no_grad():
        attended, masks = model.encoder(images)
        preds = model(images)
        only_d = model(images, task_name="D")
    for t in ("S", "D", "E"):
        assert len(masks[t]) == stages.num_locations
        for mask, spec in zip(masks[t], stages.specs):
            assert mask.shape[:2] == (2, spec.out_channels)
            assert bool((mask > 0).all()) and bool((mask < 1).all())
        torch.testing.assert_close(preds[t], model.decoders[t](attended[t], (32, 32)))
    assert [a.shape for a in attended["S"]] == [masks["S"][l].shape for l in stages.head_locations]
    assert not torch.equal(masks["S"][-1], masks["D"][-1])  # each task has its own attention
    assert list(only_d) == ["D"]
    torch.testing.assert_close(only_d["D"], preds["D"])


@pytest.mark.parametrize("setting", ["encoder-decoder", "authors"])
def test_mtan_masks_read_the_features_before_each_stage_last_block(setup, setting):
    """As the reference: the mask of location ℓ comes from the input of the node's last residual block and the
    task's previous attended features carried through the shared refinement Bottleneck; it gates the node's
    output. Checked at a ResNet layer, the extra location and a decoder location."""
    trainer, _, stages, images, _ = trainer_for(setup, MTAN, setting)
    net = trainer.model.encoder.eval()
    before, outputs = {}, {}
    hooks = []
    for location in range(stages.num_locations):
        block = last_block(net.nodes[location])
        if block is not None:
            hooks.append(block.register_forward_pre_hook(lambda _, i, l=location: before.__setitem__(l, i[0])))
        hooks.append(net.nodes[location].register_forward_hook(lambda _, i, o, l=location: outputs.__setitem__(l, o)))
    with torch.no_grad():
        _, masks = net(images)
    for hook in hooks:
        hook.remove()
    assert last_block(net.nodes[0]) is None and set(before) == set(range(1, stages.num_locations))
    assert all(isinstance(r, Bottleneck) and r.downsample is not None for r in net.refinements)
    for location in (2, 5, 7):
        if location == 7:  # a decoder block's input: the upsampled input and the skip
            assert before[7].shape[1] == stages.specs[7].in_channels + stages.specs[7].skip_channels
        attended = masks["S"][location - 1] * outputs[location - 1]
        carried = net.refinements[location - 1](attended)
        size = before[location].shape[-2:]
        if carried.shape[-2:] != size:
            carried = (F.max_pool2d(carried, 2) if carried.shape[-1] > size[-1]
                       else F.interpolate(carried, size=size, mode="bilinear", align_corners=False))
        with torch.no_grad():
            expected = net.attention[location]["S"](torch.cat([before[location], carried], dim=1))
        torch.testing.assert_close(masks["S"][location], expected)


@pytest.mark.parametrize("architecture", [CrossStitch, MTAN])
def test_a_deep_copy_computes_what_the_original_does(setup, architecture):
    """``copy.deepcopy`` (``torch.optim.swa_utils.AveragedModel``'s, EMA's): MTAN's hooks that keep each last
    block's input were lambdas over the original's dict, so the copy read none and failed (or, where the channels
    agree, gated the wrong features)."""
    trainer, _, _, images, _ = trainer_for(setup, architecture)
    model = trainer.model.eval()
    copied = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(images)
        for p in model.parameters():  # the copy computes with its own weights, not the original's
            p.zero_()
        got = copied(images)
    assert got.keys() == expected.keys() and all(torch.equal(got[t], expected[t]) for t in got)


@pytest.mark.parametrize("architecture", [CrossStitch, MTAN])
def test_odd_input_sizes_keep_their_size(setup, architecture):
    trainer, tasks, *_ = trainer_for(setup, architecture)  # 36x44: 18x22, 9x11, 5x6, 3x3 along the encoder
    with torch.no_grad():
        preds = trainer.model.eval()(torch.randn(2, 3, 36, 44))
    assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, task.out_channels, 36, 44)
                                                             for t, task in tasks.items()}


def test_mtan_is_one_shared_network_plus_attention(setup):
    config, tasks, stages, _, _ = setup("encoder-decoder")
    mtan, *_ = trainer_for(setup, MTAN)
    onenet = build_trainer(config, tasks, BranchingPlan.one_net(config.tasks, 10), stages)
    stn = build_trainer(config, tasks, BranchingPlan.single_task(config.tasks, 10), stages)
    net = mtan.model.encoder
    attention = sum(p.numel() for m in (net.attention, net.refinements) for p in m.parameters())
    costs = {name: model_cost(t.model, 32, 32) for name, t in (("mtan", mtan), ("onenet", onenet), ("stn", stn))}
    assert costs["mtan"].params == costs["onenet"].params + attention
    # light attention: MTAN sits far closer to One-Net than to the single-task networks
    assert attention < 0.1 * (costs["stn"].params - costs["onenet"].params)
    assert costs["onenet"].gmac < costs["mtan"].gmac < costs["stn"].gmac


# ---------------------------------------------------------------------------------------------- harness
def test_compare_trains_both_and_reports_params_and_gmac(tmp_path, monkeypatch):
    def one_step_smoke(name):  # the smoke preset cut to one epoch of one batch: this test is about the harness
        config = load_preset(name)
        data = dataclasses.replace(config.data, train=8, holdout=4, test=4)
        return config.replace(epochs=1, lr_steps=(), data=data, mtsl=scale_schedule(config.mtsl, 1, 1))

    monkeypatch.setattr(cli, "load_preset", one_step_smoke)
    out = tmp_path / "r"
    assert compare.main(["--methods", "cross_stitch,mtan", "--preset", "smoke", "--tasks", "S,D",
                         "--out", str(out), "--no-progress"]) == 0
    lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].split("|")]
    cells = {row[1]: row for row in ([c.strip() for c in line.split("|")] for line in lines[2:])}
    assert {"stn", "onenet", "cross_stitch", "mtan"} <= set(cells), cells
    params_col = next(i for i, c in enumerate(header) if c.startswith("Params"))
    gmac_col = next(i for i, c in enumerate(header) if c.startswith("GMac"))
    value = {m: (float(cells[m][params_col]), float(cells[m][gmac_col]))
             for m in ("stn", "onenet", "cross_stitch", "mtan")}
    assert value["onenet"][0] < value["mtan"][0] < value["stn"][0] <= value["cross_stitch"][0]
    assert all(v[1] > 0 for v in value.values())
