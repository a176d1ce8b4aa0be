"""Breadth of "any timm CNN" (mtsl_plugin.network) beyond the four families of tests/test_timm_backbones.py, at tiny
widths: DenseNet (transitions, a norm layer as the last feature), DLA (timm lists a feature it does not return),
ResNetV2-BiT (GroupNorm, weight-standardised convolutions), GhostNet (a convolution as the first feature,
squeeze-excitation) and VGG (a feature stage without parameters); the fused path under timm's training options
(drop path, batch norm with a cumulative average); backbones refused in one line; image sizes a backbone cannot
run on."""
import copy

import numpy as np
import pytest
import timm
import torch
from timm.models.vgg import VGG
from torch import nn

from mtsl_plugin.export import StaticNetwork, export
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.network.backbones import TimmStages, create_stages
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import ResNetStages
from mtsl_plugin.plan import BranchingPlan

OUT = {"S": 3, "D": 1, "E": 1}
TINY = {  # timm's smallest variants made narrower through backbone_args
    "densenet121": {"growth_rate": 8, "block_config": [1, 1, 1, 1]},
    "dla46_c": {"channels": [8, 8, 16, 16, 32, 64]},
    "resnetv2_50x1_bit": {"channels": [32, 32, 64, 64], "stem_chs": 32, "bottle_ratio": 1.0},
    "ghostnet_050": {},
}
SIZE = (64, 96)  # DLA needs multiples of 32; the other families run on any size from 32 pixels


@pytest.fixture(scope="module", params=list(TINY))
def family(request):
    """(name, {setting: stages}) of one family, both settings."""
    name = request.param
    return name, {setting: create_stages(name, decoder=setting == "encoder-decoder", backbone_args=TINY[name])
                  for setting in ("encoder-decoder", "encoder")}


def plans(tasks: str, num_locations: int) -> dict[str, BranchingPlan]:
    """STN, One-Net, and a plan shared over the first third, S+D | E over the second, split after."""
    a, b = num_locations // 3, 2 * num_locations // 3
    partly = BranchingPlan(tasks, [[list(tasks)]] * a + [[["S", "D"], ["E"]]] * (b - a)
                           + [[[t] for t in tasks]] * (num_locations - b))
    return {"stn": BranchingPlan.single_task(tasks, num_locations),
            "onenet": BranchingPlan.one_net(tasks, num_locations), "partly": partly}


def network(plan: BranchingPlan, stages, dtype=torch.float32, noise: float = 0.0) -> BranchedNetwork:
    """The plan's network in ``dtype``; with ``noise``, every parameter moved by its own random amount (nodes of a
    location then differ)."""
    net = BranchedNetwork(plan, stages, {t: stages.build_head(OUT[t]) for t in plan.tasks}).to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return net


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative difference of ``b`` from ``a`` (0 for equal integer tensors)."""
    if not a.is_floating_point():
        return float(not torch.equal(a, b))
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


def assert_fused_matches(plain: BranchedNetwork, x: torch.Tensor, tolerance: float = 1e-9) -> None:
    """A training step and an evaluation of ``plain`` and of a fused copy: predictions, sibling features,
    gradients (each relative to its own norm, or to a millionth of the whole gradient's where smaller) and buffers
    agree to ``tolerance`` (normwise; float64 networks: batch norm over few pixels amplifies rounding, which
    elementwise checks trip over)."""
    plain.zero_grad(set_to_none=True)
    fused = copy.deepcopy(plain)
    fused.fused = True
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        fused.train(mode == "train")
        torch.manual_seed(0)  # the encoder setting's heads draw dropout
        preds_a, feats_a = plain(x)
        torch.manual_seed(0)
        preds_b, feats_b = fused(x)
        assert feats_a.keys() == feats_b.keys()
        for key in preds_a:
            assert relative(preds_a[key], preds_b[key]) < tolerance, (mode, key)
        for key in feats_a:
            assert relative(feats_a[key], feats_b[key]) < tolerance, (mode, key)
        if mode == "train":
            sum((p ** 2).mean() for p in preds_a.values()).backward()
            sum((p ** 2).mean() for p in preds_b.values()).backward()
            total = float(torch.cat([p.grad.flatten() for p in plain.parameters() if p.grad is not None]).norm())
            for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
                assert (a.grad is None) == (b.grad is None), name
                if a.grad is not None:  # a bias before a norm layer has a gradient of zero up to rounding
                    scale = max(float(a.grad.norm()), 1e-6 * total)
                    assert float((a.grad - b.grad).norm()) < tolerance * scale, name
        for (name, a), b in zip(plain.named_buffers(), fused.buffers()):
            assert relative(a, b) < tolerance, (mode, name)


def merge_all_siblings(net: BranchedNetwork, optimizer, tasks) -> list[int]:
    """Structural phases (no amalgamation) that merge the sibling task nodes at each frontier, shallow to deep,
    as MTSL's grouping would with every similarity 1; returns the locations merged."""
    learner = StructuralLearner(MTSLConfig(amalgamate=False))
    merged = []
    while net.plan.siblings():
        location = net.plan.siblings()[0][0]
        learner.measure = lambda *args, location=location: [(location, tuple(tasks), np.ones((len(tasks),) * 2))]
        assert learner.structural_phase(net, net, optimizer, lambda: [], lambda: [], torch.device("cpu")).merged
        merged.append(location)
    return merged


# ------------------------------------------------------------------------------------ families
@pytest.mark.parametrize("setting", ["encoder-decoder", "encoder"])
def test_every_plan_trains_and_predicts_at_the_input_size(family, setting):
    """STN, One-Net and a partly merged plan: a training step reaches every parameter, each task predicts at the
    input size (an odd one too, where the family takes it), and sharing costs less."""
    name, by_setting = family
    stages = by_setting[setting]
    sizes = [SIZE] + ([] if name == "dla46_c" else [(37, 53)])
    costs = {}
    for key, plan in plans("SDE", stages.num_locations).items():
        net = network(plan, stages).train()
        for height, width in sizes:
            preds, _ = net(torch.rand(2, 3, height, width))
            assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, OUT[t], height, width) for t in OUT}
            sum((p ** 2).mean() for p in preds.values()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters()), (key, name)
        costs[key] = net.cost(*SIZE)
    assert costs["onenet"].params < costs["partly"].params < costs["stn"].params
    assert costs["onenet"].gmac < costs["partly"].gmac < costs["stn"].gmac


def test_fused_locations_equal_the_unfused_network(family):
    """torch.vmap over DenseNet's concatenations, DLA's trees, BiT's GroupNorm and weight standardisation and
    GhostNet's ghost modules: float64, normwise to 1e-9, a training step and an evaluation."""
    name, by_setting = family
    stages = by_setting["encoder-decoder"]
    plain = network(plans("SDE", stages.num_locations)["partly"], stages, torch.float64, noise=0.01)
    assert_fused_matches(plain, torch.randn(4, 3, *SIZE, dtype=torch.float64))


def test_a_fused_evaluation_leaves_no_tensor_of_the_vmapped_call_in_a_nodes_cache():
    """timm's EfficientViT-M caches its attention biases in eval mode; computed inside the vmapped call, the cache
    kept a tensor of that call, so a deep copy (what export's static_network makes) or an unfused forward
    afterwards failed."""
    stages = create_stages("efficientvit_m0")
    net = network(BranchingPlan.single_task("SD", stages.num_locations), stages, noise=0.01).eval()
    net.fused = True
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        fused = net(x)[0]
        copy.deepcopy(net)
        net.fused = False
        unfused = net(x)[0]
    for task in fused:
        assert relative(unfused[task], fused[task]) < 1e-5, task


def test_merging_identical_task_nodes_keeps_the_predictions(family):
    """Two tasks with identical branches merged location by location into One-Net (weights averaged into each
    group node, as a structural phase does): the predictions stay exactly what they were."""
    name, by_setting = family
    stages = by_setting["encoder-decoder"]
    net = network(BranchingPlan.single_task("DE", stages.num_locations), stages)
    with torch.no_grad():
        for location in range(stages.num_locations):
            net.node(location, ("E",)).load_state_dict(net.node(location, ("D",)).state_dict())
        net.heads["E"].load_state_dict(net.heads["D"].state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(2, 3, *SIZE)
    sum((p ** 2).mean() for p in net(x)[0].values()).backward()
    optimizer.step()
    net.eval()
    with torch.no_grad():
        before = net(x)[0]
    assert merge_all_siblings(net, optimizer, "DE") == list(range(stages.num_locations))
    assert net.plan == BranchingPlan.one_net("DE", stages.num_locations)
    with torch.no_grad():
        after = net(x)[0]
    assert all(torch.equal(after[t], before[t]) for t in "DE")


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "dla46_c"])
def test_a_partly_merged_plan_exports_to_onnx(name, tmp_path):
    stages = create_stages(name, backbone_args=TINY[name])
    static = StaticNetwork(network(plans("SDE", stages.num_locations)["partly"], stages), "SDE")
    assert export(static, "onnx", tmp_path / "net.onnx", torch.rand(2, 3, *SIZE)) < 1e-4


def test_a_feature_timm_lists_but_does_not_return_is_no_location():
    """DLA's feature_info lists level0 (stride 1), which its features_only model does not return: five feature
    stages, level0 part of the first, computing timm's features exactly (the table was refused before: it
    counted every listed feature)."""
    stages = create_stages("dla46_c", seed=3, backbone_args=TINY["dla46_c"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = timm.create_model("dla46_c", features_only=True, **{k: tuple(v) for k, v in
                                                                        TINY["dla46_c"].items()}).eval()
    assert len(reference.feature_info) == 6 and stages.num_locations == 10
    assert [s.name for s in stages.specs[:5]] == ["level1", "level2", "level3", "level4", "level5"]
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        out = x
        for location, feature in enumerate(reference(x)):
            out = stages.build(location).eval()(out)
            assert torch.equal(out, feature), location


def test_a_feature_stage_without_parameters_joins_the_stage_before():
    """VGG's last feature stage is its final max-pool alone; as a location of its own it would have nothing to
    share (a merge there failed, and so did the fused call over nodes that read one parent). It joins the stage
    before it: every location holds parameters, the joined one ends with timm's last feature."""
    torch.manual_seed(0)
    vgg = VGG([8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"], norm_layer=nn.BatchNorm2d, num_classes=0)
    stages = TimmStages.from_model(vgg)
    assert [(s.name, s.reduction) for s in stages.specs[:5]] == [
        ("features.2", 1), ("features.6", 2), ("features.13", 4), ("features.20", 8), ("features.28", 32)]
    assert all(any(True for _ in stages.build(location).parameters()) for location in range(stages.num_locations))
    plan = BranchingPlan("SDE", [[list("SDE")]] * 4 + [[["S", "D"], ["E"]]] * 2 + [[[t] for t in "SDE"]] * 4)
    assert_fused_matches(network(plan, stages, torch.float64, noise=0.01),
                         torch.randn(4, 3, 64, 64, dtype=torch.float64))
    net = network(BranchingPlan.single_task("DE", stages.num_locations), stages)
    assert merge_all_siblings(net, torch.optim.Adam(net.parameters()), "DE") == list(range(stages.num_locations))


# ------------------------------------------------------------------------------------ fused training options
NARROW_CONVNEXT = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}


def test_fused_nodes_draw_their_own_drop_path():
    """timm's drop_path_rate inside fused nodes: each node draws its own paths, as separate nodes do (two identical
    nodes fed one input give different outputs in training, equal ones in evaluation), and training runs; on
    ResNeSt, which drops paths of its block's input, too, where the nodes share that input."""
    stages = create_stages("convnext_atto", backbone_args={**NARROW_CONVNEXT, "drop_path_rate": 0.5})
    net = network(BranchingPlan.single_task("DE", stages.num_locations), stages)
    with torch.no_grad():
        for location in range(stages.num_locations):
            net.node(location, ("E",)).load_state_dict(net.node(location, ("D",)).state_dict())
    net.fused = True
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    outputs = net.run_locations(x, until=3)
    assert not torch.equal(outputs[3][("D",)], outputs[3][("E",)])
    sum(o.pow(2).mean() for o in outputs[3].values()).backward()
    net.eval()
    with torch.no_grad():
        outputs = net.run_locations(x, until=3)
    assert torch.equal(outputs[3][("D",)], outputs[3][("E",)])
    resnest = create_stages("resnest14d", backbone_args={"channels": [16, 32, 64, 128], "drop_path_rate": 0.2})
    net = network(plans("SDE", resnest.num_locations)["partly"], resnest)
    net.fused = True
    preds, _ = net(x)
    sum((p ** 2).mean() for p in preds.values()).backward()
    net.eval()
    unfused = copy.deepcopy(net)
    unfused.fused = False
    with torch.no_grad():
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(net(x)[0].values(),
                                                                               unfused(x)[0].values()))


def test_fused_batch_norm_with_a_cumulative_average_equals_the_unfused_network():
    """Batch norm with momentum=None (a cumulative moving average, which reads its batch counter) in fused nodes:
    two training steps equal the unfused network's; where the nodes have counted different numbers of batches
    (a fresh node beside trained ones) the location runs node by node, still equal."""
    stages = ResNetStages("resnet18", backbone_args={"channels": (8, 8, 16, 16)})
    plain = network(plans("SDE", stages.num_locations)["partly"], stages, torch.float64, noise=0.01)
    for module in plain.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    assert_fused_matches(plain, x)
    assert_fused_matches(plain, x)  # counters at 1 now (the evaluation counts nothing)
    plain.node(9, ("S",)).block.bn1.num_batches_tracked.fill_(7)
    assert_fused_matches(plain, x)


# ------------------------------------------------------------------------------------ refusals and sizes
@pytest.mark.parametrize("name, reason", [
    ("selecsls42b", "location 1 \\(features.1\\) gives a list, not an \\(N, 128, H, W\\) tensor"),  # lists
    ("hrnet_w18_small", "does not run its stages in sequence"),  # parallel branches
    ("levit_128s", "does not run its stages in sequence"),  # a transformer
])
def test_a_backbone_that_cannot_be_cut_is_refused_in_one_line(name, reason):
    with pytest.raises(ValueError, match=f"'{name}'.*{reason}") as error:
        create_stages(name)
    assert len(str(error.value).splitlines()) == 1


def test_an_image_size_the_backbone_cannot_run_on_is_refused_in_one_line():
    """DLA runs on multiples of 32 only, DenseNet on 32 pixels or more (its last transition pools 2x2); ResNets
    on any size. What a preflight check calls before any training."""
    dla = create_stages("dla46_c", backbone_args=TINY["dla46_c"])
    dla.check_input_size(*SIZE)
    with pytest.raises(ValueError, match=r"'dla46_c' cannot run on 48x64 images: location 4 \(level5\) fails") \
            as error:
        dla.check_input_size(48, 64)
    assert len(str(error.value).splitlines()) == 1
    densenet = create_stages("densenet121", decoder=False, backbone_args=TINY["densenet121"])
    densenet.check_input_size(32, 32)
    with pytest.raises(ValueError, match="'densenet121' cannot run on 16x16 images"):
        densenet.check_input_size(16, 16)
    ResNetStages("resnet18", backbone_args={"channels": (8, 8, 16, 16)}).check_input_size(8, 8)


def test_the_preflight_check_refuses_a_size_the_backbone_cannot_run_on():
    """The commands' check before any training runs the data's image size through the network (DLA needs
    multiples of 32: the quick preset's 48x64 crashed it at the first training step)."""
    import dataclasses

    from conftest import smoke_config
    from mtsl_plugin.preflight import check_config

    config = smoke_config().replace(backbone="dla46_c", backbone_args=TINY["dla46_c"])
    check_config(config)  # 32x32
    with pytest.raises(ValueError, match=r"^backbone 'dla46_c' cannot run on 48x64 images: location 4 \(level5\)"):
        check_config(config.replace(data=dataclasses.replace(config.data, height=48, width=64)))
