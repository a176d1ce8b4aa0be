"""benchmarks/speed.py: step time and peak memory of plans, measured in one run, as ratios to the first."""
import json
from types import SimpleNamespace

import pytest

from benchmarks import speed
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import ResNetStages
from mtsl_plugin.plan import BranchingPlan


def test_speed_prints_one_row_per_plan_with_ratios_to_the_first(tmp_path, capsys):
    plan = tmp_path / "partial.json"
    plan.write_text(BranchingPlan.single_task(speed.TASKS, 10).merge(0, ["SDENA"]).to_json())
    assert speed.main(["--plans", f"stn,onenet,{plan}", "--batch", "4", "--height", "32", "--width", "32",
                       "--steps", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads(printed[-1])
    rows = report["rows"]  # plans with several nodes at a location are timed fused as well
    assert list(rows) == ["stn", "stn fused", "onenet", "partial.json", "partial.json fused"]
    assert all(r["seconds"] > 0 and r["peak_gib"] == 0 for r in rows.values())  # CPU: no CUDA peak
    assert rows["stn fused"]["params"] == rows["stn"]["params"]  # the same network, run another way
    table = {line[:24].strip(): line[24:].split() for line in printed[2:] if line[:24].strip() in rows}
    assert float(table["stn"][1]) == 1.0
    assert float(table["onenet"][1]) == round(rows["onenet"]["seconds"] / rows["stn"]["seconds"], 2)
    ratios = report["ratios"]
    assert set(ratios) == {"plain_over_trainer_onenet", "stn_over_onenet", "stn_fused_over_onenet",
                           "alignment_share_of_stn_step", "data_over_onenet_step",
                           "epoch_first_batch_over_onenet_step", "training_loop_over_onenet_step",
                           "onenet_channels_last_over_contiguous",
                           "stn_channels_last_over_contiguous"}
    assert all(v > 0 for k, v in ratios.items() if k != "alignment_share_of_stn_step")
    assert 0 <= ratios["alignment_share_of_stn_step"] < 1
    assert any(line.startswith("ratios (one run): plain_over_trainer_onenet") for line in printed)


def test_speed_refuses_an_unknown_plan_in_one_line(capsys):
    assert speed.main(["--plans", "stn,nowhere.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere.json" in err and len(err.splitlines()) == 1


def test_speed_refuses_a_plan_file_holding_no_plan_naming_it(tmp_path, capsys):
    flat = tmp_path / "flat.json"  # one nesting level too few: not read as STN's single-letter groups
    flat.write_text(json.dumps({"tasks": list("SDENA"), "partitions": [list("SDENA")] * 10}))
    assert speed.main(["--plans", f"stn,{flat}", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: plan '{flat}': location 0: a partition must be a list of "
                                               "groups, each a list of task names, got ['S', 'D', 'E', 'N', 'A']")


@pytest.mark.parametrize("argv, culprit", [
    (["--steps", "-1"], "--steps"), (["--batch", "2"], "--batch"), (["--height", "0"], "0x64"),
    (["--device", "cuda"], "no CUDA GPU"), (["--device", "tpux"], "tpux"), (["--plans", "six"], "6 locations"),
])
def test_speed_refuses_options_no_step_runs_with_in_one_line(tmp_path, capsys, argv, culprit):
    (tmp_path / "six").write_text(BranchingPlan.single_task(speed.TASKS, 6).to_json())
    argv = [a if a != "six" else str(tmp_path / "six") for a in argv]
    assert speed.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and culprit in err and len(err.splitlines()) == 1


def test_speed_reports_each_plans_size_and_gmac_without_timing(capsys):
    """``--steps 0``: the parameters and GMac of each plan on one image (the README's table of both networks),
    equal to the branched network's own cost count."""
    assert speed.main(["--network", "authors", "--height", "64", "--width", "128", "--steps", "0"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]
    stages = ResNetStages("resnet18", network="authors")
    for name, plan in (("stn", BranchingPlan.single_task(speed.TASKS, 10)),
                       ("onenet", BranchingPlan.one_net(speed.TASKS, 10))):
        heads = {t: stages.build_head(c, task=t) for t, c in zip(speed.TASKS, (10, 1, 1, 3, 3))}
        cost = BranchedNetwork(plan, stages, heads).cost(64, 128)
        assert rows[name]["params"] == cost.params and rows[name]["gmac"] == pytest.approx(cost.gmac)
    assert rows["onenet"]["params"] < rows["stn"]["params"] / 4


def test_plans_of_one_file_name_keep_a_row_each_and_a_plan_given_twice_is_refused(tmp_path, capsys):
    """Every run's plan is a plan.json: two of them gave one row, the later plan's (helper-64)."""
    for run, plan in (("a", BranchingPlan.one_net(speed.TASKS, 10)),
                      ("b", BranchingPlan.single_task(speed.TASKS, 10))):
        (tmp_path / run).mkdir()
        (tmp_path / run / "plan.json").write_text(plan.to_json())
    first, second = str(tmp_path / "a" / "plan.json"), str(tmp_path / "b" / "plan.json")
    assert speed.main(["--plans", f"onenet,{first},{second}", "--steps", "0"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]
    assert list(rows) == ["onenet", first, second] and rows[first] == rows["onenet"]
    assert rows[second]["params"] > rows[first]["params"]
    assert speed.main(["--plans", "stn,onenet,stn", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --plans: stn is given twice"


def test_timed_is_the_median_of_the_steps_after_two_warm_up_steps(monkeypatch):
    durations = iter([50.0, 40.0, 3.0, 1.0, 8.0])  # two slow warm-up steps, then the timed ones (mean 4, median 3)
    clock = [0.0]

    def step():
        clock[0] += next(durations)

    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert speed.timed(step, 3, "cpu") == (3.0, 0.0)
    assert next(durations, None) is None  # every step ran once


def test_each_ratio_divides_the_measurements_it_names(monkeypatch, capsys):
    """The ratios of one run, from measurements faked per plan and option (no step is timed here)."""
    seconds = {("onenet", ()): 1.0, ("stn", ()): 4.0, ("stn", ("fused",)): 2.0, ("stn", ("align",)): 5.0,
               ("onenet", ("channels_last",)): 0.8, ("stn", ("channels_last",)): 3.0}

    def measure(plan, device, batch, height, width, steps, stages, **options):
        name = "stn" if max(len(p) for p in plan.partitions) > 1 else "onenet"
        return seconds[name, tuple(k for k, on in options.items() if on)], 0.0, SimpleNamespace(params=1e6, gmac=1.0)

    monkeypatch.setattr(speed, "measure", measure)
    monkeypatch.setattr(speed, "measure_plain", lambda *args: 0.5)
    monkeypatch.setattr(speed, "timing_data", lambda *args: (SimpleNamespace(workers=0), 10))
    monkeypatch.setattr(speed, "measure_data", lambda data, steps: (0.25, 2.0))  # a batch, an epoch's first batch
    monkeypatch.setattr(speed, "measure_loop", lambda *args: 1.5)
    assert speed.main(["--steps", "1"]) == 0
    ratios = json.loads(capsys.readouterr().out.splitlines()[-1])["ratios"]
    assert ratios == pytest.approx({
        "plain_over_trainer_onenet": 0.5 / 1.0, "stn_over_onenet": 4.0 / 1.0, "stn_fused_over_onenet": 2.0 / 1.0,
        "alignment_share_of_stn_step": (5.0 - 4.0) / 5.0, "data_over_onenet_step": 0.25 / 1.0,
        "epoch_first_batch_over_onenet_step": 2.0 / 1.0, "training_loop_over_onenet_step": 1.5 / 1.0,
        "onenet_channels_last_over_contiguous": 0.8 / 1.0, "stn_channels_last_over_contiguous": 3.0 / 4.0})


def test_the_loop_time_is_the_second_epochs_per_step(monkeypatch):
    """The first of the two epochs warms up (the loader's workers start): only the second is timed."""
    class Trainer:
        def fit(self, data, epochs, progress):
            self.history = [{"seconds": 30.0}, {"seconds": 6.0}][:epochs]

    monkeypatch.setattr(speed, "build", lambda *args, **kwargs: Trainer())
    data = SimpleNamespace(train=None, batches=lambda dataset, key: [0, 1, 2])  # three steps an epoch
    assert speed.measure_loop(BranchingPlan.one_net(speed.TASKS, 10), data, 10, "cpu", None) == 6.0 / 3
