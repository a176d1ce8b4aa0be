"""Any timm CNN as the backbone (mtsl_plugin.network.backbones): stage tables from timm's feature_info, the
encoder locations computing timm's own features, every method's network on them, and smoke runs end to end on
two non-ResNet families."""
import copy
import json

import pytest
import timm
import torch
import yaml

from baselines.ltb import LTB
from baselines.mtan import MTAN, last_block
from benchmarks import compare, speed
from mtsl_plugin.config import load_preset
from mtsl_plugin.experiment import build_stages, num_locations
from mtsl_plugin.network.backbones import TimmStages, create_stages
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.heads import Head
from mtsl_plugin.network.stages import DecoderStage, ResNetStages
from mtsl_plugin.network.weights import IMAGENET_MEAN, NormalizedStem
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plan_figure import draw_plan
from tests.network.test_branched import assert_fused_locations_match_under_autocast
from mtsl_plugin.preflight import check_config

OUT = {"S": 5, "D": 1, "E": 1}
NARROW_CONVNEXT = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}  # a quick ConvNeXt, through backbone_args
FAMILIES = ["convnext_atto", "efficientnet_b0", "mobilenetv3_small_050", "regnetx_002"]  # small variants


def timm_features(name, seed=0):
    """timm's own features_only model, initialised as the stage factory initialises it (same seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, features_only=True)


def heads(stages, tasks="SDE"):
    return {t: stages.build_head(OUT[t]) for t in tasks}


@pytest.fixture(scope="module")
def narrow():
    return create_stages("convnext_atto", backbone_args=NARROW_CONVNEXT)


# ------------------------------------------------------------------------------------ stage tables
@pytest.mark.parametrize("name", FAMILIES)
def test_stage_table_is_feature_info_plus_extra_and_decoder(name):
    """k feature stages give 2k locations: timm's widths, reductions and module names, one extra block at the
    deepest width, one decoder location per shallower stage reading its skip; k + 1 without the decoder."""
    info = timm_features(name).feature_info
    k = len(info)
    stages = create_stages(name)
    assert isinstance(stages, TimmStages) and stages.num_locations == 2 * k
    specs = stages.specs
    assert [s.name for s in specs[:k]] == info.module_name()
    assert [s.out_channels for s in specs[:k]] == info.channels()
    assert [s.in_channels for s in specs[:k]] == [3] + info.channels()[:-1]
    assert [s.reduction for s in specs[:k]] == info.reduction()
    assert (specs[k].name, specs[k].out_channels, specs[k].reduction) == ("extra", info.channels()[-1],
                                                                          info.reduction()[-1])
    assert [s.skip_from for s in specs[k + 1:]] == list(range(k - 2, -1, -1))
    assert [s.out_channels for s in specs[k + 1:]] == [info.channels()[j] for j in range(k - 2, -1, -1)]
    assert [s.reduction for s in specs[k + 1:]] == [info.reduction()[j] for j in range(k - 2, -1, -1)]
    assert stages.feature_locations == tuple(range(k)) and stages.head_locations == (2 * k - 1,)
    assert create_stages(name, decoder=False).num_locations == k + 1


@pytest.mark.parametrize("name", FAMILIES)
def test_encoder_locations_compute_timms_features(name):
    """Running locations 0 .. k-1 in turn gives timm's features_only outputs, exactly (same weights, eval)."""
    stages = create_stages(name, seed=3)
    reference = timm_features(name, seed=3).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        out = x
        for location, feature in enumerate(expected):
            out = stages.build(location).eval()(out)
            assert torch.equal(out, feature), location


def test_every_build_of_a_location_is_identical_and_fresh(narrow):
    for location in range(narrow.num_locations):
        a, b = narrow.build(location), narrow.build(location)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), (location, name)
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(a.parameters(), b.parameters()))
    assert isinstance(narrow.build(7), DecoderStage) and isinstance(narrow.build_head(5), Head)
    same = create_stages("convnext_atto", backbone_args=NARROW_CONVNEXT)  # the seed fixes everything
    assert all(torch.equal(x, y) for x, y in zip(same.build(5).state_dict().values(),
                                                   narrow.build(5).state_dict().values()))


def test_a_weights_file_initialises_the_stages_and_location_0_normalises(tmp_path):
    """A classifier checkpoint of the family loads into the features_only stages (classifier left out); the
    images are then normalised with the weights' statistics (ImageNet's) before location 0."""
    torch.manual_seed(5)
    trained = timm.create_model("convnext_atto", **{k: tuple(v) for k, v in NARROW_CONVNEXT.items()})
    torch.save(trained.state_dict(), tmp_path / "convnext.pth")
    stages = create_stages("convnext_atto", backbone_args=NARROW_CONVNEXT, weights=tmp_path / "convnext.pth")
    stem = stages.build(0)
    assert isinstance(stem, NormalizedStem) and torch.allclose(stem.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(stem.stem_0.weight, trained.stem[0].weight)
    assert torch.equal(stages.build(3).stages_3.blocks[0].conv_dw.weight, trained.stages[3].blocks[0].conv_dw.weight)
    with pytest.raises(ValueError, match="convnext.pth.*'regnetx_002'"):
        create_stages("regnetx_002", weights=tmp_path / "convnext.pth")


def test_resnets_keep_their_table_and_other_families_only_the_compact_one():
    assert type(create_stages("resnet18", network="authors")) is ResNetStages
    assert type(create_stages("resnet18", backbone_args={"channels": [16, 32, 64, 128]})) is ResNetStages
    for call, culprit in ((lambda: create_stages("convnext_atto", network="authors"), "'convnext_atto'"),
                          (lambda: create_stages("convnext_nope"), "'convnext_nope'"),
                          (lambda: create_stages("xception41"), "'xception41'"),  # hooked features: not a sequence
                          (lambda: create_stages("mambaout_femto"), "'mambaout_femto'.*channels-last")):
        with pytest.raises(ValueError, match=culprit) as error:
            call()
        assert len(str(error.value).splitlines()) == 1


def test_num_locations_counts_the_configured_table():
    smoke = load_preset("smoke")
    assert num_locations(smoke) == 10 and num_locations(smoke.replace(setting="encoder")) == 6
    convnext = smoke.replace(backbone="convnext_atto", backbone_args=NARROW_CONVNEXT)
    assert num_locations(convnext) == 8 and num_locations(convnext.replace(setting="encoder")) == 5
    assert build_stages(convnext).num_locations == 8


def test_preflight_names_a_backbone_that_cannot_be_cut():
    config = load_preset("smoke").replace(backbone="vit_tiny_patch16_224", backbone_args={})
    with pytest.raises(ValueError, match="'vit_tiny_patch16_224'.*cannot be cut") as error:
        check_config(config, progress=False)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("argv, culprit", [
    (["--backbone", "xception41"], "'xception41'"),
    (["--backbone", "convnext_atto", "--network", "authors"], "--network compact")])
def test_compare_refuses_a_backbone_it_cannot_cut_before_training(tmp_path, capsys, monkeypatch, argv, culprit):
    monkeypatch.setattr("benchmarks.harness.run_method", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "out"
    assert compare.main(["--methods", "mtsl", "--preset", "smoke", "--no-progress", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_pretrained_weights_out_of_reach_are_one_line_naming_the_offline_way(tmp_path, capsys, monkeypatch):
    """``--pretrained`` without internet (the Hub's client raises an OSError: nothing cached, no connection) is
    refused before any training, naming the backbone and ``--weights``, the way to start from a local file."""
    create = timm.create_model

    def offline(name, *args, pretrained=False, **kwargs):
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            raise OSError("We cannot find the requested files in the local cache.\nCheck your connection.")
        return create(name, *args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr("benchmarks.harness.run_method", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "out"
    assert compare.main(["--methods", "mtsl", "--preset", "smoke", "--pretrained", "--no-progress", "--out",
                         str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: timm could not fetch pretrained weights for 'resnet18' (We cannot find the requested "
                   "files in the local cache.); pass a local weights file with --weights when offline"), err
    assert not out.exists()


# ------------------------------------------------------------------------------------ networks on the stages
@pytest.mark.parametrize("setting", ["encoder-decoder", "encoder"])
def test_stn_and_one_net_predict_at_the_input_size(narrow, setting):
    stages = narrow if setting == "encoder-decoder" else create_stages("convnext_atto", decoder=False,
                                                                        backbone_args=NARROW_CONVNEXT)
    x = torch.rand(2, 3, 64, 64)
    costs = {}
    for name, plan in (("stn", BranchingPlan.single_task("SDE", stages.num_locations)),
                       ("onenet", BranchingPlan.one_net("SDE", stages.num_locations))):
        network = BranchedNetwork(plan, stages, heads(stages)).eval()
        with torch.no_grad():
            preds, _ = network(x)
        assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, c, 64, 64) for t, c in OUT.items()}
        costs[name] = network.cost(64, 64)
    assert costs["onenet"].params < costs["stn"].params and costs["onenet"].gmac < costs["stn"].gmac


@pytest.mark.parametrize("name, backbone_args", [("convnext_atto", NARROW_CONVNEXT), ("mobilenetv3_small_050", {})])
def test_fused_locations_equal_the_unfused_network(name, backbone_args):
    """torch.vmap over ConvNeXt's LayerNorm and depthwise convolutions and MobileNetV3's squeeze-excitation:
    outputs, gradients and running statistics of a training step agree in float64."""
    stages = create_stages(name, backbone_args=backbone_args)
    torch.manual_seed(0)
    plain = BranchedNetwork(BranchingPlan.single_task("SDE", stages.num_locations), stages, heads(stages)).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    (preds_a, _), (preds_b, _) = plain(x), fused(x)
    for t in "SDE":
        torch.testing.assert_close(preds_b[t], preds_a[t], rtol=1e-10, atol=1e-10)
    sum((p ** 2).mean() for p in preds_a.values()).backward()
    sum((p ** 2).mean() for p in preds_b.values()).backward()
    for (param, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10, msg=param)
    for (buffer, a), b in zip(plain.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=buffer)


@pytest.mark.parametrize("name, backbone_args", [("convnext_atto", NARROW_CONVNEXT), ("mobilenetv3_small_050", {})])
def test_fused_locations_under_bf16_autocast_equal_the_unfused_nodes(name, backbone_args):
    """ConvNeXt's LayerNorm and linear layers and MobileNetV3's squeeze-excitation, fused under autocast."""
    stages = create_stages(name, backbone_args=backbone_args)
    torch.manual_seed(0)
    plain = BranchedNetwork(BranchingPlan.single_task("SDE", stages.num_locations), stages, heads(stages))
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert_fused_locations_match_under_autocast(plain, torch.randn(4, 3, 32, 32))


def test_mtan_reads_the_input_of_each_stages_last_timm_block(narrow):
    """The last block of a timm stage is its last module with a ``drop_path`` (timm's residual blocks); a stem
    of plain layers has none. MTAN runs on the stages with every head at the input size."""
    nodes = [narrow.build(location) for location in range(narrow.num_locations)]
    assert all(last_block(nodes[l]) is nodes[l][-1].blocks[-1] for l in range(4))  # the stage's last ConvNeXtBlock
    assert last_block(nodes[4]) is nodes[4] and last_block(nodes[5]) is nodes[5].block  # extra and decoder blocks
    mobilenet = create_stages("mobilenetv3_small_050")
    assert last_block(mobilenet.build(0)) is None  # conv_stem, bn1, act1
    assert type(last_block(mobilenet.build(2))).__name__ == "InvertedResidual"
    model = MTAN(list("SDE"), lambda: narrow, heads(narrow), False, False, "cpu").eval()
    with torch.no_grad():
        preds = model(torch.rand(2, 3, 32, 32))
    assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, c, 32, 32) for t, c in OUT.items()}


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "regnetx_002", "resnet10t"])
def test_mtan_runs_where_a_stage_is_one_strided_block(name):
    """Such a block's input (b_ℓ) is twice as fine as the stage's output: the mask built from it could not gate
    the output, and MTAN failed on these backbones of the README's list after STN and One-Net had trained."""
    stages = create_stages(name)
    network = MTAN(list("SD"), lambda: stages, heads(stages, "SD"), False, False, "cpu").encoder
    with torch.no_grad():
        _, masks = network(torch.rand(2, 3, 64, 64))
    shared = network._shared(torch.rand(2, 3, 64, 64))
    assert all(m.shape == s.shape for t in "SD" for m, s in zip(masks[t], shared))


def test_ltb_gates_the_inputs_of_the_feature_stages_after_the_first(narrow):
    """The analogue of LibMTL's layer1-4: locations 1 .. k-1 (k = 4 on a ConvNeXt, 5 on a MobileNetV3)."""
    assert LTB(list("SDE"), lambda: narrow, heads(narrow), False, False, "cpu").gate_keys() == ["loc1", "loc2",
                                                                                                "loc3"]
    mobilenet = create_stages("mobilenetv3_small_050")
    keys = LTB(list("SD"), lambda: mobilenet, heads(mobilenet, "SD"), False, False, "cpu").gate_keys()
    assert keys == ["loc1", "loc2", "loc3", "loc4"]


def test_plan_figure_of_an_eight_location_plan(narrow):
    plan = BranchingPlan("SDE", [[["S", "D", "E"]]] * 3 + [[["S", "D"], ["E"]]] * 3 + [[["S"], ["D"], ["E"]]] * 2)
    labels = [s.name for s in narrow.specs]
    ax = draw_plan(plan, location_labels=labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["in", *labels, "heads"]
    assert len(ax.patches) == (3 * 1 + 3 * 2 + 2 * 3) + 1 + 3  # one box per node, the input, one per head
    assert [t.get_text() for t in draw_plan(plan).get_xticklabels()] == ["in", *map(str, range(8)), "heads"]


def test_speed_counts_the_size_of_stn_and_one_net_on_any_backbone(narrow, capsys):
    assert speed.main(["--backbone", "convnext_atto", "--height", "32", "--width", "32", "--steps", "0"]) == 0
    printed = capsys.readouterr().out
    assert "(8 locations)" in printed.splitlines()[0]
    rows = json.loads(printed.splitlines()[-1])["rows"]
    stages = create_stages("convnext_atto")
    for row, plan in (("stn", BranchingPlan.single_task(speed.TASKS, 8)),
                      ("onenet", BranchingPlan.one_net(speed.TASKS, 8))):
        network = BranchedNetwork(plan, stages, {t: stages.build_head(c) for t, c in
                                                 zip(speed.TASKS, (10, 1, 1, 3, 3))})
        cost = network.cost(32, 32)
        assert rows[row]["params"] == cost.params and rows[row]["gmac"] == pytest.approx(cost.gmac)


# ------------------------------------------------------------------------------------ end to end
METHODS = ["stn", "onenet", "mtsl", "ltb", "bmtas"]


def smoke_run(out, *options):
    return compare.main(["--methods", "mtsl,stn,onenet,ltb,bmtas", "--preset", "smoke", "--tasks", "S,D",
                         "--no-progress", "--out", str(out), *options])


@pytest.mark.parametrize("family", ["convnext", "mobilenetv3"])
def test_smoke_run_of_every_plan_method_on_a_non_resnet(tmp_path, family):
    """compare.py trains STN, One-Net, MTSL, LTB and BMTAS on the backbone: ConvNeXt through a config file (its
    own backbone_args), MobileNetV3 through --backbone (the preset's ResNet channels dropped)."""
    out = tmp_path / "run"
    if family == "convnext":
        config = tmp_path / "convnext.yaml"
        config.write_text(yaml.safe_dump({"backbone": "convnext_atto", "backbone_args": NARROW_CONVNEXT}))
        code, locations, shared_at_most = smoke_run(out, "--config", str(config)), 8, 3
    else:
        code, locations, shared_at_most = smoke_run(out, "--backbone", "mobilenetv3_small_050"), 10, 4
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == METHODS and all(r["status"] == "ok" for r in results)
    plans = {r["method"]: BranchingPlan.from_dict(r["plan"]) for r in results}
    assert all(plan.num_locations == locations for plan in plans.values())
    # LTB's reference search space gates the inputs of feature stages 1 .. k-1: deeper locations stay per task
    assert all(len(p) == 2 for p in plans["ltb"].partitions[shared_at_most:])
    saved = json.loads((out / "stn" / "seed0" / "config.json").read_text())["config"]
    assert saved["backbone_args"] == (NARROW_CONVNEXT if family == "convnext" else {})
    stn, onenet = results[0], results[1]
    assert onenet["params_m"] < stn["params_m"]
    assert (out / "architecture.png").stat().st_size > 0 and (out / "table.md").stat().st_size > 0
