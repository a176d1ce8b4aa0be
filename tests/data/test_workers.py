"""Loader workers and each sample's own augmentation: a run's training batches, their zooms and flips, and so its
results do not depend on how many processes read them (``--workers``), and every loop iterates its loader once."""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from benchmarks import compare, speed
from conftest import smoke_config, write_nyuv2
from mtsl_plugin.config import DataConfig, RunConfig
from mtsl_plugin.data import real
from mtsl_plugin.data.real import NYUv2, SampleDraws, random_window, sample_generator
from mtsl_plugin.data.run_data import RunData
from mtsl_plugin.experiment import build_data, loader_workers
from mtsl_plugin.progress import each_batch


def training_batches(root, workers, epochs=(0, 1)):
    """The training batches of ``epochs`` of a tiny augmented NYUv2 run read by ``workers`` processes."""
    config = smoke_config(tasks=("S", "D")).replace(workers=workers, data=DataConfig(
        name="nyuv2", root=str(root), height=32, width=32, train=16, holdout=4, test=4))
    data = build_data(config)[0]
    return [batch for epoch in epochs for batch in data.batches(data.train, key=(0, epoch))]


def test_the_training_batches_are_the_same_with_and_without_workers_and_leave_the_global_rng(tmp_path):
    root = write_nyuv2(tmp_path / "nyuv2", n_train=20, n_val=4)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = {workers: training_batches(root, workers) for workers in (0, 2)}
    assert torch.equal(torch.get_rng_state(), before)  # only the shuffles' own generators drew
    assert len(batches[0]) == 4
    for (images, gts), (images2, gts2) in zip(batches[0], batches[2]):
        assert torch.equal(images, images2) and all(torch.equal(gts[t], gts2[t]) for t in gts)
    assert not torch.equal(batches[0][0][0], batches[0][2][0])  # epoch 1 shuffles and augments anew


def test_a_sample_draws_its_window_from_the_run_the_epoch_and_its_index(tmp_path):
    """The window of sample i of an epoch is the same wherever the sample is read, and another in another epoch
    or run; outside a keyed read the global RNG gives it, as before."""
    root = write_nyuv2(tmp_path / "nyuv2", n_train=8, n_val=2)
    drawn = []
    window = real.random_window
    real.random_window = lambda hw: drawn.append(window(hw)) or drawn[-1]
    try:
        dataset = NYUv2(root, "train", height=32, width=32, augment=True)
        for key in [(0, 0, 1)] * 2 + [(0, 0, 2), (1, 0, 1)]:
            keyed = SampleDraws(dataset, key)
            for i in (3, 5):
                keyed[i]
    finally:
        real.random_window = window
    same_epoch, again, other_epoch, other_run = drawn[0:2], drawn[2:4], drawn[4:6], drawn[6:8]
    assert same_epoch == again and same_epoch[0] != same_epoch[1]
    assert other_epoch != same_epoch and other_run != same_epoch
    torch.manual_seed(3)
    unkeyed = random_window((32, 32))
    torch.manual_seed(3)
    assert random_window((32, 32)) == unkeyed


def test_a_runs_training_loader_augments_each_epoch_anew(tmp_path):
    """RunData keys each sample's window by the run's seed and the epoch: sample i is zoomed and flipped otherwise in
    the next epoch (not once for the whole run), and alike when the epoch is read again."""
    root = write_nyuv2(tmp_path / "nyuv2", n_train=10, n_val=2)
    config = smoke_config(tasks=("S", "D")).replace(data=DataConfig(
        name="nyuv2", root=str(root), height=32, width=32, train=6, holdout=4, test=2))
    data = build_data(config)[0]
    images = {epoch: [data.batches(data.train, key=(0, epoch)).dataset[i][0] for i in range(6)] for epoch in (0, 1)}
    again = [data.batches(data.train, key=(0, 0)).dataset[i][0] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(images[0], again))
    assert not all(torch.equal(a, b) for a, b in zip(images[0], images[1]))


def test_a_runs_seed_draws_its_own_windows():
    """RunData keys each sample's window by the run's seed too: under another seed, sample i of an epoch is zoomed
    and flipped otherwise (not every seed's run augmented alike)."""
    class Windows(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return random_window((32, 32))

    def windows(seed):
        data = RunData(train=Windows(), holdout=None, test=None, batch_size=4, seed=seed)
        keyed = data.batches(data.train, key=(0, 0)).dataset
        return [keyed[i] for i in range(len(keyed))]

    assert windows(0) == windows(0) and windows(0) != windows(1)


def test_a_samples_window_and_the_loaders_shuffle_draw_from_different_streams():
    """The shuffle of epoch e is seeded from (seed, 0, e), sample i's window from (seed, 0, e, i): for sample 0
    those seeded one generator alike (SeedSequence pads short keys with zeros), so its window was the shuffle's
    stream."""
    data = RunData(train=list(range(8)), holdout=None, test=None, batch_size=4, seed=5)
    for epoch in range(3):
        loader = data.batches(data.train, key=(0, epoch))
        windows = {sample_generator((5, 0, epoch, i)).initial_seed() for i in range(8)}
        assert loader.generator.initial_seed() not in windows and len(windows) == 8


class Counted(DataLoader):
    iterations = 0

    def __iter__(self):
        Counted.iterations += 1
        return super().__iter__()


@pytest.mark.parametrize("keyed", [True, False])
def test_each_batch_iterates_once_and_draws_what_tqdm_auto_drew(keyed):
    """tqdm.auto's bar iterated its loader twice (a second set of workers for a loader with them); each_batch
    iterates once but draws the number the throw-away iterator drew, so shuffles and the global stream stay."""
    data = TensorDataset(torch.arange(12.0))

    def loader():
        return Counted(data, batch_size=4, shuffle=True,
                       generator=torch.Generator().manual_seed(5) if keyed else None)

    torch.manual_seed(0)
    Counted.iterations = 0
    old = [b for (b,) in tqdm(loader(), disable=True)]
    assert Counted.iterations == 2
    old_state = torch.get_rng_state()
    torch.manual_seed(0)
    Counted.iterations = 0
    new = [b for (b,) in each_batch(loader(), "test", progress=False)]
    assert Counted.iterations == 1
    assert all(torch.equal(a, b) for a, b in zip(old, new)) and torch.equal(torch.get_rng_state(), old_state)


def test_a_run_with_workers_gives_the_results_of_one_without_and_resumes_with_other_workers(tmp_path):
    root = write_nyuv2(tmp_path / "nyuv2", n_train=36, n_val=8)
    args = ["--preset", "smoke", "--tasks", "S,D", "--methods", "mtsl", "--dataset", "nyuv2", "--data-root",
            str(root), "--no-progress"]
    metrics = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert compare.main([*args, "--workers", str(workers), "--out", str(out)]) == 0
        metrics[workers] = {r["method"]: r["metrics"] for r in json.loads((out / "results.json").read_text())}
        assert json.loads((out / "config.json").read_text())["config"]["workers"] == workers
    assert metrics[0] == metrics[2]
    assert compare.main(["--resume", str(tmp_path / "w2"), "--workers", "0", "--no-progress"]) == 0


def test_workers_are_an_execution_option_chosen_by_default_where_they_help():
    config = RunConfig()
    assert config.replace(workers=4).fingerprint() == config.fingerprint()
    with pytest.raises(ValueError, match="workers"):
        config.replace(workers=-1)
    nyuv2 = config.replace(data=DataConfig(name="nyuv2", root="x"))
    assert loader_workers(config) == loader_workers(nyuv2) == 0  # synthetic data; the CPU's cores train
    assert loader_workers(config.replace(device="cuda")) == 0  # drawn from memory faster than workers hand over
    cores = len(os.sched_getaffinity(0))
    assert loader_workers(nyuv2.replace(device="cuda")) == max(0, min(8, cores - 1))
    assert loader_workers(nyuv2.replace(device="cuda", workers=3)) == 3


def test_speed_times_a_real_data_sets_batches_read_by_workers(tmp_path, capsys):
    root = write_nyuv2(tmp_path / "nyuv2", n_train=24, n_val=2)
    assert speed.main(["--plans", "onenet", "--batch", "4", "--height", "32", "--width", "32", "--steps", "2",
                       "--dataset", "nyuv2", "--data-root", str(root), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "nyuv2 batches, read by 2 loader workers besides the main process" in out
    assert json.loads(out.splitlines()[-1])["ratios"]["data_over_onenet_step"] > 0
    assert speed.main(["--steps", "1", "--data-root", str(root)]) == 2
    assert "--data-root goes with --dataset" in capsys.readouterr().err
