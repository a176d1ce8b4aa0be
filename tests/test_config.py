"""Presets and run configuration."""
import pytest

from mtsl_plugin.config import RunConfig, load_preset
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
    with pytest.raises(ValueError, match="the phases need 3 task-learning epochs"):
        MTSLConfig(task_epochs=(1, 2), amalgamation_epochs=(1, 1), total_epochs=2)
