"""BranchedNetwork on timm ResNets: shapes, features, structural edits, cost, weights."""
import pytest
import timm
import torch

from conftest import differs
from mtsl_plugin.config import RunConfig
from mtsl_plugin.network.backbones import create_stages
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.cost import model_cost
from mtsl_plugin.network.stages import ResNetStages, candidate_factories, slot_seed
from mtsl_plugin.network.weights import NormalizedStem
from mtsl_plugin.plan import BranchingPlan, PlanError

OUT = {"S": 5, "D": 1, "E": 1, "N": 3, "A": 3}


def build(plan, stages):
    return BranchedNetwork(plan, stages, {t: stages.build_head(OUT[t]) for t in plan.tasks})


@pytest.fixture(scope="module")
def stages():
    return ResNetStages("resnet18")


def test_stage_table_is_the_papers_ten_locations(stages):
    assert stages.num_locations == 10
    assert [s.reduction for s in stages.specs] == [2, 4, 8, 16, 32, 32, 16, 8, 4, 2]
    assert [s.skip_from for s in stages.specs[6:]] == [3, 2, 1, 0]
    assert ResNetStages("resnet18", decoder=False).num_locations == 6


def test_authors_network_is_their_stage_table():
    """The authors' code's network on ResNet18: max-pool in location 0, two Bottleneck blocks 512 -> 2048 at
    stride 2, four 256-channel Bottleneck decoder blocks with skips from layer4 .. layer1 (output stride 4)."""
    stages = ResNetStages("resnet18", network="authors")
    assert [s.reduction for s in stages.specs] == [4, 4, 8, 16, 32, 64, 32, 16, 8, 4]
    assert [s.out_channels for s in stages.specs] == [64, 64, 128, 256, 512, 2048, 256, 256, 256, 256]
    assert [s.skip_from for s in stages.specs[6:]] == [4, 3, 2, 1]
    assert [s.skip_channels for s in stages.specs[6:]] == [512, 256, 128, 64]
    assert stages.head_locations == (6, 7, 8, 9)
    # parameters by hand: Bottleneck(512, planes 512, stride 2) + Bottleneck(2048, 512), convs and BN affine
    conv = 512 * 512 + 9 * 512 * 512 + 512 * 2048
    bn = 2 * (512 + 512 + 2048)
    extra = (conv + bn + 512 * 2048 + 2 * 2048) + (2048 * 512 + 9 * 512 * 512 + 512 * 2048 + bn)
    assert sum(p.numel() for p in stages.build(5).parameters()) == extra
    # the first decoder block: concat 2048 + 512 -> 64 -> 64 -> 256, and its 1x1 residual projection 2048 -> 256
    dec1 = 2560 * 64 + 9 * 64 * 64 + 64 * 256 + 2 * (64 + 64 + 256) + 2048 * 256
    assert sum(p.numel() for p in stages.build(6).parameters()) == dec1
    # location 5 is He-initialised (the authors' initialize_weights): std sqrt(2 / (k * k * C_out)), BN weight 1;
    # the decoder keeps PyTorch's initialisation (tests/network/test_authors_heads.py)
    conv3x3 = stages.build(5)[0].conv2
    assert float(conv3x3.weight.detach().std()) == pytest.approx((2 / (9 * 512)) ** 0.5, rel=0.05)
    for build_without_decoder in (lambda: ResNetStages("resnet18", network="authors", decoder=False),
                                  lambda: ResNetStages.from_model(timm.create_model("resnet18", num_classes=0),
                                                                  network="authors", decoder=False),
                                  lambda: create_stages("convnext_atto", network="authors", decoder=False)):
        with pytest.raises(ValueError, match="^network 'authors' is an encoder-decoder; the encoder setting uses "
                                             "network 'compact'$"):
            build_without_decoder()


@pytest.mark.parametrize("in_channels", [8, 16])
def test_authors_decoder_block_adds_its_upsampled_input_to_the_bottleneck(in_channels):
    """out = relu(bottleneck(cat(up(x), skip)) + projection(up(x))): with the bottleneck's last BN zeroed only the
    residual path is left (identity where the widths agree, the 1x1 projection where they differ)."""
    import torch.nn.functional as F

    from mtsl_plugin.network.stages import BottleneckDecoderStage

    torch.manual_seed(0)
    stage = BottleneckDecoderStage(in_channels, 4, planes=2).eval()
    torch.nn.init.zeros_(stage.body[-1].weight)
    torch.nn.init.zeros_(stage.body[-1].bias)
    x, skip = torch.randn(2, in_channels, 3, 3), torch.randn(2, 4, 6, 6)
    up = F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(stage(x, skip), F.relu(stage.projection(up)))
    assert isinstance(stage.projection, torch.nn.Identity) == (in_channels == 8)  # out: 4 x planes = 8 channels


def test_authors_heads_read_their_tasks_four_decoder_outputs():
    """Each head reads the four decoder locations of its own branch: a change to S's node at location 8 (S and D
    split there, shared at 9) moves S's prediction only, and D's head gets gradients from all four locations."""
    stages = ResNetStages("resnet18", network="authors", backbone_args={"channels": (16, 32, 64, 128)})
    plan = BranchingPlan.single_task("SD", 10).merge(0, ["SD"]).merge(1, ["SD"]).merge(2, ["SD"]).merge(
        3, ["SD"]).merge(4, ["SD"]).merge(5, ["SD"]).merge(6, ["SD"]).merge(7, ["SD"])
    net = build(plan, stages).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before, _ = net(x)
        for p in net.node(8, ("S",)).parameters():
            p.add_(0.1)
        after, _ = net(x)
    assert before["S"].shape == (2, 5, 64, 96)
    assert not torch.allclose(before["S"], after["S"]) and torch.equal(before["D"], after["D"])
    outputs = net.run_locations(x)
    inputs = net.head_inputs(outputs, "D")
    assert [tuple(f.shape[1:]) for f in inputs] == [(64, 2, 3), (64, 4, 6), (64, 8, 12), (64, 16, 24)]  # 4 x 16
    net.heads["D"](inputs, (64, 96)).sum().backward()
    assert all(net.heads["D"].reduce[i].weight.grad.abs().sum() > 0 for i in range(4))


def test_forward_shapes_and_sibling_features(stages):
    plan = BranchingPlan.single_task("SDENA", 10).merge(0, ["SDENA"]).merge(1, ["SE", "DNA"])
    net = build(plan, stages)
    preds, feats = net(torch.randn(2, 3, 32, 48))
    assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, c, 32, 48) for t, c in OUT.items()}
    # the task nodes with siblings sit at location 2 (under SE and under DNA), output 128 channels at 1/8
    assert set(feats) == set("SDENA")
    assert all(tuple(f.shape) == (2, 128, 4, 6) for f in feats.values())


@pytest.mark.parametrize("backbone", ["resnet34", "resnet50"])
def test_other_resnets_build_and_run(backbone):
    stages = ResNetStages(backbone)
    plan = BranchingPlan.single_task("SD", stages.num_locations).merge(0, ["SD"])
    preds, feats = build(plan, stages)(torch.randn(2, 3, 32, 32))
    assert preds["S"].shape == (2, 5, 32, 32) and preds["D"].shape == (2, 1, 32, 32)
    assert feats["S"].shape[1] == stages.specs[1].out_channels


def test_identical_starting_networks(stages):
    """Every task's branch starts from the same weights (the identical STNs MTSL starts from)."""
    net = build(BranchingPlan.single_task("SD", 10), stages)
    for location in range(10):
        a, b = net.node(location, ("S",)), net.node(location, ("D",))
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb) and pa is not pb


def test_apply_plan_replaces_exactly_the_merged_nodes(stages):
    net = build(BranchingPlan.single_task("SDE", 10), stages)
    kept = net.node(1, ("S",))
    group = stages.build(0)
    removed = net.apply_plan(net.plan.merge(0, ["SD"]), {(0, ("S", "D")): group})
    assert len(removed) == 2
    assert net.node(0, ("S", "D")) is group and net.node(1, ("S",)) is kept
    assert [name for name in net.nodes][:3] == ["0-S+D", "0-E", "1-S"]  # canonical order
    with pytest.raises(PlanError, match="neither kept nor created"):
        net.apply_plan(net.plan.merge(1, ["SD"]), {})


def test_cost_matches_parameter_count_and_sharing(stages):
    stn = build(BranchingPlan.single_task("SDENA", 10), stages)
    one = build(BranchingPlan.one_net("SDENA", 10), stages)
    for net in (stn, one):
        assert net.cost(32, 32).params == sum(p.numel() for p in net.parameters())
    c_stn, c_one = stn.cost(64, 64), one.cost(64, 64)
    assert c_one.gmac < c_stn.gmac < 5 * c_one.gmac
    assert stn.cost(128, 128).gmac == pytest.approx(4 * c_stn.gmac, rel=0.05)


@pytest.mark.parametrize("plan", [BranchingPlan.single_task("SDENA", 10), BranchingPlan.one_net("SDENA", 10),
                                  BranchingPlan.single_task("SDENA", 10).merge(0, ["SDENA"]).merge(1, ["SE", "DNA"])
                                  .merge(2, ["SE", "DN", "A"])])
def test_cost_table_equals_counting_the_whole_network(stages, plan):
    """The per-stage table (nodes x groups + heads) against flop-counting one forward of the built network, so a
    wrong head or node cost shows."""
    net = build(plan, stages)
    table, counted = net.cost(64, 96), model_cost(net, 64, 96)
    assert table.params == counted.params == sum(p.numel() for p in net.parameters())
    assert table.gmac == pytest.approx(counted.gmac, rel=1e-9)


def test_model_cost_counts_multiply_accumulates_and_submodule_parameters_only():
    """GMac is multiply-accumulates / 1e9 (not FLOPs): a 3x3 convolution 3 -> 8 on 10 x 12 makes 8*3*9*120 of them
    plus the linear layer's 8*4; a parameter registered on the model itself (a weighting's loss scale) is not part of
    the inference network."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Linear(8, 4, bias=False)
            self.loss_scale = torch.nn.Parameter(torch.zeros(5))

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    cost = model_cost(Net(), 10, 12)
    assert cost.params == 8 * 3 * 9 + 8 * 4
    assert cost.gmac == pytest.approx((8 * 3 * 9 * 120 + 8 * 4) / 1e9)


def test_local_weights_file_is_loaded(tmp_path):
    reference = timm.create_model("resnet18", num_classes=0)
    with torch.no_grad():
        reference.conv1.weight.fill_(0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    stages = ResNetStages("resnet18", weights=path)
    assert torch.all(stages.build(0)[0].weight == 0.125)
    # pretrained weights see their training data's statistics: the stem normalises images (ImageNet mean/std)
    image = torch.rand(2, 3, 16, 16)
    stem = stages.build(0).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    plain = torch.nn.Sequential(*stem).eval()
    torch.testing.assert_close(stem(image), plain((image - mean) / std))
    assert stem.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep their keys
    assert not isinstance(ResNetStages("resnet18").build(0), NormalizedStem)  # random init: images as they are
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResNetStages("resnet18", weights=tmp_path / "missing.pth")
    (tmp_path / "broken.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="broken.pth"):
        ResNetStages("resnet18", weights=tmp_path / "broken.pth")


def test_redrawn_stages_draw_random_weights_again_and_keep_loaded_ones(tmp_path):
    """What a second ``encoder_class()`` gives in LibMTL: another random draw of everything no weights file covers."""
    stages = ResNetStages("resnet18", backbone_args={"channels": (8, 8, 8, 8)})
    again = stages.redrawn(slot_seed(stages.seed, 1))
    assert again.specs == stages.specs and again.seed != stages.seed
    assert all(differs(stages.build(l), again.build(l)) for l in range(stages.num_locations))
    assert not differs(stages.redrawn(stages.seed).build(3), stages.build(3))  # a seed gives one network
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "resnet18.pth")
    loaded = ResNetStages("resnet18", weights=tmp_path / "resnet18.pth")
    other = loaded.redrawn(slot_seed(loaded.seed, 1))
    assert [differs(loaded.build(l), other.build(l)) for l in range(10)] == [False] * 5 + [True] * 5  # decoder
    model = timm.create_model("resnet18", num_classes=0, channels=(8, 8, 8, 8))
    users = ResNetStages.from_model(model).redrawn(7)  # a caller's model keeps its weights
    assert not differs(users.build(2), ResNetStages.from_model(model).build(2)) and users.seed == 7


def test_candidate_factories_and_slot_seeds(stages):
    seeds = [slot_seed(s, j) for s in range(3) for j in range(1, 6)]
    assert slot_seed(4, 0) == 4 and len(set(seeds) | {0, 1, 2}) == len(seeds) + 3  # no copy shares a seed
    assert candidate_factories(stages, 3, "identical") == [stages] * 3
    independent = candidate_factories(stages, 3)
    assert independent[0] is stages
    assert [f.seed for f in independent[1:]] == [slot_seed(stages.seed, j) for j in (1, 2)]
    with pytest.raises(ValueError, match="candidates must be one of"):
        candidate_factories(stages, 3, "same")


def test_a_weights_file_holding_only_a_minority_of_the_tensors_is_refused(tmp_path):
    """A file that would leave most of the backbone at its random initialisation (here a third of a perturbed
    ResNet-18's tensors, so no default-initialised tensor matches by chance) is refused, not half loaded."""
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=0)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in reference.state_dict().items()}
    floats = [k for k, v in state.items() if v.is_floating_point()]
    kept = floats[: len(floats) // 3]
    torch.save({k: state[k] for k in kept}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=rf"partial.pth' holds only {len(kept)} of the {len(floats)} tensors"):
        ResNetStages("resnet18", weights=tmp_path / "partial.pth")
    torch.save(state, tmp_path / "whole.pth")  # the whole file loads
    whole = ResNetStages("resnet18", weights=tmp_path / "whole.pth")
    assert torch.equal(whole.build(0)[0].weight, state["conv1.weight"])


@pytest.mark.parametrize("content", [
    {"foo": torch.zeros(3)},  # nothing of the backbone: timm would log and go on with random weights
    {"format": 1, "model": {"encoder.stage.weight": torch.zeros(4, 3, 1, 1)}},  # e.g. a results model.pt
])
def test_a_weights_file_of_another_model_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"other.pth' holds only 0 of the \d+ tensors of 'resnet18'"):
        ResNetStages("resnet18", weights=path)


def test_missing_head_and_wrong_depth_are_clear_errors(stages):
    with pytest.raises(ValueError, match="no head"):
        BranchedNetwork(BranchingPlan.single_task("SD", 10), stages, {"S": stages.build_head(2)})
    with pytest.raises(PlanError, match="6 locations"):
        build(BranchingPlan.single_task("SD", 6), stages)


# ------------------------------------------------------------------------------------ fused execution
FUSED_PLANS = [BranchingPlan.single_task("SDE", 10),
               BranchingPlan("SDE", [[["S", "D", "E"]]] * 2 + [[["S", "D"], ["E"]]] * 3 + [[["S"], ["D"], ["E"]]] * 5)]


#: The devices the fused checks run on: the CPU always, a GPU where there is one (the fused path's vmap over
#: grouped convolutions and batch norm is cuDNN's there).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def fused_pair(network, plan, device="cpu"):
    """Two float64 copies of one network (nodes made to differ) on ``device``, the second running fused."""
    import copy

    smoke = ResNetStages("resnet18", backbone_args={"channels": (16, 32, 64, 128)}, network=network)
    torch.manual_seed(0)
    plain = build(plan, smoke).double().to(device)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = copy.deepcopy(plain)
    fused.fused = True
    return plain, fused


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", ["compact", "authors"])
@pytest.mark.parametrize("plan", FUSED_PLANS, ids=["stn", "partly-merged"])
def test_fused_locations_equal_the_unfused_network(network, plan, device):
    """Outputs, sibling features, gradients and batch-norm running statistics of a training step agree to 1e-10
    (relative, float64: the fused call is the same arithmetic in another order; in float32 they differ by
    rounding, amplified by batch norm over few pixels)."""
    plain, fused = fused_pair(network, plan, device)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, device=device)
    (preds_a, feats_a), (preds_b, feats_b) = plain(x), fused(x)
    for t in "SDE":
        torch.testing.assert_close(preds_b[t], preds_a[t], rtol=1e-10, atol=1e-10)
    assert feats_a.keys() == feats_b.keys()
    for t in feats_a:
        torch.testing.assert_close(feats_b[t], feats_a[t], rtol=1e-10, atol=1e-10)
    sum((p ** 2).mean() for p in preds_a.values()).backward()
    sum((p ** 2).mean() for p in preds_b.values()).backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10, msg=name)
    for (name, a), b in zip(plain.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)


def assert_fused_locations_match_under_autocast(plain: BranchedNetwork, x: torch.Tensor) -> None:
    """Every location of ``plain`` (float32) with several nodes, run fused under bf16 autocast, against the same
    nodes run one by one under autocast and in float32 (the reference), all on the same inputs: the fused outputs
    have the unfused outputs' dtype; the fused outputs (per node) and the gradients they send to all the nodes'
    parameters (one vector) are no further from the float32 reference, in L2 norm, than twice the unfused bf16
    ones are, plus 0.1 % of the reference (bf16 rounding differs between one grouped and several convolutions);
    batch-norm running statistics likewise, and float32. (autocast does not reach inside ``torch.vmap``;
    the fused call casts by hand.) On ``x``'s device."""
    import copy

    reference, unfused, fused = copy.deepcopy(plain), copy.deepcopy(plain), copy.deepcopy(plain)
    fused.fused = True
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        outputs = copy.deepcopy(plain).run_locations(x)  # what each location reads, computed once

    def close_enough(fused_value: torch.Tensor, unfused_value: torch.Tensor, exact: torch.Tensor) -> bool:
        fused_value, unfused_value, exact = fused_value.detach().float(), unfused_value.detach().float(), exact.detach()
        error = float((fused_value - exact).norm())
        return error <= 2 * float((unfused_value - exact).norm()) + 1e-3 * float(exact.norm())

    for location, groups in enumerate(plain.plan.partitions):
        if len(groups) < 2:
            continue
        inputs = [{g: t.detach() for g, t in out.items()} for out in outputs[:location]]
        exact = {g: reference.run_node(location, g, [{k: v.float() for k, v in o.items()} for o in inputs], x)
                 for g in groups}
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            one_by_one = {g: unfused.run_node(location, g, inputs, x) for g in groups}
            together = fused.run_fused(location, groups, inputs, x)
        for g in groups:
            assert together[g].dtype == one_by_one[g].dtype, (location, g)
            assert close_enough(together[g], one_by_one[g], exact[g]), (location, g)
        for outs in (exact, one_by_one, together):
            sum(t.float().pow(2).mean() for t in outs.values()).backward()
    grads = [torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
             for net in (reference, unfused, fused)]
    assert [p.grad is None for p in fused.parameters()] == [p.grad is None for p in reference.parameters()]
    assert close_enough(grads[2], grads[1], grads[0])
    for (name, exact), a, b in zip(reference.named_buffers(), unfused.buffers(), fused.buffers()):
        assert exact.dtype == a.dtype == b.dtype, name
        assert not exact.is_floating_point() or close_enough(b, a, exact), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", ["compact", "authors"])
def test_fused_locations_under_bf16_autocast_equal_the_unfused_nodes(network, device):
    plain, _ = fused_pair(network, FUSED_PLANS[1], device)
    assert_fused_locations_match_under_autocast(plain.float(), torch.randn(4, 3, 64, 64, device=device))


def test_a_merge_after_fused_training_equals_the_merge_after_unfused_training():
    """Two Adam steps fused and unfused, then the S and D task nodes at location 2 averaged into a group node
    (weights, BN statistics, Adam state): the same group node either way."""
    from mtsl_plugin.learner.optim import average_module_state, average_parameter_state

    plan = FUSED_PLANS[1]
    merged = []
    for run_fused in (False, True):
        network, _ = fused_pair("compact", plan)
        network.fused = run_fused
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            preds, _ = network(torch.randn(4, 3, 64, 64, dtype=torch.float64, generator=generator))
            optimizer.zero_grad()
            sum((p ** 2).mean() for p in preds.values()).backward()
            optimizer.step()
        nodes = [network.node(5, ("S",)), network.node(5, ("D",))]
        merged.append((average_module_state(nodes), average_parameter_state(optimizer, nodes)))
    (state_a, adam_a), (state_b, adam_b) = merged
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-8, atol=1e-10, msg=name)
    for a, b in zip(adam_a, adam_b):
        for key in a:
            torch.testing.assert_close(torch.as_tensor(b[key]), torch.as_tensor(a[key]), rtol=1e-6, atol=1e-10)


def test_task_names_that_would_share_a_node_name_are_refused(stages):
    """Node names join a group's tasks with "+": groups (a+b, c) and (a, b+c) would both be "0-a+b+c", one module
    silently serving two groups. Such names (and dotted ones, which modules cannot take) are refused in a line."""
    tasks = ("a+b", "c", "a", "b+c")
    plan = BranchingPlan(tasks, [[["a+b", "c"], ["a", "b+c"]]] * 10)
    with pytest.raises(ValueError, match=r"\['a\+b', 'b\+c'\] cannot name network modules"):
        BranchedNetwork(plan, stages, {t: stages.build_head(2) for t in tasks})
    for bad in ("s.x", "", "float"):  # a dotted path; names nn.ModuleDict refuses (a raw KeyError before)
        with pytest.raises(ValueError, match=f"\\[{bad!r}\\] cannot name network modules"):
            BranchedNetwork(BranchingPlan.single_task((bad, "d"), 10), stages,
                            {t: stages.build_head(2) for t in (bad, "d")})
        with pytest.raises(ValueError, match=f"\\[{bad!r}\\] cannot name network modules"):
            RunConfig(tasks=(bad, "d"))  # so a --config declaring it is refused before any training


def test_created_nodes_take_the_networks_mode(stages):
    """A node built for a structural edit starts in training mode; installed in a network in evaluation mode it
    must evaluate too (else it normalises with the batch's statistics and updates its own)."""
    net = build(BranchingPlan.single_task("SD", 10), stages).eval()
    group = stages.build(0)
    assert group.training
    net.apply_plan(net.plan.merge(0, ["SD"]), {(0, ("S", "D")): group})
    assert not any(m.training for m in net.modules())


def test_cost_of_a_float64_network(stages):
    """The cost is counted on an input of the network's own dtype (and device)."""
    net = build(BranchingPlan.single_task("SD", 10), stages)
    assert net.double().cost(32, 32) == net.float().cost(32, 32)
    assert model_cost(net.double(), 32, 32) == model_cost(net.float(), 32, 32)


def test_counting_the_cost_leaves_the_network_in_its_mode_when_it_raises(stages, monkeypatch):
    """The cost is counted in evaluation mode; an error while counting (caught by the caller, who goes on
    training) leaves the network, and a model counted whole, in the mode it was in."""
    from mtsl_plugin.network import branched, cost

    def fails(run):
        raise RuntimeError("cannot count")

    net = build(BranchingPlan.single_task("SD", 10), stages)
    monkeypatch.setattr(branched, "count_gmac", fails)
    monkeypatch.setattr(cost, "count_gmac", fails)
    for training in (True, False):
        for count in (net.cost, lambda h, w: model_cost(net, h, w)):
            net.train(training)
            with pytest.raises(RuntimeError, match="cannot count"):
                count(32, 32)
            assert all(m.training == training for m in net.modules())
