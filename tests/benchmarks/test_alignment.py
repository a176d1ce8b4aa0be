"""benchmarks/alignment.py: how hard the alignment loss pulls the task nodes of one location together."""
import copy
import dataclasses
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from benchmarks import alignment
from mtsl_plugin.data.run_data import RunData
from mtsl_plugin.experiment import build_data, build_run_tasks, build_stages, build_trainer, seed_everything
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plugins.builtin_similarity import linear_cka
from tests.conftest import smoke_config


def test_prefix_plan_shares_the_locations_before_and_splits_from_the_probed_one():
    plan = alignment.prefix_plan(("S", "D", "E"), 4, 10)
    assert plan.siblings() == [(4, ("S", "D", "E"))]
    assert plan.describe() == "0-3: SDE | 4-9: S D E"
    assert alignment.prefix_plan(("S", "D"), 0, 10).describe() == "0-9: S D"


def test_effective_dimension_counts_the_directions_that_carry_the_variance():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q
    coords = torch.linalg.qr(torch.randn(64, 8, generator=g)).Q  # orthonormal, centred below
    coords = coords - coords.mean(0)
    assert alignment.effective_dimension(coords[:, :1] @ basis[:1] + 5.0) == pytest.approx(1.0)
    equal = torch.linalg.qr(coords).Q[:, :3] @ basis[:3]  # three orthogonal directions of equal variance
    assert alignment.effective_dimension(equal) == pytest.approx(3.0, rel=1e-4)
    assert 1.0 < alignment.effective_dimension(torch.randn(64, 8, generator=g) * torch.tensor([10.0] + [1.0] * 7)) < 3


def test_two_nodes_alike_in_one_dominant_direction_only_are_told_apart_without_it():
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(200, 1, generator=g)
    x = torch.cat([10 * shared, torch.randn(200, 7, generator=g)], dim=1)
    y = torch.cat([torch.randn(200, 7, generator=g), 10 * shared], dim=1)
    assert float(linear_cka(x, y)) > 0.9  # linear CKA is carried by the shared direction's variance
    bare = [alignment.without_top_direction(f) for f in (x, y)]
    assert float(linear_cka(*bare)) < 0.1
    assert torch.allclose(bare[0].mean(0), torch.zeros(8), atol=1e-5)
    assert bare[0][:, 0].std() < 0.1 * x[:, 0].std()  # the dominant channel is gone (up to its chance overlaps)


def test_pair_summary_is_over_the_pairs_of_distinct_nodes():
    matrix = np.array([[1.0, 0.2, 0.5], [0.2, 1.0, 0.8], [0.5, 0.8, 1.0]])  # a node's CKA with itself is 1
    assert alignment.pair_summary(matrix) == pytest.approx({"mean": (0.2 + 0.5 + 0.8) / 3, "min": 0.2})


def test_heldout_losses_are_each_tasks_mean_over_the_batches():
    """Per task, the mean of the held-out batches' losses (a stand-in trainer whose loss is the batch's mean
    target: batches of samples 0-3, 4-7 and 8-9)."""
    class Targets(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.zeros(3, 2, 2), {"S": torch.tensor(float(index)), "D": torch.tensor(2.0 * index)}

    class Model(torch.nn.Module):
        def forward(self, images):
            return {}

    trainer = SimpleNamespace(model=Model(), task_name=["S", "D"], device="cpu", images_to_device=lambda x: x,
                              task_losses=lambda preds, gts: torch.stack([gts["S"].mean(), gts["D"].mean()]))
    data = RunData(train=None, holdout=Targets(), test=None, batch_size=4)
    batch_means = [sum(b) / len(b) for b in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9])]
    expected = sum(batch_means) / 3
    assert alignment.heldout_losses(trainer, data) == pytest.approx({"S": expected, "D": 2 * expected})


def test_gradient_ratio_is_the_alignment_gradient_over_the_task_gradient_at_the_node():
    config = smoke_config(("S", "D", "E"))
    seed_everything(0)
    data, full = build_data(config)
    tasks = build_run_tasks(config, full.num_classes)
    trainer = build_trainer(config, tasks, alignment.prefix_plan(tuple(tasks), 3, 10), build_stages(config))
    trainer.fit(data, 1, progress=False)  # identical fresh task nodes have CKA 1 and no alignment gradient
    images, gts = next(iter(data.batches(data.train, key=(0, 0))))
    ratios = [alignment.gradient_ratios(trainer, StructuralLearner(dataclasses.replace(config.mtsl, align_weight=w)),
                                        3, images, gts) for w in (0.2, 0.4)]
    assert set(ratios[0]) == {"S", "D", "E"} and all(r > 0 for r in ratios[0].values())
    for task in tasks:  # the alignment term is linear in λ, the task term does not depend on it
        assert ratios[1][task] == pytest.approx(2 * ratios[0][task], rel=1e-5)


def test_a_strong_alignment_raises_the_similarity_it_is_measured_by():
    config = smoke_config(("S", "D", "E"), align_weight=20.0)
    # six steps at three times the smoke's rate must move the nodes; three steps at 1e-2 (until 2026-12-07) move
    # them too far to say which way: 0.72 -> 0.61 at location 9 once each task drew its own head
    config = config.replace(optimizer={**config.optimizer, "lr": 3e-3}, data=dataclasses.replace(config.data, train=48))
    data, full = build_data(config)
    row = alignment.probe(config, data, full.num_classes, 8, epochs=2, steps=None)
    assert row["steps"] == 6  # one epoch of 48 images in batches of 8
    # measured 0.901 -> 0.970 with one thread, 0.913 -> 0.968 with two, 0.958 -> 0.994 with four (the thread count
    # changes the floating-point sums); without the alignment the two are equal
    assert row["aligned"]["mean"] > row["plain"]["mean"] + 0.02
    assert all(r > 1 for r in row["gradient_ratio"].values())  # λ = 20 outweighs every task
    for key in ("plain", "aligned"):
        assert set(row[key]["heldout_loss"]) == {"S", "D", "E"}
        assert all(1.0 <= d <= 16 for d in row[key]["dimension"].values())  # 16 channels at location 8
        assert -1.0 <= row[key]["without_top_direction"]["min"] <= row[key]["without_top_direction"]["mean"] <= 1.0
        assert sorted(t for g in row[key]["partition"] for t in g) == ["D", "E", "S"]
    assert row["loss_change"]["S"] == pytest.approx(
        100 * (row["aligned"]["heldout_loss"]["S"] / row["plain"]["heldout_loss"]["S"] - 1))


def test_both_phases_start_from_one_state(monkeypatch):
    """The plain and the aligned phase start from the same weights, batch-norm statistics and random state (the
    encoder setting's head drops out): the gradient ratios' training-mode forward updated the aligned phase's
    batch-norm statistics, and the plain phase's dropout moved the aligned phase's random state; numpy's and
    Python's, which a plugin may draw from (drawn here at each step), are forked too."""
    from mtsl_plugin.trainer import MTLTrainer

    config = smoke_config(("S", "D")).replace(setting="encoder")
    data, full = build_data(config)
    starts, step = {}, MTLTrainer.train_step

    def recording_step(self, images, gts):  # each phase's state at its first step
        starts.setdefault(self.learner.config.align, (torch.get_rng_state(), np.random.get_state()[1].copy(),
                                                      random.getstate(), copy.deepcopy(self.model.state_dict())))
        np.random.random(), random.random()
        return step(self, images, gts)

    monkeypatch.setattr(MTLTrainer, "train_step", recording_step)
    alignment.probe(config, data, full.num_classes, 4, epochs=1, steps=2)
    (*plain_rngs, plain_state), (*aligned_rngs, aligned_state) = starts[False], starts[True]
    assert torch.equal(plain_rngs[0], aligned_rngs[0])
    assert np.array_equal(plain_rngs[1], aligned_rngs[1]) and plain_rngs[2] == aligned_rngs[2]
    assert all(torch.equal(plain_state[k], aligned_state[k]) for k in plain_state)


def test_alignment_command_writes_its_table_and_refuses_bad_locations(tmp_path, capsys):
    out = tmp_path / "probe"
    assert alignment.main(["--preset", "smoke", "--tasks", "S,D", "--locations", "0,8", "--epochs", "1",
                           "--steps", "1", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "alignment" / "alignment.json").read_text())
    assert [r["location"] for r in report["rows"]] == [0, 8] and report["epochs"] == 1
    table = (out / "alignment" / "alignment.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| 0 |") and table[3].startswith("| 8 |")
    assert table[0].count("|") == table[3].count("|") == 10 and " → " in table[3]
    capsys.readouterr()
    assert alignment.main(["--preset", "smoke", "--locations", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "0..9" in err and len(err.splitlines()) == 1


def test_a_probe_is_extended_by_new_locations_and_never_replaced_by_other_settings(tmp_path, capsys):
    out = tmp_path / "probe"
    common = ["--preset", "smoke", "--tasks", "S,D", "--epochs", "1", "--steps", "1", "--no-progress", "--out", str(out)]
    assert alignment.main([*common, "--locations", "8"]) == 0
    assert alignment.main([*common, "--locations", "0,8"]) == 0  # 8 again (replaced by the new probe) and 0
    report = out / "alignment" / "alignment.json"
    assert [r["location"] for r in json.loads(report.read_text())["rows"]] == [0, 8]
    assert "Note:" not in (out / "alignment" / "alignment.md").read_text()  # one process trained both
    saved = json.loads(report.read_text())
    saved["rows"][0]["trained_by"][0]["torch"] = "2.13.0"  # as if location 0 came from an earlier install
    report.write_text(json.dumps(saved))
    assert alignment.main([*common, "--locations", "8"]) == 0
    note = (out / "alignment" / "alignment.md").read_text().rstrip().splitlines()[-1]
    assert note.startswith("Note: these runs were not all trained by the same software")
    assert "location 0 seed 0: " in note and "torch 2.13.0" in note and "location 8 seed 0: " in note
    assert alignment.main([*common, "--locations", "0", "--channels-last"]) == 0  # as it changes float rounding
    rows = json.loads(report.read_text())["rows"]
    assert [r["trained_by"][0]["execution"] for r in rows] == [{"channels_last": True}, {}]
    before = report.read_bytes()
    capsys.readouterr()
    for other in (["--epochs", "2"], ["--tasks", "S,E"]):
        assert alignment.main([*common, "--locations", "9", *other]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds an alignment probe of other settings" in err and len(err.splitlines()) == 1
    assert report.read_bytes() == before
    saved = json.loads(before)
    del saved["initialisation"]  # a report from before the heads were drawn per task
    report.write_text(json.dumps(saved))
    assert alignment.main([*common, "--locations", "9"]) == 2
    assert "holds an alignment probe of other settings" in capsys.readouterr().err
    for argv, culprit in ((["--locations", "5,5"], "twice"), (["--steps", "4"], "3 steps here")):
        assert alignment.main([*common, *argv, "--out", str(tmp_path / "fresh")]) == 2
        assert culprit in capsys.readouterr().err


def test_a_dry_run_is_refused_where_the_probe_would_be(tmp_path, capsys, monkeypatch):
    """--dry-run passes only where the probe would start: --out, an earlier report and --steps are checked too."""
    monkeypatch.setattr(alignment, "probe", lambda *a, **k: pytest.fail("the probe started"))
    common = ["--preset", "smoke", "--tasks", "S,D", "--locations", "1", "--epochs", "1", "--no-progress", "--dry-run"]
    kept = tmp_path / "kept" / "alignment"
    kept.mkdir(parents=True)
    (kept / "alignment.json").write_text("not a report")
    (tmp_path / "file").write_text("")
    fresh = tmp_path / "fresh"
    (tmp_path / "off.yaml").write_text("mtsl: {align_weight: 0.0}\n")
    for argv, culprit in ((["--out", str(kept.parent)], "cannot be read as an alignment probe"),
                          (["--config", str(tmp_path / "off.yaml"), "--out", str(fresh)], "alignment is off"),
                          (["--out", str(tmp_path / "file")], "is a file"),
                          (["--steps", "4", "--out", str(fresh)], "3 steps here")):
        assert alignment.main([*common, *argv]) == 2
        assert culprit in capsys.readouterr().err
    assert alignment.main([*common, "--out", str(fresh)]) == 0 and not fresh.exists()
    assert capsys.readouterr().out.startswith("dry run: every check passed")


def test_a_solver_that_refuses_the_runs_tasks_is_refused_before_any_probe(tmp_path, capsys, monkeypatch):
    """The probe groups the task nodes of all the run's tasks with the run's solver, so that solver is tried on
    them before any training: seventeen declared tasks and the exact default are one line, and no probe starts."""
    from conftest import write_folder_data

    root = write_folder_data(tmp_path / "data", n_train=16, n_val=8)
    tasks = {f"heat{i}": {"kind": "regression", "folder": "heat"} for i in range(17)}
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"dataset": {"name": "folder", "root": str(root), "height": 32, "width": 32,
                                              "holdout": 8}, "tasks": tasks}))
    probes = []
    monkeypatch.setattr(alignment, "probe", lambda *args: probes.append(args) or pytest.fail("a probe started"))
    assert alignment.main(["--preset", "smoke", "--config", str(config), "--locations", "9", "--epochs", "1",
                           "--no-progress", "--out", str(tmp_path / "probe")]) == 2
    err = capsys.readouterr().err.strip()
    assert "at most 16 tasks" in err and "authors_local" in err and len(err.splitlines()) == 1 and not probes
