"""MTSL through LibMTL's own calls: a script shaped like LibMTL's ``examples/nyu/main.py`` on the tiny NYUv2
fixture, with a timm ResNet factory as ``encoder_class`` and LibMTL-style (one-tensor) decoders."""
import random

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mtsl_plugin
from mtsl_plugin.data.real import NYUv2
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.libmtl_adapters import as_head, as_stages
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
    # the test split is evaluated after training only; before it, its first sample's targets are checked
    assert test_set.seen[0] == 0 and set(test_set.seen[1:]) == {3} and len(test_set.seen) == len(test_set) + 1
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
    head = as_head(nn.Conv2d(8, 2, 1))
    out = head([torch.randn(1, 4, 5, 5), torch.randn(1, 8, 6, 7)], (12, 14))
    assert out.shape == (1, 2, 12, 14)  # the last location's output, upsampled to the input size
    calls = []
    stages = as_stages(lambda: calls.append(1) or timm.create_model("resnet18", num_classes=0))
    assert stages.num_locations == 10 and stages.specs[4].out_channels == 512
    other = stages.redrawn(3)  # as LibMTL builds another task's encoder: encoder_class() called again
    assert len(calls) == 2 and other.seed == 3 and not torch.equal(other.build(1)[1][0].conv1.weight,
                                                                   stages.build(1)[1][0].conv1.weight)
    with pytest.raises(ValueError, match="encoder_class must return"):
        as_stages(lambda: "resnet18")


@pytest.mark.parametrize("name, locations", [("convnext_atto", 8), ("mobilenetv3_small_050", 10)])
def test_a_timm_cnn_built_by_the_user_is_cut_into_its_feature_stages(name, locations):
    """A non-ResNet timm model from LibMTL's ``encoder_class`` (no features_only): its own weights, its feature
    stages as locations; running them in turn gives the model's own ``forward_features``."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    stages = as_stages(lambda: model)
    assert stages.num_locations == locations and stages.feature_locations == tuple(range(locations // 2))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = x
        for location in stages.feature_locations:
            out = stages.build(location).eval()(out)
        torch.testing.assert_close(out, model.forward_features(x))
    with pytest.raises(ValueError, match="takes network 'compact'"):
        as_stages(lambda: model, network="authors")
    with pytest.raises(ValueError, match="not a timm model"):
        as_stages(lambda: nn.Conv2d(3, 8, 3))


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


def test_a_users_own_weighting_method_and_a_subclass_of_libmtls_train(tiny_nyuv2):
    """LibMTL's Trainer takes any subclass of AbsWeighting and passes weight_args on: a user's own method was
    refused as an "unknown LibMTL weighting", its hyperparameters as ones LibMTL's method of its name lacks, and a
    subclass of MGDA failed at its first step without MGDA's defaults (KeyError 'mgda_gn'). A learner argument,
    which the Trainer makes itself, is one line, not a TypeError."""
    libmtl = import_libmtl()
    seen = []

    class Scaled(libmtl.weighting.AbsWeighting):
        def backward(self, losses, **kwargs):
            seen.append(kwargs["scale"])
            (kwargs["scale"] * losses).sum().backward()
            return np.ones(len(losses))

    class MyMGDA(libmtl.weighting.MGDA):
        pass

    for weighting, weight_args in ((Scaled, {"scale": 2.0}), (MyMGDA, {})):
        trainer = tiny_trainer(weight_args=weight_args, weighting=weighting, architecture="HPS",
                               encoder_class=lambda: nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()))
        trainer.train(*loaders(tiny_nyuv2), 1, progress=False)
        assert trainer.epochs_done == 1
    assert seen == [2.0, 2.0] and trainer.kwargs["weight_args"] == {"mgda_gn": "none"}  # MGDA's default
    with pytest.raises(ValueError, match="neither a LibMTL weighting method nor a subclass of LibMTL's AbsWeighting"):
        tiny_trainer(weighting=object, architecture="HPS")
    with pytest.raises(ValueError, match=r"^Trainer got unexpected keyword argument\(s\) \['learner'\]"):
        tiny_trainer(learner=None)


# ---------------------------------------------------------------- resume, loaders and arguments of a LibMTL script
def tiny_encoder():
    return timm.create_model("resnet18", channels=(4, 8, 8, 8), num_classes=0)


def tiny_trainer(save_path=None, tasks=("S", "D"), mtsl=None, encoder_class=tiny_encoder, seed=0, weighting="EW",
                 architecture="MTSL", weight_args=None, learner=..., **kwargs):
    """A LibMTL-script Trainer over a quarter-width-of-a-quarter ResNet18 (seconds for the paper's ten phases),
    built after the script's ``torch.manual_seed(seed)``; ``kwargs`` are MTSL's ``arch_args``."""
    torch.manual_seed(seed)
    channels = {"S": 13, "D": 1, "N": 3}
    decoders = nn.ModuleDict({t: nn.Conv2d(64, channels[t], 1) for t in tasks})
    mtsl_args = {"mtsl": {"threshold": 0.5} if mtsl is None else mtsl, **kwargs} if architecture == "MTSL" else {}
    return mtsl_plugin.Trainer(task_dict=libmtl_task_dict(build_tasks(list(tasks), num_classes=13)),
                               weighting=weighting, architecture=architecture, encoder_class=encoder_class,
                               decoders=decoders, optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 0},
                               save_path=save_path, device="cpu", weight_args=weight_args or {}, arch_args=mtsl_args,
                               **({} if learner is ... else {"learner": learner}))


def test_an_exact_grouping_solver_is_refused_for_seventeen_tasks_when_the_trainer_is_built():
    """The grouping solver is tried on the trainer's tasks when it is built: the exact default refuses 17 tasks in
    one line naming the local-search solvers, which take them."""
    entry = libmtl_task_dict(build_tasks(["D"], num_classes=13))["D"]
    task_dict = {f"d{i}": entry for i in range(17)}

    def trainer(mtsl):
        return mtsl_plugin.Trainer(task_dict=task_dict, weighting="EW", architecture="MTSL",
                                   encoder_class=tiny_encoder, decoders={t: nn.Conv2d(64, 1, 1) for t in task_dict},
                                   device="cpu", weight_args={}, arch_args={"mtsl": mtsl})

    with pytest.raises(ValueError, match=r"^Exact grouping supports at most 16 tasks .* got 17; .*authors_local"):
        trainer({})
    assert trainer({"grouping": "authors_local"}).learner.config.grouping == "authors_local"


@pytest.fixture
def tiny_nyuv2(tmp_path):
    from conftest import write_nyuv2
    return write_nyuv2(tmp_path / "nyuv2", n_train=8, n_val=8, size=(16, 16))


def loaders(root, **train_args):
    train = DataLoader(NYUv2(root, "train"), **{"batch_size": 4, "shuffle": True, "drop_last": True, **train_args})
    return train, DataLoader(NYUv2(root, "test"), batch_size=8)


def test_a_resumed_trainer_keeps_the_schedule_scaled_to_its_epochs(tiny_nyuv2, tmp_path):
    """No task_epochs: the paper's ten phases scaled to train(epochs=10), one per epoch. Interrupted after four
    phases, a new Trainer on the same save_path continues that schedule (not the unscaled 80-epoch one) and ends
    bit-exactly where the uninterrupted run ends."""
    straight = tiny_trainer()
    expected = straight.train(*loaders(tiny_nyuv2), 10, progress=False)
    assert straight.learner.config.task_epochs == (1,) * 10 and straight.learner.phases_done == 10

    first = tiny_trainer(tmp_path / "run")
    step = first.queue_step

    def interrupted(*args):
        if first.epochs_done == 4:
            raise KeyboardInterrupt  # Ctrl-C in the fifth epoch: the checkpoint holds four epochs and phases
        return step(*args)

    first.queue_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.train(*loaders(tiny_nyuv2), 10, progress=False)
    torch.manual_seed(1234)  # another process: the checkpoint restores the RNG
    resumed = tiny_trainer(tmp_path / "run")
    assert (resumed.epochs_done, resumed.learner.phases_done) == (4, 4)
    assert resumed.learner.config.task_epochs == (1,) * 10  # the schedule the run started with, before train()
    with pytest.raises(ValueError, match=r"scaled MTSL's schedule to train\(epochs=10\) and 4 of its 10 phases are "
                                         r"done: continue it with epochs=10"):
        resumed.train(*loaders(tiny_nyuv2), 12, progress=False)
    results = resumed.train(*loaders(tiny_nyuv2), 10, progress=False)
    assert results == expected and resumed.model.plan == straight.model.plan
    assert [r.merged for r in resumed.learner.records] == [r.merged for r in straight.learner.records]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_scaled_schedule_needs_an_epoch_per_phase(tiny_nyuv2):
    trainer = tiny_trainer()
    with pytest.raises(ValueError, match=r"phases end after 10 task-learning epochs \(the paper's schedule scaled to "
                                         r"5 epochs.*given 5 epochs; train for at least 10 epochs or give "
                                         r"arch_args\['mtsl'\] task_epochs"):
        trainer.train(*loaders(tiny_nyuv2), 5, progress=False)
    trainer.set_schedule(20)  # a refused call fixes nothing: the next one scales the paper's schedule afresh
    assert trainer.learner.config.phase_ends()[-1] == 12 and trainer.learner.config.total_epochs == 20
    assert trainer.learner.config.amalgamation_epochs == (1,) * 8 + (2, 2)  # 1,1,2,2,2,2,4,4,8,8 scaled


def test_amalgamation_epochs_the_options_give_are_kept_when_the_schedule_is_scaled():
    """As a configuration file's: only what the options leave out is scaled (they were scaled too: 8 became 2)."""
    for given in ((0,) * 10, (8,) * 10):
        trainer = tiny_trainer(mtsl={"amalgamation_epochs": given})
        trainer.set_schedule(20)
        assert trainer.learner.config.amalgamation_epochs == given
        assert trainer.learner.config.task_epochs == (1,) * 8 + (2, 2)


class Without(Dataset):
    """A dataset whose samples lack the targets of ``tasks``, or the first ``n`` samples of one."""

    def __init__(self, dataset, tasks=(), n=None):
        self.dataset, self.tasks, self.n = dataset, tasks, n

    def __len__(self):
        return len(self.dataset) if self.n is None else self.n

    def __getitem__(self, i):
        image, targets = self.dataset[i]
        return image, {t: v for t, v in targets.items() if t not in self.tasks}


@pytest.mark.parametrize("case, message", [
    ("train without N", r"^train_dataloaders has no target for task\(s\) \['N'\] of the task dict \(its samples hold "
                        r"\['S', 'D', 'E', 'A'\]\)$"),
    ("test without N", r"^test_dataloaders has no target for task\(s\) \['N'\]"),
    ("val without N", r"^val_dataloaders has no target for task\(s\) \['N'\]"),
    ("val of 3", r"^val_dataloaders holds 3 sample\(s\), but MTSL measures task similarity \(CKA\) on them and needs "
                 r"at least 4$"),
    ("train of 3", r"^train_dataloaders holds 3 sample\(s\), but MTSL measures task similarity \(CKA\) on the "
                   r"training set \(no val_dataloaders given\)"),
    ("last batch of 3", r"^train_dataloaders yields a batch of 3 sample\(s\) \(7 samples, batch_size 4, "
                        r"drop_last=False\), but MTSL's alignment loss .* use drop_last=True"),
    ("no batch", r"^train_dataloaders yields no batch: 6 samples, batch_size 8 and drop_last=True$"),
    ("empty test", r"^test_dataloaders holds no samples$"),
])
def test_loaders_that_do_not_fit_the_task_dict_or_mtsl_are_refused_before_training(tiny_nyuv2, case, message):
    train, test = NYUv2(tiny_nyuv2, "train"), NYUv2(tiny_nyuv2, "test")
    args = {"train without N": (Without(train, "N"), test, 8, None),
            "test without N": (train, Without(test, "N"), 8, None),
            "val without N": (train, test, 8, Without(test, "N")),
            "val of 3": (train, test, 8, Without(test, n=3)),
            "train of 3": (Without(train, n=3), test, 8, None),
            "last batch of 3": (Without(train, n=7), test, 4, None),
            "no batch": (Without(train, n=6), test, 8, None),
            "empty test": (train, Without(test, n=0), 8, None)}[case]
    trainer = tiny_trainer(tasks=("S", "D", "N"), mtsl={"task_epochs": (1, 1), "amalgamation_epochs": (1, 1),
                                                        "total_epochs": 2})
    train_set, test_set, batch, val_set = args
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=case == "no batch")
    val_loader = DataLoader(val_set, batch_size=8) if val_set is not None else None
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=message):
        trainer.train(train_loader, DataLoader(test_set, batch_size=8), 2, val_dataloaders=val_loader, progress=False)
    assert trainer.epochs_done == 0 and torch.equal(torch.get_rng_state(), state)


def test_a_bad_file_of_a_package_data_set_is_named_before_training(tiny_nyuv2):
    """A loader over NYUv2 (as LibMTL's example builds it) has every file read before the first step, as
    compare.py reads its data: the last training sample's label (class 20 of 13) is named before any training,
    not when the epoch reaches it; the global RNGs and the data set's augmentation flag are as they were."""
    import numpy as np

    np.save(tiny_nyuv2 / "train" / "label" / "7.npy", np.full((16, 16), 20, dtype=np.float32))
    train = NYUv2(tiny_nyuv2, "train", augment=True)
    trainer = tiny_trainer(mtsl={"task_epochs": (1, 1), "amalgamation_epochs": (1, 1), "total_epochs": 2})
    state, weights = torch.get_rng_state(), {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"label[/\\]7\.npy holds class 20"):
        trainer.train(DataLoader(train, batch_size=4, shuffle=True, drop_last=True),
                      DataLoader(NYUv2(tiny_nyuv2, "test"), batch_size=8), 2, progress=False)
    assert torch.equal(torch.get_rng_state(), state) and train.augment
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())  # no step was taken


def test_a_data_set_given_as_test_and_val_loader_is_read_through_once(tiny_nyuv2):
    """LibMTL scripts often pass the test loader as val_dataloaders too: its files are read once before training."""
    class Counted(NYUv2):
        reads = 0

        def __getitem__(self, item):
            Counted.reads += 1
            return super().__getitem__(item)

    test = DataLoader(Counted(tiny_nyuv2, "test"), batch_size=8)
    trainer = tiny_trainer(mtsl={"task_epochs": (1, 1), "amalgamation_epochs": (1, 1), "total_epochs": 2})
    trainer.check_loaders(loaders(tiny_nyuv2)[0], test, test, progress=False)
    assert Counted.reads == 2 + len(test.dataset)  # each loader's first sample, then every sample once


def test_a_save_path_holding_another_run_is_named(tiny_nyuv2, tmp_path):
    """A stale save_path: its checkpoint (of other tasks, or of another encoder) is named, with the way out."""
    tiny_trainer(tasks=("S", "D", "N")).save(tmp_path / "old" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"^save_path's checkpoint .*old/checkpoint.pt \(an unfinished run, which a "
                                         r"Trainer on that save_path resumes\) holds a network of tasks \['S', 'D', "
                                         r"'N'\], not this trainer's \['S', 'D'\]: choose another save_path"):
        tiny_trainer(tmp_path / "old")
    tiny_trainer(tasks=("S", "D")).save(tmp_path / "wider" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"^save_path's checkpoint .*wider/checkpoint.pt .* does not fit this trainer "
                                         r"\(Error\(s\) in loading state_dict for MTLmodel: size mismatch .*\): "
                                         r"choose another save_path"):
        tiny_trainer(tmp_path / "wider",
                     encoder_class=lambda: timm.create_model("resnet18", channels=(8, 8, 8, 8), num_classes=0))
    tiny_trainer(encoder_class=lambda: timm.create_model("convnext_atto", dims=(8, 8, 8, 8), depths=(1, 1, 1, 1),
                                                         num_classes=0)).save(tmp_path / "convnext" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"^save_path's checkpoint .*convnext/checkpoint.pt .* holds a network of 8 "
                                         r"merge locations, not the 10 of this trainer's encoder: choose another "
                                         r"save_path to start afresh$"):
        tiny_trainer(tmp_path / "convnext")


def test_an_encoder_instance_or_a_plan_dict_as_arguments():
    for encoder in (tiny_encoder(), "resnet18"):
        with pytest.raises(ValueError, match=r"^encoder_class must be a callable returning the encoder \(a class, or "
                                             r"e\.g\. lambda: timm.create_model\('resnet18'\)\), not a (ResNet|str) "
                                             r"instance$"):
            tiny_trainer(encoder_class=encoder)
    plan = BranchingPlan("SD", [[["S", "D"]]] * 3 + [[["S"], ["D"]]] * 7)
    assert tiny_trainer(plan=plan.to_dict()).model.plan == plan  # the dict form, as plan.json holds it
    with pytest.raises(ValueError, match=r"^arch_args\['plan'\] must be a BranchingPlan or its dict form .* got a "
                                         r"list$"):
        tiny_trainer(plan=[["S", "D"]] * 10)


def test_a_libmtl_linear_decoder_reads_the_last_location_average_pooled():
    """A decoder whose first layer is an ``nn.Linear`` reads the last head location's output averaged over its
    pixels, ``(N, C)``, and its prediction is returned as it is (no upsampling of a non-dense output)."""
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2))
    head = as_head(decoder)
    last = torch.randn(2, 8, 3, 5)
    out = head([torch.randn(2, 4, 6, 6), last], (12, 20))
    torch.testing.assert_close(out, decoder(last.sum(dim=(2, 3)) / 15))


def test_a_save_path_another_process_trains_in_is_refused_before_any_step(tiny_nyuv2, tmp_path):
    from conftest import other_process
    from mtsl_plugin.folder_lock import FolderBusy

    trainer = tiny_trainer(tmp_path / "run")
    with other_process(tmp_path / "run") as other:
        with pytest.raises(FolderBusy, match=rf"run is in use by process {other.pid} on "):
            trainer.train(*loaders(tiny_nyuv2), 10, progress=False)
    assert trainer.epochs_done == 0 and sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_a_trainer_built_before_another_finished_in_its_save_path_refuses_to_train_over_it(tiny_nyuv2, tmp_path):
    """Whether a Trainer resumes is decided when it is built; one built before another Trainer trained in the same
    save_path would train from its stale start over the other's checkpoint and model.pt, so it is refused. A
    Trainer's own checkpoints do not count, and the ``*.tmp`` files a killed write left go when a Trainer trains."""
    mtsl = {"task_epochs": (1,), "amalgamation_epochs": (1,), "total_epochs": 1}
    first, second = (tiny_trainer(tmp_path / "run", mtsl=mtsl) for _ in range(2))  # neither sees a checkpoint
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt.deadbeef.tmp").write_bytes(b"cut short")
    second.train(*loaders(tiny_nyuv2), 1, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "checkpoint.pt", "model.pt"]
    written = {name: (tmp_path / "run" / name).read_bytes() for name in ("checkpoint.pt", "model.pt")}
    with pytest.raises(ValueError, match=r"checkpoint.pt changed after this Trainer was built \(another process "
                                         r"trained in .*run\); it is kept: build a new Trainer to continue from it$"):
        first.train(*loaders(tiny_nyuv2), 1, progress=False)
    assert all((tmp_path / "run" / name).read_bytes() == data for name, data in written.items())
    second.train(*loaders(tiny_nyuv2), 1, progress=False)  # the Trainer that wrote it goes on


def test_the_batches_the_trainer_draws_follow_the_scripts_seed(tiny_nyuv2, monkeypatch):
    """Amalgamation batches (and BMTAS's split) are drawn by the Trainer, not by the script's loaders: their order
    follows the seed the script gave torch (``set_random_seed``), as the loaders' own shuffling does, so runs of
    two seeds differ there too (they were drawn from seed 0 in every run)."""
    orders = {}

    def recording_fit(self, data, *args, **kwargs):  # what the run would amalgamate on in its first phase
        orders[seed] = [images for images, _ in data.batches(data.train, key=(1, 0))]
        raise KeyboardInterrupt

    monkeypatch.setattr(mtsl_plugin.Trainer, "fit", recording_fit)
    for seed in (0, 1):
        trainer = tiny_trainer(seed=seed)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(*loaders(tiny_nyuv2, shuffle=False), 10, progress=False)
    assert len(orders[0]) == len(orders[1]) == 2
    assert not all(torch.equal(a, b) for a, b in zip(orders[0], orders[1]))


def test_the_layers_a_trainer_adds_to_a_timm_encoder_follow_the_scripts_seed():
    """The compact decoder added to a timm ResNet (locations 5-9) starts from the script's seed, as the encoder
    does: two seeds, two starts (it was drawn from seed 0 whatever the script set); one seed, one start."""
    def decoder(seed):
        network = tiny_trainer(seed=seed).network
        return [p.detach().clone() for location in range(5, 10) for p in network.node(location, ("S",)).parameters()]

    first, again, other = decoder(1), decoder(1), decoder(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other) if a.dim() > 1)  # convolutions


def test_the_trainers_checks_of_mtsl_leave_the_scripts_random_streams_alone():
    """Building a Trainer checks MTSL's plugins (an amalgamator is built and run on a probe); the script's seeded
    streams (torch, numpy, Python) stay where they were, so its loaders shuffle as they would without the check."""
    from mtsl_plugin.libmtl_trainer import TrainerLearner

    def draws_after(build):
        torch.manual_seed(3), np.random.seed(3), random.seed(3)
        build()
        return torch.rand(4), np.random.rand(2), random.random()

    expected = draws_after(lambda: None)
    got = draws_after(lambda: TrainerLearner.from_options({"amalgamator": "att"}, ("S", "D")))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
