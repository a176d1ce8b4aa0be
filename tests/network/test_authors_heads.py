"""The ``authors`` network's task heads and initialisation, against the authors' code (NeurAI-Lab/MTSL):
S and E end in a 1x1 conv (``SegHead``), D in a 3x3 conv and ReLU (``DepthHead``, their NYUv2 variant), N in a
3x3 conv and tanh (``SurfaceNormalHead``), A in a 3x3 conv (``AutoEncoderHead``); other tasks and the
``compact`` network keep the plain heads. Locations 0-5 are He-initialised with BatchNorm scales at 1 (their
``initialize_weights``); the decoder keeps PyTorch's."""
import math

import pytest
import torch
from torch import nn

from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.heads import PLAIN_HEAD, Head, HeadForm, MultiScaleHead
from mtsl_plugin.network.stages import BottleneckDecoderStage, ResNetStages
from mtsl_plugin.plan import BranchingPlan

NARROW = {"channels": (16, 32, 64, 128)}
OUT = {"S": 5, "D": 1, "E": 1, "N": 3, "A": 3}


@pytest.fixture(scope="module")
def authors():
    return ResNetStages("resnet18", network="authors", backbone_args=NARROW)


@pytest.fixture(scope="module")
def compact():
    return ResNetStages("resnet18", backbone_args=NARROW)


def features(stages, scale=1.0, seed=0):
    """Random inputs for a head of ``stages``: one (2, C_l, h_l, w_l) tensor per head location."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, stages.specs[l].out_channels, 2 ** (i + 1), 2 ** (i + 2)) for i, l in
              enumerate(stages.head_locations)]
    return [scale * torch.randn(s, generator=generator) for s in shapes]


def last_conv(head: MultiScaleHead) -> nn.Conv2d:
    return head.classifier


@pytest.mark.parametrize("task", ["S", "E"])
def test_segment_and_contour_heads_end_in_a_1x1_conv(authors, task):
    head = authors.build_head(OUT[task], task=task)
    assert isinstance(head, MultiScaleHead)
    assert last_conv(head).kernel_size == (1, 1) and last_conv(head).bias is not None
    assert isinstance(head.activation, nn.Identity)
    assert all(conv.bias is not None for conv in head.reduce)  # SegHead's 1x1 convs have a bias


@pytest.mark.parametrize("task", ["D", "N", "A"])
def test_depth_normal_autoencoder_heads_end_in_a_3x3_conv(authors, task):
    head = authors.build_head(OUT[task], task=task)
    conv = last_conv(head)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is not None
    assert conv.out_channels == OUT[task]
    assert all(c.bias is None for c in head.reduce)  # their conv1x1(..., bias=False)
    out = head(features(authors), (32, 48))
    assert out.shape == (2, OUT[task], 32, 48)


def test_depth_head_is_non_negative_for_any_input(authors):
    head = authors.build_head(1, task="D").eval()
    assert isinstance(head.activation, nn.ReLU)
    for seed, scale in [(0, 1.0), (1, 100.0), (2, -100.0)]:
        with torch.no_grad():
            out = head(features(authors, scale, seed), (30, 50))
        assert out.min() >= 0
    # the conv alone does go negative: the ReLU is what keeps the prediction non-negative
    with torch.no_grad():
        head.classifier.bias.fill_(-1e3)
        assert torch.equal(head(features(authors), (16, 16)), torch.zeros(2, 1, 16, 16))


def test_normal_head_lies_in_minus_one_one(authors):
    head = authors.build_head(3, task="N").eval()
    assert isinstance(head.activation, nn.Tanh)
    with torch.no_grad():
        out = head(features(authors, 1e3, 3), (30, 50))
    assert out.abs().max() <= 1 + 1e-6  # bilinear upsampling keeps the range, up to float rounding
    assert out.abs().max() > 0.99  # saturated, so the tanh was reached (not a coincidence of small values)


def test_autoencoder_head_has_no_activation(authors):
    head = authors.build_head(3, task="A").eval()
    assert isinstance(head.activation, nn.Identity)
    with torch.no_grad():
        out = head(features(authors, 1e3, 4), (16, 16))
    assert out.min() < -1 and out.max() > 1


@pytest.mark.parametrize("task", [None, "parts", "X"])
def test_other_tasks_get_the_plain_head(authors, task):
    """A task the user declares (or none named) keeps the 1x1, no-activation head of before."""
    head = authors.build_head(3, task=task)
    plain = authors.build_head(3)
    assert head.form == PLAIN_HEAD == HeadForm(1, None, True)
    assert last_conv(head).kernel_size == (1, 1) and isinstance(head.activation, nn.Identity)
    assert head.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), plain.state_dict().values()))


def test_heads_keep_pytorchs_default_initialisation(authors):
    """Their heads call no initialisation: every conv weight lies within PyTorch's bound 1 / sqrt(fan_in)."""
    for task, channels in OUT.items():
        for m in authors.build_head(channels, task=task).modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                assert m.weight.abs().max() <= 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("task", ["S", "D", "E", "N", "A", None])
def test_compact_heads_do_not_depend_on_the_task(compact, task):
    """The compact network's head is conv3x3-BN-ReLU-conv1x1 with no output activation, whatever the task."""
    head = compact.build_head(OUT.get(task, 2), task=task)
    plain = compact.build_head(OUT.get(task, 2))
    assert isinstance(head, Head) and not isinstance(head, MultiScaleHead)
    assert isinstance(head.body[-1], nn.Conv2d) and head.body[-1].kernel_size == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), plain.state_dict().values()))
    with torch.no_grad():
        x = [100 * torch.randn(2, compact.specs[-1].out_channels, 8, 8, generator=torch.Generator().manual_seed(5))]
        out = head.eval()(x, (16, 16))
    assert out.min() < -1 and out.max() > 1  # no activation bounds it


def test_network_predictions_have_their_tasks_ranges(authors):
    plan = BranchingPlan.one_net("SDENA", authors.num_locations)
    net = BranchedNetwork(plan, authors, {t: authors.build_head(c, task=t) for t, c in OUT.items()}).eval()
    with torch.no_grad():
        preds, _ = net(torch.rand(2, 3, 64, 96))
    assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, c, 64, 96) for t, c in OUT.items()}
    assert preds["D"].min() >= 0 and preds["N"].abs().max() <= 1 + 1e-6


def _std(conv: nn.Conv2d) -> tuple[float, float, float]:
    """The weight's std, PyTorch's default std (uniform in +-1/sqrt(fan_in): 1/sqrt(3 fan_in)) and He's
    (the authors' initialize_weights: sqrt(2 / fan_out))."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return (float(conv.weight.detach().std()), 1 / math.sqrt(3 * k * conv.in_channels),
            math.sqrt(2 / (k * conv.out_channels)))


@pytest.mark.parametrize("backbone_args", [NARROW, None])
def test_location_5_is_he_initialised_and_the_decoder_is_not(backbone_args):
    """The decoder (locations 6-9) keeps PyTorch's initialisation (their Decoder initialises only under
    MODEL.DECODER.INIT_WEIGHTS, False in their configs); location 5 is He-initialised (uninet_encoder.py)."""
    stages = ResNetStages("resnet18", network="authors", backbone_args=backbone_args)
    for location in range(6, 10):
        stage = stages.build(location)
        assert isinstance(stage, BottleneckDecoderStage)
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 3 + (location == 6)  # the body's three, and dec1's 1x1 projection
        for conv in convs:
            std, default, he = _std(conv)
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            assert conv.weight.abs().max() <= 1 / math.sqrt(fan_in)  # uniform within PyTorch's bound
            assert std == pytest.approx(default, rel=0.1)
            assert abs(math.log(std / default)) < abs(math.log(std / he)) / 2
    for conv in (m for m in stages.build(5).modules() if isinstance(m, nn.Conv2d)):
        std, default, he = _std(conv)
        assert std == pytest.approx(he, rel=0.1)
        assert abs(math.log(std / he)) < abs(math.log(std / default)) / 2


@pytest.mark.parametrize("backbone_args", [NARROW, None])
def test_a_random_backbone_starts_every_batchnorm_scale_at_one_as_the_authors(backbone_args):
    """The authors' ResNet calls ``initialize_weights`` (every BatchNorm weight 1, bias 0); timm zeroes each
    residual block's last BatchNorm scale (``zero_init_last``), which started the ``paper`` preset's locations 1-4
    with every residual branch switched off. The ``compact`` network keeps timm's default."""
    authors = ResNetStages("resnet18", network="authors", backbone_args=backbone_args)
    compact = ResNetStages("resnet18", network="compact", backbone_args=backbone_args)
    for location in range(6):
        norms = [m for m in authors.build(location).modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert any(torch.all(m.weight == 0) for m in compact.build(1).modules() if isinstance(m, nn.BatchNorm2d))


def test_the_first_decoder_block_projects_its_input_whatever_the_widths():
    """The authors' dec1 always has its 1x1 input projection (their DecoderBlock makes one for the list of
    inputs dec1 gets), even where the backbone's widths make the extra stage's output as wide as the decoder;
    dec2-dec4 have none."""
    stages = ResNetStages("resnet18", network="authors", backbone_args={"channels": (32, 32, 32, 32)})
    assert stages.specs[6].in_channels == stages.specs[6].out_channels
    assert isinstance(stages.build(6).projection, nn.Conv2d)
    assert all(isinstance(stages.build(location).projection, nn.Identity) for location in (7, 8, 9))


def test_multiscale_head_works_at_a_quarter_of_each_side_of_a_non_square_input():
    """The head's working resolution is (H // 4, W // 4), each side its own: a location already at that size
    passes through unresized, so the output is the classifier's, upsampled once to (H, W)."""
    torch.manual_seed(0)
    head = MultiScaleHead([4], width=3, out_channels=2).eval()
    x = torch.randn(1, 4, 2, 5)  # a quarter of (8, 20)
    expected = nn.functional.interpolate(head.classifier(head.reduce[0](x)), size=(8, 20), mode="bilinear",
                                         align_corners=False)
    with torch.no_grad():
        assert torch.allclose(head([x], (8, 20)), expected.detach(), atol=1e-6)


def test_heads_refuse_another_number_of_locations_and_unknown_activations():
    """A head given more (or fewer) locations' outputs than it reads, or built with an unknown activation, is
    refused in one line instead of silently ignoring inputs."""
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="reads 1 locations"):
        MultiScaleHead([4], width=3, out_channels=2)([x, x], (8, 8))
    with pytest.raises(ValueError, match="reads one location"):
        Head(4, 2)([x, x], (8, 8))
    with pytest.raises(ValueError, match="unknown head activation"):
        MultiScaleHead([4], width=3, out_channels=2, form=HeadForm(activation="sigmoid"))


@pytest.mark.parametrize("network", ["compact", "authors"])
def test_each_task_draws_its_own_head_and_every_build_of_it_is_the_same(network, request):
    """Tasks of one width (D and E, N and A) start from heads of their own, as the authors draw each task's head;
    a task's head is the same draw in every build, so it starts alike in every method of a comparison. A run
    names each head by its task (``run_heads``)."""
    from conftest import smoke_config
    from mtsl_plugin.experiment import build_stages, run_heads
    from mtsl_plugin.tasks import build_tasks

    stages, compact = request.getfixturevalue(network), request.getfixturevalue("compact")
    first = {t: stages.build_head(c, task=t, name=t) for t, c in OUT.items()}
    again = {t: stages.build_head(c, task=t, name=t) for t, c in OUT.items()}
    for task in OUT:
        assert all(torch.equal(p, q) for p, q in zip(first[task].state_dict().values(),
                                                      again[task].state_dict().values()))
    for a, b in (("D", "E"), ("N", "A")):  # their convolutions' kernels (batch norms start at ones and zeros)
        alike = [(p, q) for p, q in zip(first[a].parameters(), first[b].parameters()) if p.shape == q.shape
                 and p.dim() > 1]
        assert alike and not any(torch.equal(p, q) for p, q in alike), (a, b)
    config = smoke_config(tasks=tuple(OUT))
    heads = run_heads(config, build_tasks(list(config.tasks), num_classes=10), build_stages(config))
    assert not torch.equal(heads["N"].body[0].weight, heads["A"].body[0].weight)
    assert torch.equal(heads["N"].body[0].weight, compact.build_head(3, task="N", name="N").body[0].weight)
