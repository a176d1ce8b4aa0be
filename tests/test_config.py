"""Presets and run configuration."""
import dataclasses
from importlib import resources

import pytest

from mtsl_plugin.config import PRESETS, DataConfig, RunConfig, config_from_mapping, load_preset
from mtsl_plugin.learner.schedule import MTSLConfig, scale_schedule


def test_paper_preset_is_the_papers_schedule():
    config = load_preset("paper")
    assert config.mtsl.task_epochs == (2, 2, 2, 2, 4, 4, 8, 8, 8, 8)
    assert config.mtsl.amalgamation_epochs == (1, 1, 2, 2, 2, 2, 4, 4, 8, 8)
    assert config.mtsl.total_epochs == config.epochs == 80 and config.lr_steps == (60, 70)
    assert (config.data.height, config.data.width, config.batch_size) == (256, 512, 16)
    assert config.optimizer == {"optim": "adam", "lr": 1e-4, "weight_decay": 5e-5}
    assert (config.mtsl.threshold, config.mtsl.align_weight) == (0.8, 0.2)
    assert config.network == "authors"  # the authors' network; the CPU presets use the compact one


def test_network_choice():
    quick = load_preset("quick")
    assert quick.network == "compact"
    # as before the field existed (8fd4800): earlier results folders stay reusable
    assert load_preset("smoke").fingerprint() == "39784aaa2121"
    assert quick.replace(network="authors").fingerprint() != quick.fingerprint()
    assert quick.replace(losses="standard").fingerprint() == quick.fingerprint()  # the default: as before
    assert quick.replace(losses="authors").fingerprint() != quick.fingerprint()
    with pytest.raises(ValueError, match="unknown losses 'mine'; choose one of standard, authors"):
        quick.replace(losses="mine")
    with pytest.raises(ValueError, match="unknown network 'unet'; choose one of compact, authors"):
        quick.replace(network="unet")
    with pytest.raises(ValueError, match="encoder setting uses network 'compact'"):
        quick.replace(network="authors", setting="encoder")


@pytest.mark.parametrize("name, phases", [("smoke", 2), ("quick", 10)])
def test_smaller_presets_scale_the_schedule(name, phases):
    config = load_preset(name)
    assert config.mtsl.num_phases == phases and sum(config.mtsl.task_epochs) <= config.epochs
    assert config.mtsl.total_epochs == config.epochs


def test_scale_schedule_keeps_every_phase_at_least_one_epoch():
    scaled = scale_schedule(MTSLConfig(), 40)
    assert scaled.task_epochs == (1, 1, 1, 1, 2, 2, 4, 4, 4, 4) and scaled.total_epochs == 40
    assert all(e >= 1 for e in scale_schedule(MTSLConfig(), 3, 2).task_epochs)
    none = MTSLConfig(amalgamation_epochs=(0, 8) * 5)  # a phase that amalgamates for none keeps none
    assert scale_schedule(none, 20).amalgamation_epochs == (0, 2) * 5


def test_scale_schedule_keeps_the_papers_share_of_task_learning():
    """The phases end after 48/80 of the epochs (or one epoch per phase when that is more), not later because
    every short phase was rounded up; later phases stay at least as long as earlier ones."""
    assert scale_schedule(MTSLConfig(), 20, 10).task_epochs == (1, 1, 1, 1, 1, 1, 1, 1, 2, 2)
    assert scale_schedule(MTSLConfig(), 80, 10).task_epochs == MTSLConfig().task_epochs
    for total in range(3, 201):
        for phases in (2, 4, 6, 10):
            task = scale_schedule(MTSLConfig(), total, phases).task_epochs
            share = sum(MTSLConfig().task_epochs[:phases]) * total / 80
            assert sum(task) == max(phases, round(share)), (total, phases)
            assert min(task) >= 1 and list(task) == sorted(task), (total, phases)


def test_round_trip_and_errors():
    config = load_preset("quick")
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.fingerprint() == config.replace(device="cuda").fingerprint()
    assert config.fingerprint() != config.replace(seed=1).fingerprint()
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        load_preset("fast")
    with pytest.raises(ValueError, match="unknown configuration key"):
        RunConfig.from_dict({**config.to_dict(), "lr": 1})
    with pytest.raises(ValueError, match="unknown MTSL option"):
        MTSLConfig.from_dict({"gamma": 0.8})
    with pytest.raises(ValueError, match="the held-out slice needs at least 4 samples for the unbiased CKA"):
        config.replace(data=dataclasses.replace(config.data, holdout=3))
    with pytest.raises(ValueError, match="the phases need 3 task-learning epochs"):
        MTSLConfig(task_epochs=(1, 2), amalgamation_epochs=(1, 1), total_epochs=2)
    with pytest.raises(ValueError, match="mtsl.task_epochs starts with 0"):  # it would run after epoch 1
        MTSLConfig(task_epochs=(0, 2), amalgamation_epochs=(1, 1), total_epochs=2)
    assert MTSLConfig(task_epochs=(1, 0), amalgamation_epochs=(1, 1), total_epochs=2).phase_ends() == [1, 1]


def test_an_empty_backbone_args_keeps_the_fingerprint_of_runs_from_before_the_field():
    """The paper preset gives no backbone_args: its runs' fingerprint is the one of a configuration without the
    field (their results folders stay reusable); a non-empty one counts."""
    paper, smoke = load_preset("paper"), load_preset("smoke")
    assert paper.backbone_args == {} and smoke.backbone_args
    assert paper.fingerprint() == paper.fingerprint(exclude=("device", "backbone_args"))
    assert smoke.fingerprint() != smoke.fingerprint(exclude=("device", "backbone_args"))


def test_only_the_real_data_sets_augment_by_default_and_folder_data_only_when_asked():
    """A declared dense task's values may depend on scale or direction: folder data augments with augment: true
    only; NYUv2 and Cityscapes unless augment: false; synthetic data never."""
    assert not DataConfig().augments and not DataConfig(augment=True).augments
    assert DataConfig(name="nyuv2").augments and not DataConfig(name="nyuv2", augment=False).augments
    assert not DataConfig(name="folder").augments and DataConfig(name="folder", augment=True).augments


@pytest.mark.parametrize("raw, culprit", [
    ({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"), ({"epochs": 3.7}, "epochs"), ({"epochs": True}, "epochs"),
    ({"epochs": "three"}, "epochs"), ({"mtsl": {"phases": 0}}, "mtsl.phases"),
    ({"mtsl": {"phases": -2}}, "mtsl.phases"), ({"mtsl": {"phases": 12}}, "mtsl.phases"),
    ({"mtsl": {"threshold": "high"}}, "mtsl.threshold"), ({"mtsl": {"align_weight": -5}}, "mtsl.align_weight"),
    ({"mtsl": {"align": "false"}}, "mtsl.align"), ({"mtsl": {"total_epochs": "x"}}, "mtsl.total_epochs"),
    ({"mtsl": 3}, "mtsl"), ({"data": 3}, "data"), ({"data": {"test": 0}}, "data.test"),
    ({"data": {"test": None}}, "data.test"), ({"data": {"height": "x"}}, "data.height"),
    ({"data": {"augment": "no"}}, "data.augment"), ({"lr_steps": 5}, "lr_steps"), ({"lr_steps": [3]}, "lr_steps"),
    ({"lr_steps": [0]}, "lr_steps"), ({"epochs": 4, "lr_steps": [1, 4]}, "lr_steps"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -4}, "batch_size"), ({"tasks": 5}, "tasks"), ({"pretrained": "false"}, "pretrained"),
    ({"preset": "foo"}, "smoke, quick, paper"), ({"seed": 2**33}, "seed must be at most 2**32 - 1"),
])
def test_a_bad_value_is_refused_in_one_line_naming_its_key(raw, culprit):
    with pytest.raises(ValueError) as caught:
        config_from_mapping(raw, load_preset("smoke"))
    message = str(caught.value)
    assert culprit in message and len(message.splitlines()) == 1, message


def test_mtsl_never_trains_longer_than_the_references():
    """The smoke preset has 3 epochs: 5 phases of at least one epoch each would give MTSL 5 and STN 3."""
    with pytest.raises(ValueError, match="trains 5 task-learning epochs .* is 3;"):
        config_from_mapping({"mtsl": {"phases": 5}}, load_preset("smoke"))
    with pytest.raises(ValueError, match="trains 10 task-learning epochs .* is 3;"):
        config_from_mapping({"epochs": 3}, load_preset("quick"))
    assert config_from_mapping({"mtsl": {"phases": 3}}, load_preset("smoke")).mtsl.task_epochs == (1, 1, 1)
    assert config_from_mapping({"epochs": 10}, load_preset("quick")).mtsl.total_epochs == 10
    with pytest.raises(ValueError, match="num_phases"):
        scale_schedule(MTSLConfig(), 20, 12)
    # phases given by hand with the epochs: fine-tuning fills the epochs (the 10 scaled phases' total did not apply)
    short = config_from_mapping({"epochs": 2, "mtsl": {"task_epochs": [1], "amalgamation_epochs": [1]}},
                                load_preset("paper"))
    assert (short.epochs, short.mtsl.task_epochs, short.mtsl.total_epochs) == (2, (1,), 2)
    with pytest.raises(ValueError, match="trains 4 task-learning epochs .* is 2;"):
        config_from_mapping({"epochs": 2, "mtsl": {"task_epochs": [2, 2], "amalgamation_epochs": [1, 1]}},
                            load_preset("paper"))
    # nor shorter: MTSL would train less than the others and never reach their late learning-rate steps (a results
    # folder's config.yaml with only its epochs raised kept the old mtsl.total_epochs, without a word)
    with pytest.raises(ValueError, match=r"^mtsl.total_epochs \(50\) must equal epochs \(80\), the budget of"):
        config_from_mapping({"epochs": 80, "mtsl": {"total_epochs": 50}}, load_preset("paper"))
    saved = load_preset("quick").to_dict()
    with pytest.raises(ValueError, match=r"^mtsl.total_epochs \(40\) must equal epochs \(80\)"):
        config_from_mapping({**saved, "epochs": 80})
    saved["mtsl"].pop("total_epochs")
    assert config_from_mapping({**saved, "epochs": 80}).mtsl.total_epochs == 80


def test_a_mapping_that_gives_the_epochs_keeps_the_bases_number_of_phases():
    """The paper's schedule is scaled to the new epochs in the base's phases (the smoke preset's 2), not 10."""
    smoke = load_preset("smoke")
    config = config_from_mapping({"epochs": 20}, smoke)
    assert config.mtsl.num_phases == smoke.mtsl.num_phases == 2 and config.mtsl.total_epochs == 20


def test_a_mapping_that_gives_the_epochs_and_not_lr_steps_scales_the_bases_steps():
    """``epochs: 20`` over the quick preset (40 epochs, steps at 30 and 35) kept steps 30 and 35: the learning rate
    never decayed. They are scaled as the MTSL schedule is; a step on the last epoch or after it is dropped."""
    quick, smoke = load_preset("quick"), load_preset("smoke")
    assert config_from_mapping({"epochs": 20}, quick).lr_steps == (15, 18)  # 15 and 17.5, rounded half to even
    assert config_from_mapping({"epochs": 80}, quick).lr_steps == (60, 70)  # the paper's
    assert config_from_mapping({"epochs": 10}, smoke).lr_steps == (7,)  # 2 of 3 epochs
    assert config_from_mapping({"epochs": 2, "mtsl": {"phases": 1}}, smoke).lr_steps == (1,)  # round(4/3)
    assert config_from_mapping({"epochs": 1, "mtsl": {"phases": 1}}, smoke).lr_steps == ()  # 1 of 1: dropped
    assert config_from_mapping({"epochs": 20, "lr_steps": [5]}, quick).lr_steps == (5,)  # given: kept as given
    assert config_from_mapping({"batch_size": 8}, quick).lr_steps == (30, 35)


def test_every_shipped_preset_loads_with_its_schedule():
    files = sorted(p.stem for p in (resources.files("mtsl_plugin") / "presets").iterdir() if p.name.endswith(".yaml"))
    assert files == sorted(PRESETS)
    schedules = {name: (load_preset(name).mtsl.task_epochs, load_preset(name).mtsl.amalgamation_epochs)
                 for name in PRESETS}
    assert schedules == {"smoke": ((1, 1), (1, 1)), "quick": ((1,) * 10, (1,) * 10),
                         "paper": ((2, 2, 2, 2, 4, 4, 8, 8, 8, 8), (1, 1, 2, 2, 2, 2, 4, 4, 8, 8))}


def test_tasks_may_be_one_comma_separated_string_as_on_the_command_line():
    assert config_from_mapping({"tasks": "S, D"}, load_preset("smoke")).tasks == ("S", "D")
    assert config_from_mapping({"tasks": "SD"}, load_preset("smoke")).tasks == ("SD",)  # an unknown task: preflight
