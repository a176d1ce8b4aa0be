"""Robustness benchmark: corruptions, PGD on a trained smoke model, and the command end to end."""
import csv
import importlib.metadata
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import robustness, robustness_report
from benchmarks.perturbations import (CATEGORIES, CORRUPTIONS, EPSILONS, SEVERITIES, corrupt_images,
                                      elastic_transform, pgd_attack, pgd_iterations, seeded_numpy)
from conftest import table_row, table_rows
from mtsl_plugin.config import load_preset
from mtsl_plugin.data import build_dataset
from mtsl_plugin.experiment import load_run, run_method

CLI_ARGS = ["--methods", "onenet", "--preset", "smoke", "--tasks", "S,D", "--seeds", "0", "--no-progress",
            "--corruptions", "noise", "--epsilons", "2"]


@pytest.fixture(scope="module")
def images():
    data = build_dataset("synthetic", "test", height=32, width=32, n=2, seed=0)
    return torch.stack([data[i][0] for i in range(len(data))])


# ----------------------------------------------------------------------------------------------- corruptions
def test_categories_are_the_fifteen_common_corruptions():
    assert list(CATEGORIES) == ["noise", "blur", "weather", "digital"]
    assert len(CORRUPTIONS) == len(set(CORRUPTIONS)) == 15


def test_every_corruption_changes_the_images_within_range_and_severity_5_changes_more(images):
    change = {}
    for name in CORRUPTIONS:
        for severity in (1, 2, 3, 4, 5):
            out = corrupt_images(images, name, severity, seed=3)
            assert out.shape == images.shape and out.dtype == images.dtype, (name, severity)
            assert 0 <= out.min() and out.max() <= 1, (name, severity)
            change[name, severity] = float((out - images).abs().mean())
            assert change[name, severity] > 1 / 255, (name, severity)  # more than 8-bit rounding
    for name in CORRUPTIONS:  # holds for each corruption on these 32x32 scenes with this seed
        assert change[name, 5] > change[name, 1], name
    assert np.mean([change[n, 5] for n in CORRUPTIONS]) > 2 * np.mean([change[n, 1] for n in CORRUPTIONS])


def test_corruption_is_deterministic_per_seed_and_leaves_numpys_rng_alone(images):
    np.random.seed(123)
    state = np.random.get_state()
    for name in ("gaussian_noise", "impulse_noise", "glass_blur", "frost"):  # global RNG, own seed, numba, files
        first = corrupt_images(images, name, 3, seed=7)
        assert torch.equal(first, corrupt_images(images, name, 3, seed=7)), name
        assert not torch.equal(first, corrupt_images(images, name, 3, seed=8)), name
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]


def test_an_image_corruption_does_not_depend_on_the_rest_of_the_batch(images):
    whole = corrupt_images(images, "shot_noise", 2, seed=5)
    assert torch.equal(whole[:1], corrupt_images(images[:1], "shot_noise", 2, seed=5))


@pytest.mark.parametrize("name, severity, culprit", [
    ("rain", 1, "rain"), ("fog", 0, "0"), ("fog", 6, "6"), ("fog", 2.0, "2.0"),
])
def test_bad_corruption_arguments_are_one_sentence_naming_them(images, name, severity, culprit):
    with pytest.raises(ValueError, match=culprit):
        corrupt_images(images, name, severity, seed=0)


def test_each_image_of_a_batch_draws_its_own_corruption(images):
    """Image i's seed comes from (seed, i): one image twice in a batch gets two noise draws, not one twice."""
    twice = corrupt_images(images[[0, 0]], "gaussian_noise", 3, seed=4)
    assert not torch.equal(twice[0], twice[1])


def test_images_smaller_than_32_pixels_are_refused_not_upsampled():
    with pytest.raises(ValueError, match="31x32"):
        corrupt_images(torch.rand(1, 3, 31, 32), "fog", 1, seed=0)


@pytest.mark.parametrize("height, width", [(32, 32), (48, 64)])
def test_elastic_changes_a_small_image_as_it_does_the_image_enlarged_to_224_pixels(height, width):
    """Elastic's parameters hold at 224 pixels: a small image changes about as much as the same image enlarged to
    224 pixels, corrupted and shrunk back (the package's own warp, drawn at the small size, changed a 32x32 image
    eight times as much: about 1 to 2.5 pixels of independent jitter per pixel, as at every size)."""
    data = build_dataset("synthetic", "test", height=height, width=width, n=4, seed=0)
    small = torch.stack([data[i][0] for i in range(len(data))])
    scale = 224 / min(height, width)
    large = F.interpolate(small, size=(round(height * scale), round(width * scale)), mode="bicubic",
                          align_corners=False).clamp(0, 1)

    def shrink(x):
        return F.interpolate(x, size=(height, width), mode="area")

    for severity in SEVERITIES:
        here = (corrupt_images(small, "elastic_transform", severity, seed=1) - small).abs().mean()
        there = (shrink(corrupt_images(large, "elastic_transform", severity, seed=1)) - shrink(large)).abs().mean()
        assert 2 / 3 < here / there < 3 / 2, (severity, float(here / there))


@pytest.mark.parametrize("shape", [(224, 300, 3), (300, 224, 3)])
def test_elastic_is_the_packages_at_a_shorter_side_of_224_pixels(shape):
    from imagecorruptions import corrupt

    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    for severity in SEVERITIES:
        with seeded_numpy(11):
            expected = corrupt(image, severity=severity, corruption_name="elastic_transform")
        assert np.array_equal(elastic_transform(image, severity, np.random.RandomState(11)), expected), severity


# ----------------------------------------------------------------------------------------------- PGD
def test_pgd_iterations_follow_the_formula():
    assert [pgd_iterations(e) for e in EPSILONS] == [1, 1, 2, 3]
    assert pgd_iterations(8) == 10 and pgd_iterations(16) == 20  # ceil(1.25 eps) is the smaller term or a tie
    assert pgd_iterations(20) == 24 and pgd_iterations(40) == 44  # eps + 4 is the smaller term


def test_pgd_on_a_linear_loss_moves_every_pixel_by_eps_and_clips():
    calls = []

    def model_fn(x):
        calls.append(1)
        return x

    clean = torch.tensor([0.0, 0.5, 0.999, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    adv = pgd_attack(model_fn, lambda pred, _: pred.sum(), clean, None, eps=2.0)
    assert len(calls) == pgd_iterations(2.0)
    assert torch.allclose(adv, (clean + 2 / 255).clamp(0, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pgd") / "onenet"
    run_method(load_preset("smoke").replace(tasks=("S", "D")), "onenet", run_dir, progress=False)
    trainer, data, _ = load_run(run_dir)
    return trainer, next(iter(data.batches(data.test)))


@pytest.mark.parametrize("task", ["S", "D"])
def test_pgd_raises_the_attacked_loss_within_the_budget(trained, task):
    trainer, (images, gts) = trained
    loss_fn = trainer.task_dict[task]["loss_fn"].compute_loss

    def model_fn(x):
        return trainer.model(x)[task]

    eps = 2.0
    with torch.no_grad():  # the attack takes its own gradients even inside an evaluation loop
        adv = pgd_attack(model_fn, loss_fn, images, gts[task], eps)
        clean_loss, adv_loss = loss_fn(model_fn(images), gts[task]), loss_fn(model_fn(adv), gts[task])
    assert adv_loss > clean_loss
    assert (adv - images).abs().max() <= eps / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1 and adv.shape == images.shape
    assert all(p.grad is None for p in trainer.model.parameters())


def test_the_order_of_the_attacked_tasks_changes_no_number(trained):
    trainer, batch = trained
    (first,) = robustness.evaluate_runs([trainer], lambda: enumerate([batch]), [], [1.0], ["S", "D"], False)
    (second,) = robustness.evaluate_runs([trainer], lambda: enumerate([batch]), [], [1.0], ["D", "S"], False)
    assert first["pgd"] == second["pgd"] and first["clean"] == second["clean"]


def test_budgets_that_would_share_a_key_are_refused_not_overwritten(trained):
    trainer, batch = trained
    with pytest.raises(ValueError, match="1.0000001 and 1.0000002"):
        robustness.evaluate_runs([trainer], lambda: enumerate([batch]), [], [1.0000001, 1.0000002], ["D"], False)


def test_ordinary_budgets_keep_the_keys_of_earlier_reports():
    assert [robustness_report.eps_key(e) for e in (0.25, 0.5, 1.0, 2.0, 8.0, 0.01, 1e-07, 2e-07)] == \
        ["0.25", "0.5", "1", "2", "8", "0.01", "1e-07", "2e-07"]


# ----------------------------------------------------------------------------------------------- the report
SD = (("S", "mIoU", True), ("D", "RMSE", False))


def robust_run(label, seed, offset, status="ok", tasks=SD):
    """A robustness record of ``tasks`` (name, metric, higher is better) whose every number is its own base number
    plus ``offset``: clean, gaussian_noise at severities 1 and 2, the noise category, and PGD at ε 1 and 2."""
    record = {"label": label, "method": label, "seed": seed, "status": status,
              "error": None if status == "ok" else "broken", "metric_names": {t: m for t, m, _ in tasks},
              "higher_is_better": {t: h for t, _, h in tasks}}
    if status != "ok":
        return record
    (first, *_), (second, *_) = tasks

    def scores(a, b):
        return {first: a + offset, second: b + offset}

    record.update(clean=scores(0.61, 0.31), corruptions={"gaussian_noise": {"1": scores(0.52, 0.42),
                                                                            "2": scores(0.44, 0.46)}},
                  categories={"noise": scores(0.48, 0.44)},
                  pgd={first: {"1": scores(0.37, 0.33), "2": scores(0.23, 0.35)},
                       second: {"1": scores(0.58, 0.51), "2": scores(0.57, 0.72)}})
    return record


def test_the_summary_is_the_mean_and_sample_std_over_a_labels_successful_seeds():
    runs = [robust_run("mtsl", 0, 0.0), robust_run("mtsl", 1, 0.1), robust_run("mtsl", 2, 0.0, "failed"),
            robust_run("stn", 0, 0.02)]
    summary = robustness_report.summarise(runs)
    assert list(summary) == ["mtsl", "stn"]
    assert (summary["mtsl"]["ok"], summary["mtsl"]["runs"], summary["mtsl"]["errors"]) == (2, 3, ["broken"])
    for value, stat in ((0.61, summary["mtsl"]["clean"]["S"]), (0.57, summary["mtsl"]["pgd"]["D"]["2"]["S"])):
        seeds = [value, value + 0.1]
        mean = sum(seeds) / 2
        assert stat == pytest.approx([mean, math.sqrt(sum((v - mean) ** 2 for v in seeds) / (2 - 1)), 2])
    assert summary["stn"]["categories"]["noise"]["D"] == pytest.approx([0.46, 0.0, 1])


def test_a_row_covering_some_of_its_seeds_says_how_many_failed():
    """As the comparison table does: a mean over 2 of 3 seeds is not read as one over all of them."""
    runs = [robust_run("mtsl", 0, 0.0), robust_run("mtsl", 1, 0.1), robust_run("mtsl", 2, 0.0, "failed"),
            robust_run("stn", 0, 0.02)]
    summary = robustness_report.summarise(runs)
    corruption = robustness_report.corruption_table(summary, ["S", "D"], ["noise"])
    pgd = robustness_report.pgd_table(summary, ["S", "D"], ["S"], [1.0])
    for table in (corruption, pgd):
        assert [r["Method"] for r in table_rows(table)] == ["mtsl (1 of 3 runs failed)", "stn"]


def test_every_number_of_the_tables_stands_under_its_own_column():
    runs = [robust_run("mtsl", 0, 0.0)]
    summary, labels = robustness_report.summarise(runs), robustness_report.task_labels(runs)
    row = table_row(robustness_report.corruption_table(summary, ["S", "D"], ["noise"], labels), "mtsl")
    assert {k: float(v) for k, v in row.items() if k != "Method"} == pytest.approx(
        {"S mIoU ↑ clean": 0.61, "S noise": 0.48, "D RMSE ↓ clean": 0.31, "D noise": 0.44})
    rows = table_rows(robustness_report.pgd_table(summary, ["S", "D"], ["S", "D"], [1.0, 2.0], labels))
    assert [(r["Method"], r["Attacked"]) for r in rows] == [("mtsl", "S"), ("mtsl", "D")]
    assert {k: float(v) for k, v in rows[1].items() if k not in ("Method", "Attacked")} == pytest.approx(
        {"S mIoU ↑ ε=1": 0.58, "S ε=2": 0.57, "D RMSE ↓ ε=1": 0.51, "D ε=2": 0.72})


def test_table_cells_keep_four_significant_digits_at_every_scale():
    """A mIoU in % and an RMSE of 0.01 alike show 4 significant digits; a std has its mean's decimals."""
    def stat(mean, std=0.0, n=1):
        return [mean, std, n]

    summary = {"m": {"ok": 1, "runs": 1, "clean": {"S": stat(61.234), "D": stat(0.012345)},
                     "categories": {"noise": {"S": stat(0.5), "D": stat(2.5, 0.25, 2)}}}}
    row = table_row(robustness_report.corruption_table(summary, ["S", "D"], ["noise"]), "m")
    assert [row["S mIoU ↑ clean"], row["D RMSE ↓ clean"], row["S noise"]] == [
        f"{v:#.4g}" for v in (61.234, 0.012345, 0.5)]
    mean, std = row["D noise"].split(" ± ")
    assert mean == f"{2.5:#.4g}" and float(std) == 0.25 and len(std.split(".")[1]) == len(mean.split(".")[1])


def test_the_csv_has_one_row_per_number_of_the_successful_runs():
    rows = robustness_report.csv_rows([robust_run("mtsl", 3, 0.0), robust_run("stn", 0, 0.0, "failed")])
    assert len(rows) == 2 * (1 + 2 + 1 + 4)  # tasks x (clean, two corrupted sets, category, attacks)
    values = {(r["kind"], r["perturbation"], r["level"], r["task"]): float(r["value"]) for r in rows}
    assert values[("clean", "", "", "D")] == 0.31 and values[("corruption", "gaussian_noise", "2", "D")] == 0.46
    assert values[("category", "noise", "", "S")] == 0.48 and values[("pgd", "D", "2", "S")] == 0.57
    assert {(r["label"], r["seed"], r["metric"]) for r in rows if r["task"] == "S"} == {("mtsl", 3, "mIoU")}


def test_the_report_labels_declared_tasks_with_their_own_metric_and_direction(tmp_path):
    tasks = (("parts", "mIoU", True), ("flow", "EPE", False))  # neither is a built-in task
    runs = [robust_run("mtsl", 0, 0.0, tasks=tasks)]
    text = robustness_report.write_report(tmp_path, {}, runs, ["parts", "flow"], ["noise"], [1.0, 2.0],
                                          ["parts", "flow"])
    assert "| flow EPE ↓ clean |" in text and "| flow EPE ↓ ε=1 |" in text and "| parts mIoU ↑ clean |" in text


def test_the_report_says_when_its_runs_were_trained_by_other_software(tmp_path):
    entry = {"mtsl_plugin": "0.1.0", "commit": "abc", "device": "cpu: X", "threads": 2, "processes": 1}
    runs = [{**robust_run("mtsl", 0, 0.0), "trained_by": [entry]}, {**robust_run("stn", 0, 0.0), "trained_by": [entry]}]
    text = robustness_report.write_report(tmp_path, {}, runs, ["S", "D"], ["noise"], [], [])
    assert "Note:" not in text
    runs[1]["trained_by"] = [{**entry, "commit": "def"}]
    text = robustness_report.write_report(tmp_path, {}, runs, ["S", "D"], ["noise"], [], [])
    assert text == (tmp_path / "robustness.md").read_text()
    assert text.rstrip().splitlines()[-1].startswith("Note: these runs were not all trained by the same software")
    assert "mtsl seed 0: mtsl-plugin 0.1.0 at abc" in text and "stn seed 0: mtsl-plugin 0.1.0 at def" in text


# ----------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness") / "run"
    return robustness.main([*CLI_ARGS, "--out", str(out)]), out


def test_command_writes_every_number_table_and_figure(cli_run):
    code, out = cli_run
    assert code == 0
    folder = out / "robustness"
    for name in ("robustness.json", "robustness.csv", "robustness.md", "corruptions.png", "pgd.png"):
        assert (folder / name).stat().st_size > 0, name
    report = json.loads((folder / "robustness.json").read_text())
    (run,) = report["runs"]
    assert run["label"] == "onenet" and run["status"] == "ok"
    for scores in [run["clean"], run["categories"]["noise"], run["pgd"]["S"]["2"], run["pgd"]["D"]["2"]]:
        assert set(scores) == {"S", "D"} and all(np.isfinite(v) for v in scores.values())
    assert set(run["corruptions"]) == set(CATEGORIES["noise"])
    assert all(set(levels) == {"1", "2", "3", "4", "5"} for levels in run["corruptions"].values())
    # the clean scores are the run's own evaluation; the category score is the mean of its 15 corrupted sets
    trained = json.loads((out / "onenet" / "seed0" / "result.json").read_text())
    assert run["clean"] == pytest.approx(trained["metrics"], rel=1e-5)
    levels = [s["D"] for n in CATEGORIES["noise"] for s in run["corruptions"][n].values()]
    assert run["categories"]["noise"]["D"] == pytest.approx(np.mean(levels))
    assert run["pgd"]["D"]["2"]["D"] > run["clean"]["D"]  # RMSE rises under an attack on depth
    assert run["trained_by"] == trained["trained_by"]
    table = (folder / "robustness.md").read_text()
    assert "| onenet |" in table and "| onenet | S |" in table and "D RMSE ↓ ε=2" in table and "S noise" in table
    rows = list(csv.DictReader((folder / "robustness.csv").open()))
    assert len(rows) == 2 * (1 + 15 + 1 + 2)  # tasks x (clean, corrupted sets, category, attacks)


def test_a_second_invocation_reuses_the_trained_run(cli_run, capsys):
    _, out = cli_run
    before = json.loads((out / "robustness" / "robustness.json").read_text())["runs"]
    assert robustness.main([*CLI_ARGS, "--out", str(out)]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    after = json.loads((out / "robustness" / "robustness.json").read_text())["runs"]
    assert after == before  # same corrupted images and attacks: the same numbers


def test_a_report_is_extended_with_other_methods_and_never_replaced_by_other_settings(cli_run, capsys):
    _, out = cli_run
    report = out / "robustness" / "robustness.json"
    assert robustness.main([*CLI_ARGS[:1], "stn", *CLI_ARGS[2:], "--out", str(out)]) == 0  # same settings
    runs = json.loads(report.read_text())["runs"]
    assert [r["label"] for r in runs] == ["onenet", "stn"] and all(r["status"] == "ok" for r in runs)
    assert "| onenet |" in (out / "robustness" / "robustness.md").read_text()
    before = report.read_bytes()
    capsys.readouterr()
    for other in (["--epsilons", "1"], ["--corruptions", "blur"], ["--tasks", "S"]):
        argv = [*CLI_ARGS, *other, "--out", str(out)]
        assert robustness.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "holds a robustness report of other settings" in err and len(err.splitlines()) == 1
    assert report.read_bytes() == before


def test_a_report_of_the_packages_elastic_numbers_is_extended_only_without_them(cli_run):
    """Reports made before the port lack ``elastic_reference_size``: with the digital category they hold the
    package's elastic numbers, which new ones must not join; without it they hold no elastic number."""
    _, out = cli_run
    meta = json.loads((out / "robustness" / "robustness.json").read_text())
    old = {k: v for k, v in meta.items() if k != "elastic_reference_size"}
    assert robustness.settings_of(old) == robustness.settings_of(meta)  # noise only
    digital = {"categories": {"digital": list(CATEGORIES["digital"])}}
    assert robustness.settings_of({**old, **digital}) != robustness.settings_of({**meta, **digital})


def test_a_report_records_the_corruptions_package_and_is_not_extended_by_another_version(cli_run):
    _, out = cli_run
    meta = json.loads((out / "robustness" / "robustness.json").read_text())
    version = importlib.metadata.version("imagecorruptions-imaug")
    assert meta["corruptions_package"] == f"imagecorruptions-imaug {version}"
    assert f"(imagecorruptions-imaug {version})" in (out / "robustness" / "robustness.md").read_text()
    for other in ("imagecorruptions-imaug 0.0.1", None):  # another version, or a report that did not record one
        assert robustness.settings_of({**meta, "corruptions_package": other}) != robustness.settings_of(meta)
    no_corruptions = {"categories": {}}  # PGD only: no package involved
    assert (robustness.settings_of({**meta, **no_corruptions, "corruptions_package": None})
            == robustness.settings_of({**meta, **no_corruptions}))


def test_the_attacked_tasks_in_another_order_extend_the_report(cli_run):
    _, out = cli_run
    report = out / "robustness" / "robustness.json"
    before = next(r for r in json.loads(report.read_text())["runs"] if r["label"] == "onenet")
    assert robustness.main([*CLI_ARGS, "--attack-tasks", "D,S", "--out", str(out)]) == 0
    after = next(r for r in json.loads(report.read_text())["runs"] if r["label"] == "onenet")
    assert after == before


@pytest.mark.parametrize("argv, culprit", [
    (["--corruptions", "none", "--epsilons", "none"], "nothing to evaluate"),
    (["--corruptions", "none", "--attack-tasks", "E"], "no task E"),
    (["--corruptions", "noise,rain"], "rain"),
    (["--epsilons", "1,abc"], "abc"),
    (["--epsilons", "-1"], "-1"),
    (["--epsilons", "1000"], "at most 255"),  # 1004 PGD iterations a batch for nothing
    (["--epsilons", "0.1234561,0.1234564"], "0.1234561 and 0.1234564"),  # one key, 0.123456, for both
    (["--attack-tasks", "S,X"], "X"),
    (["--tasks", "D", "--attack-tasks", "S,D"], "no task S"),  # named explicitly, the default's tasks too
    (["--methods", "nope"], "nope"),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, capsys, argv, culprit):
    assert robustness.main([*CLI_ARGS, *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and culprit in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing trained


def test_a_run_whose_evaluation_fails_loses_no_other_number_and_no_earlier_one(tmp_path, monkeypatch, capsys):
    """One model the attack breaks (e.g. out of memory): its row says why, the other runs' numbers are written,
    the exit code is 1, and a later failure never replaces numbers an earlier report of the same settings holds."""
    out = tmp_path / "run"
    argv = ["--methods", "onenet,stn", *CLI_ARGS[2:], "--corruptions", "none", "--attack-tasks", "D",
            "--out", str(out)]
    report = out / "robustness" / "robustness.json"
    load_run_, attack = robustness.load_run, robustness.pgd_perturbation
    broken: set[str] = set()

    def tagged_load_run(run_dir, device=None, progress=True):
        trainer, data, config = load_run_(run_dir, device, progress)
        trainer.robustness_label = run_dir.parent.name  # <out>/<label>/seed<k>
        return trainer, data, config

    def breaking_attack(task, eps):
        perturb = attack(task, eps)

        def run(trainer, images, gts):
            if trainer.robustness_label in broken:
                raise RuntimeError("out of memory")
            return perturb(trainer, images, gts)

        return run

    monkeypatch.setattr(robustness, "load_run", tagged_load_run)
    monkeypatch.setattr(robustness, "pgd_perturbation", breaking_attack)
    broken.add("stn")
    assert robustness.main(argv) == 1
    assert "[stn seed 0] evaluation failed: out of memory" in capsys.readouterr().err
    onenet, stn = json.loads(report.read_text())["runs"]
    assert onenet["status"] == "ok" and set(onenet["pgd"]["D"]["2"]) == {"S", "D"}
    assert stn["status"] == "failed" and stn["error"] == "evaluation failed: out of memory" and "pgd" not in stn
    assert "| stn | failed: evaluation failed: out of memory |" in (out / "robustness" / "robustness.md").read_text()

    broken.clear()
    assert robustness.main(argv) == 0
    good = json.loads(report.read_text())["runs"]
    assert [r["status"] for r in good] == ["ok", "ok"]
    broken.add("stn")
    assert robustness.main(argv) == 1
    assert json.loads(report.read_text())["runs"] == good  # the earlier numbers of stn stay


def test_under_torchrun_a_failed_evaluation_stops_the_command(monkeypatch):
    """One process: the failing label's exception, the others' records. Under torchrun the other ranks may wait in a
    collective of the failed pass, so the failure stops the command (torchrun then stops the others)."""
    from benchmarks.cli import RankFailure
    from mtsl_plugin import distributed

    def evaluate(labels):
        if "stn" in labels:
            raise RuntimeError("out of memory")
        return [{"label": label} for label in labels]

    outcome = robustness.evaluate_each(["onenet", "stn"], evaluate)
    assert outcome["onenet"] == {"label": "onenet"} and str(outcome["stn"]) == "out of memory"
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with pytest.raises(RankFailure, match="evaluating onenet, stn failed on rank 1: out of memory"):
        robustness.evaluate_each(["onenet", "stn"], evaluate)
