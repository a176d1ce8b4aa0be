"""MTSL through LibMTL's own calls: a script shaped like LibMTL's ``examples/nyu/main.py`` on the tiny NYUv2
fixture, with a timm ResNet factory as ``encoder_class`` and LibMTL-style (one-tensor) decoders."""
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mtsl_plugin
from mtsl_plugin.data.real import NYUv2
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.tasks import build_tasks, libmtl_task_dict


class Watched(Dataset):
    """A dataset that records the trainer's finished epochs at every access."""

    def __init__(self, dataset, trainer_box):
        self.dataset, self.box, self.seen = dataset, trainer_box, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.seen.append(self.box[0].epochs_done if self.box else None)
        return self.dataset[i]


def nyu_script(root, save_path, epochs=3, **trainer_kwargs):
    """What a LibMTL user writes (cf. LibMTL's examples/nyu/main.py), with MTSL as the architecture."""
    train_set = NYUv2(root, "train")
    test_box = []
    test_set = Watched(NYUv2(root, "test"), test_box)
    train_loader = DataLoader(train_set, batch_size=8, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=8, shuffle=False)

    task_dict = libmtl_task_dict(build_tasks(["S", "D", "N"], num_classes=13))

    def encoder_class():
        return timm.create_model("resnet18", channels=(16, 32, 64, 128), num_classes=0)

    out_channels = {"S": 13, "D": 1, "N": 3}
    decoders = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, c, 1))
                              for t, c in out_channels.items()})
    kwargs = {"weight_args": {}, "arch_args": {"mtsl": {"task_epochs": (1, 1), "amalgamation_epochs": (1, 1),
                                                        "total_epochs": epochs, "threshold": 0.0}}}
    trainer = mtsl_plugin.Trainer(task_dict=task_dict, weighting="EW", architecture="MTSL",
                                  encoder_class=encoder_class, decoders=decoders, rep_grad=False, multi_input=False,
                                  optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 1e-5},
                                  scheduler_param=None, save_path=save_path, device="cpu", **kwargs, **trainer_kwargs)
    test_box.append(trainer)
    return trainer, train_loader, test_loader, test_set


def test_a_libmtl_script_runs_mtsl_and_the_plan_changes(nyuv2_root, tmp_path):
    trainer, train_loader, test_loader, test_set = nyu_script(nyuv2_root, tmp_path / "run")
    start = trainer.model.plan
    assert start == BranchingPlan.single_task(["S", "D", "N"], 10)
    results = trainer.train(train_loader, test_loader, 3, progress=False)
    assert trainer.learner.phases_done == 2 and trainer.epochs_done == 3
    plan = trainer.model.plan
    assert plan == BranchingPlan("SDN", [[["S", "D", "N"]]] * 2 + [[["S"], ["D"], ["N"]]] * 8)  # γ = 0: merged twice
    assert set(results["test"]) == {"S", "D", "N"} and all(map(torch.isfinite, map(torch.tensor, results["test"].values())))
    assert test_set.seen and set(test_set.seen) == {3}  # the test split is read after training only
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert trainer.test(test_loader) == results["test"]

    # a new Trainer on the same folder continues from its checkpoint: the learned plan, nothing left to train
    again, train_loader, test_loader, _ = nyu_script(nyuv2_root, tmp_path / "run")
    assert again.model.plan == plan and again.epochs_done == 3
    assert again.train(train_loader, test_loader, 3, progress=False)["test"] == results["test"]


def test_a_libmtl_script_with_too_few_epochs_for_the_phases_is_refused(nyuv2_root, tmp_path):
    trainer, train_loader, test_loader, _ = nyu_script(nyuv2_root, tmp_path / "run")
    with pytest.raises(ValueError, match="phases end after 2 task-learning epochs .* given 1 epochs"):
        trainer.train(train_loader, test_loader, 1, progress=False)
    for epochs in (0, 2.5):  # before any scaling of the schedule or training
        with pytest.raises(ValueError, match=f"epochs must be an integer >= 1, got {epochs}"):
            trainer.train(train_loader, test_loader, epochs, progress=False)
    assert trainer.epochs_done == 0


def test_libmtl_heads_and_timm_encoders_are_adapted():
    head = mtsl_plugin.libmtl_trainer.as_head(nn.Conv2d(8, 2, 1))
    out = head([torch.randn(1, 4, 5, 5), torch.randn(1, 8, 6, 7)], (12, 14))
    assert out.shape == (1, 2, 12, 14)  # the last location's output, upsampled to the input size
    stages = mtsl_plugin.libmtl_trainer.as_stages(lambda: timm.create_model("resnet18", num_classes=0))
    assert stages.num_locations == 10 and stages.specs[4].out_channels == 512
    with pytest.raises(ValueError, match="encoder_class must return"):
        mtsl_plugin.libmtl_trainer.as_stages(lambda: "resnet18")


@pytest.mark.parametrize("name, locations", [("convnext_atto", 8), ("mobilenetv3_small_050", 10)])
def test_a_timm_cnn_built_by_the_user_is_cut_into_its_feature_stages(name, locations):
    """A non-ResNet timm model from LibMTL's ``encoder_class`` (no features_only): its own weights, its feature
    stages as locations; running them in turn gives the model's own ``forward_features``."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    stages = mtsl_plugin.libmtl_trainer.as_stages(lambda: model)
    assert stages.num_locations == locations and stages.feature_locations == tuple(range(locations // 2))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = x
        for location in stages.feature_locations:
            out = stages.build(location).eval()(out)
        torch.testing.assert_close(out, model.forward_features(x))
    with pytest.raises(ValueError, match="takes network 'compact'"):
        mtsl_plugin.libmtl_trainer.as_stages(lambda: model, network="authors")
    with pytest.raises(ValueError, match="not a timm model"):
        mtsl_plugin.libmtl_trainer.as_stages(lambda: nn.Conv2d(3, 8, 3))


def test_libmtl_own_architectures_run_as_libmtl_builds_them(nyuv2_root):
    """HPS gets the user's encoder and decoders untouched (as LibMTL's Trainer passes them) and trains in our loop."""
    train_loader = DataLoader(NYUv2(nyuv2_root, "train"), batch_size=8, shuffle=True, drop_last=True)
    test_loader = DataLoader(NYUv2(nyuv2_root, "test"), batch_size=8)
    task_dict = libmtl_task_dict(build_tasks(["S", "D"], num_classes=13))
    decoders = nn.ModuleDict({"S": nn.Conv2d(8, 13, 1), "D": nn.Conv2d(8, 1, 1)})
    trainer = mtsl_plugin.Trainer(task_dict=task_dict, weighting="EW", architecture="HPS",
                                  encoder_class=lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
                                  decoders=decoders, optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 0},
                                  device="cpu", weight_args={}, arch_args={})
    assert trainer.learner is None and trainer.model.decoders["S"] is decoders["S"]
    results = trainer.train(train_loader, test_loader, 1, progress=False)
    assert trainer.epochs_done == 1 and set(results["test"]) == {"S", "D"}
    with pytest.raises(ValueError, match="arch_args\\['mtsl'\\] is for the MTSL architecture"):
        mtsl_plugin.Trainer(task_dict=task_dict, weighting="EW", architecture="HPS", encoder_class=lambda: nn.Identity(),
                            decoders=decoders, device="cpu", weight_args={}, arch_args={"mtsl": {}})
