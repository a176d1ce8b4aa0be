"""The MTSL algorithm end to end on the smoke preset: every phase runs, and the decisions follow similarity."""
import json

import pytest
import torch

from mtsl_plugin.experiment import run_method
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plugins import similarity


def test_smoke_run_goes_through_every_phase(smoke, tmp_path):
    config = smoke()
    result = run_method(config, "mtsl", tmp_path, progress=False)
    phases = sorted(tmp_path.glob("phase_*.json"))
    assert len(phases) == config.mtsl.num_phases == 2
    for k, path in enumerate(phases):
        record = json.loads(path.read_text())
        assert record["phase"] == k
        if record["location"] is not None:
            matrix = torch.tensor(record["similarities"][0]["matrix"])
            assert matrix.shape == (3, 3) and torch.allclose(matrix, matrix.T)
        BranchingPlan.from_dict(record["plan"])
    assert len(result["history"]) == config.mtsl.total_epochs
    assert result["history"][0]["align"] > 0  # the alignment term is in the loss during task learning
    assert result["history"][-1]["align"] == 0  # and gone during fine-tuning
    assert set(result["metrics"]) == {"S", "D", "E"}
    assert BranchingPlan.from_dict(json.loads((tmp_path / "plan.json").read_text())) == \
        BranchingPlan.from_dict(result["plan"])


def frozen(smoke, **changes):
    """A run whose task branches never change (learning rate 0), so sibling task nodes stay identical."""
    config = smoke(task_epochs=(1,) + (0,) * 9, amalgamation_epochs=(1,) * 10, **changes)
    config = config.replace(optimizer={"optim": "adam", "lr": 0.0, "weight_decay": 0.0})
    return config.replace(mtsl=config.mtsl.__class__.from_dict({**config.mtsl.to_dict(), "total_epochs": 1}))


def test_identical_tasks_merge_everywhere(smoke, tmp_path):
    result = run_method(frozen(smoke), "mtsl", tmp_path, progress=False)
    assert BranchingPlan.from_dict(result["plan"]) == BranchingPlan.one_net(("S", "D", "E"), 10)
    first = json.loads((tmp_path / "phase_0.json").read_text())
    assert first["merged"] == [["S", "D", "E"]]
    assert min(min(row) for row in first["similarities"][0]["matrix"]) > 0.999


def test_threshold_above_one_merges_nothing(smoke, tmp_path):
    result = run_method(frozen(smoke, threshold=1.01), "mtsl", tmp_path, progress=False)
    assert BranchingPlan.from_dict(result["plan"]) == BranchingPlan.single_task(("S", "D", "E"), 10)


def test_threshold_zero_with_fewest_groups_shares_every_location(smoke, tmp_path):
    """Trained (not frozen) branches whose similarities are below one still all merge at γ = 0."""
    config = smoke(task_epochs=(1,) + (0,) * 9, amalgamation_epochs=(0,) * 10, threshold=0.0)
    assert config.mtsl.grouping == "fewest_groups"
    result = run_method(config, "mtsl", tmp_path, progress=False)
    assert BranchingPlan.from_dict(result["plan"]) == BranchingPlan.one_net(("S", "D", "E"), 10)
    first = json.loads((tmp_path / "phase_0.json").read_text())
    assert min(min(row) for row in first["similarities"][0]["matrix"]) < 0.999


@pytest.mark.parametrize("flag", ["align", "amalgamate"])
def test_ablation_switches_change_the_algorithm(smoke, flag, tmp_path):
    config = smoke(**{flag: False})
    result = run_method(config, "mtsl", tmp_path, progress=False)
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("phase_*.json"))]
    if flag == "align":
        assert all(h["align"] == 0 for h in result["history"])
    else:
        assert all(r["amalgamation_losses"] == [] for r in records)


def test_alignment_loss_is_lambda_times_mean_dissimilarity(smoke):
    learner = StructuralLearner(smoke().mtsl)
    plan = BranchingPlan.single_task("SDE", 10)
    gen = torch.Generator().manual_seed(0)
    feats = {t: torch.randn(8, 16, 2, 2, generator=gen) for t in "SDE"}
    cka = similarity("cka")
    pooled = {t: f.mean(dim=(2, 3)) for t, f in feats.items()}
    expected = 0.2 * torch.stack([1 - cka(pooled[a], pooled[b]) for a, b in ("SD", "SE", "DE")]).mean()
    torch.testing.assert_close(learner.alignment_loss(plan, feats), expected)
    assert learner.alignment_loss(BranchingPlan.one_net("SDE", 10), {}) is None


def test_a_similarity_without_gradient_cannot_drive_the_alignment(smoke):
    """RSA decides groupings (MTSL-RSA) but has no gradient: as the alignment measure it is refused clearly."""
    plan = BranchingPlan.single_task("SD", 10)
    feats = {t: torch.randn(8, 16, 2, 2, requires_grad=True) for t in "SD"}
    grouping_only = StructuralLearner(smoke(tasks="SD", similarity="rsa").mtsl)
    assert grouping_only.alignment_loss(plan, feats).requires_grad  # alignment stays CKA
    with pytest.raises(ValueError, match="'rsa' returns no gradient"):
        StructuralLearner(smoke(tasks="SD", align_similarity="rsa").mtsl).alignment_loss(plan, feats)
