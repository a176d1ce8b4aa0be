"""What each rank of a two-process gloo job trains on: its own augmentations of its share of every global batch,
with our data (``RunData``) and with a LibMTL script's own loader (``mtsl_plugin.Trainer``)."""
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import smoke_config, write_nyuv2
from mtsl_plugin import distributed
from mtsl_plugin.config import DataConfig
from mtsl_plugin.data.real import NYUv2
from mtsl_plugin.experiment import build_data, build_stages, build_trainer, seed_everything
from mtsl_plugin.libmtl_trainer import LoaderData, Trainer
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.tasks import build_tasks, libmtl_task_dict
from test_distributed import free_port, join_group, join_with_timeout, leave_group, write_outcome


# ------------------------------------------------------------------------------ augmentation of real data sets
def augmented_run(root, folder, draws, workers=None):
    """One-Net on a tiny augmented NYUv2: one epoch (checkpointed), a second one, then the second again from the
    checkpoint; ``draws`` collects every (epoch, window) that ``random_window`` gives (in this process: none when
    ``workers`` read the samples). Returns the resumed run's final weights."""
    from mtsl_plugin.data import real

    window, epoch = real.random_window, [0]

    def recorded(hw):
        draws.append((epoch[0], window(hw)))
        return draws[-1][1]

    real.random_window = recorded
    try:
        data_config = DataConfig(name="nyuv2", root=str(root), height=32, width=32, train=16, holdout=4, test=4)
        config = smoke_config(tasks=("S", "D")).replace(data=data_config, workers=workers)
        seed_everything(0)
        data, dataset = build_data(config)
        tasks = build_tasks(config.tasks, dataset.num_classes)
        plan = BranchingPlan.one_net(config.tasks, 10)
        trainer = build_trainer(config, tasks, plan, build_stages(config))
        checkpoint = os.path.join(folder, "checkpoint.pt")
        trainer.fit(data, 1, checkpoint=checkpoint, progress=False)
        epoch[0] = 1
        trainer.fit(data, 2, progress=False)
        epoch[0] = "resumed"
        resumed = build_trainer(config, tasks, plan, build_stages(config))
        resumed.load(checkpoint)
        resumed.fit(data, 2, progress=False)
        return {k: v.clone() for k, v in resumed.model.state_dict().items()}
    finally:
        real.random_window = window


def augment_worker(rank, world, port, root, folder):
    join_group(rank, world, port)
    draws = []
    augmented_run(root, folder, draws)
    torch.save(draws, os.path.join(folder, f"draws{rank}.pt"))
    dist.destroy_process_group()


def test_the_ranks_augment_their_shares_as_one_process_would_and_resume_exactly(tmp_path):
    """Every rank seeds the global RNG alike, so windows drawn from it alone would zoom and flip the k-th sample
    of every rank's share alike (half the variety of one process). Each sample's window is its own (the run's
    seed, the epoch, the sample): the two ranks' windows of an epoch are together those one process draws, and a
    run resumed from a checkpoint draws those of the uninterrupted run."""
    root = write_nyuv2(tmp_path / "nyuv2", n_train=20, n_val=4)
    mp.spawn(augment_worker, args=(2, free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"draws{r}.pt", weights_only=False) for r in range(2)]
    single = []
    augmented_run(root, str(tmp_path), single)
    for draws in ranks:
        assert [e for e, _ in draws] == [0] * 8 + [1] * 8 + ["resumed"] * 8  # 16 samples an epoch, 8 a rank
        assert [w for e, w in draws if e == "resumed"] == [w for e, w in draws if e == 1]
    for e in (0, 1):
        windows = [[w for epoch, w in draws if epoch == e] for draws in ranks]
        assert windows[0] != windows[1], f"epoch {e}: both ranks drew the same windows"
        assert sorted(windows[0] + windows[1]) == sorted(w for epoch, w in single if epoch == e)


def run_data_workers_worker(rank, world, port, root, folder):
    join_group(rank, world, port)
    states = [augmented_run(root, os.path.join(folder, f"w{workers}"), [], workers) for workers in (0, 1)]
    torch.save(states, os.path.join(folder, f"states{rank}.pt"))
    dist.destroy_process_group()


def test_under_torchrun_loader_workers_train_what_the_main_process_trains(tmp_path):
    """Each rank's samples read and augmented by a worker process (forked after the group was joined) train the
    weights the rank's main process trains reading them itself, bit for bit."""
    root = write_nyuv2(tmp_path / "nyuv2", n_train=20, n_val=4)
    for workers in (0, 1):
        (tmp_path / f"w{workers}").mkdir()
    mp.spawn(run_data_workers_worker, args=(2, free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        main_process, worker = torch.load(tmp_path / f"states{rank}.pt", weights_only=False)
        assert all(torch.equal(main_process[k], worker[k]) for k in main_process)


def test_a_window_read_outside_a_runs_loaders_is_the_global_rngs_next_draws():
    """A sample read by a loader of yours (one process, no process group) draws its window from the global RNG:
    its next four draws, as before."""
    from mtsl_plugin.data.real import ZOOMS, random_window

    torch.manual_seed(3)
    zoom = ZOOMS[int(torch.randint(len(ZOOMS), ()))]
    expected = (zoom, int(torch.randint(32 - int(32 / zoom) + 1, ())), int(torch.randint(48 - int(48 / zoom) + 1, ())),
                bool(torch.rand(()) < 0.5))
    after = torch.get_rng_state()
    torch.manual_seed(3)
    assert random_window((32, 48)) == expected and torch.equal(torch.get_rng_state(), after)


class Indices(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return index


@pytest.mark.parametrize("key", [(0, 2), (1, 0), (5, 7)])
def test_the_ranks_global_batches_are_one_process_batches_in_order(monkeypatch, key):
    """Each step's global batch under torchrun (the ranks' shares together, as shard_batches interleaves them)
    holds the samples of that step of one process, in its order, so a run may resume with another number of
    processes. Before, the ranks' order skipped the seed DataLoader's iterator draws from the generator first,
    and their batches held other samples than one process trains on together."""
    from mtsl_plugin.data.run_data import RunData

    data = RunData(Indices(), None, Indices(), batch_size=4, seed=3)
    one = [batch.tolist() for batch in data.batches(data.train, key=key)]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for me in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda: me)
        shares.append([batch.tolist() for batch in data.batches(data.train, key=key)])
    together = [[sample for pair in zip(first, second) for sample in pair] for first, second in zip(*shares)]
    assert together == one and len(one) == 2  # the last, partial batch dropped in both


# ------------------------------------------------------------------------------ a LibMTL script's own loader
class Recorded(Dataset):
    """A dataset that records the index of every sample read."""

    def __init__(self, dataset):
        self.dataset, self.seen = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.seen.append(i)
        return self.dataset[i]


def libmtl_script(root, batch_size=4, epochs=2, sampler=None, save_path=None):
    """A LibMTL script with LibMTL's HPS on a tiny NYUv2: the training samples read and the batch sizes trained on
    (the first read is the trainer's look at sample 0 before training)."""
    torch.manual_seed(0)
    train = Recorded(NYUv2(root, "train"))
    shuffle = {"sampler": sampler(train)} if sampler is not None else {"shuffle": True}
    train_loader = DataLoader(train, batch_size=batch_size, drop_last=True, **shuffle)
    test_loader = DataLoader(NYUv2(root, "test"), batch_size=8)
    decoders = nn.ModuleDict({"S": nn.Conv2d(8, 13, 1), "D": nn.Conv2d(8, 1, 1)})
    trainer = Trainer(task_dict=libmtl_task_dict(build_tasks(["S", "D"], num_classes=13)), weighting="EW",
                      architecture="HPS", encoder_class=lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
                      decoders=decoders, optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 0}, device="cpu",
                      weight_args={}, arch_args={}, save_path=save_path)
    sizes, step = [], trainer.queue_step
    trainer.queue_step = lambda images, gts: sizes.append(images.shape[0]) or step(images, gts)
    try:
        trainer.train(train_loader, test_loader, epochs, progress=False)
        return {"seen": train.seen[1:], "sizes": sizes, "ddp": trainer.ddp is not None,
                "state": {k: v.clone() for k, v in trainer.model.state_dict().items()}}
    finally:
        trainer.ddp = None  # its reducer holds the process group: released before the group is destroyed (else
        gc.collect()  # the process may abort at exit, "terminate called without an active exception")


def libmtl_worker(rank, world, port, root, folder, joins, sampler):
    join_group(rank, world, port, init=joins)  # a script that joins the group itself, or one that leaves it to us
    sampler = torch.utils.data.DistributedSampler if sampler == "distributed" else None
    torch.save(libmtl_script(root, sampler=sampler), os.path.join(folder, f"libmtl{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("joins", [True, False])
def test_a_libmtl_script_under_torchrun_splits_each_global_batch_of_its_loader(tmp_path, joins):
    """``torchrun script.py`` on a LibMTL script: the Trainer joins the process group (unless the script did),
    trains DDP, and each rank trains on its half of every batch the user's loader draws, so the two processes
    train on the batches one process trains on (batch 4 = 2 + 2), each sample once an epoch."""
    root = write_nyuv2(tmp_path / "nyuv2", n_train=8, n_val=8, size=(16, 16))
    mp.spawn(libmtl_worker, args=(2, free_port(), str(root), str(tmp_path), joins, None), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"libmtl{r}.pt", weights_only=False) for r in range(2)]
    single = libmtl_script(root)
    assert single["sizes"] == [4] * 4 and not single["ddp"]
    for r, out in enumerate(ranks):
        assert out["ddp"] and out["sizes"] == [2] * 4
        assert out["seen"] == [i for k in range(4) for i in single["seen"][4 * k:4 * k + 4][r::2]]
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])


def test_a_libmtl_loader_with_its_own_distributed_sampler_is_kept_and_told_the_epoch(tmp_path):
    """A loader that already splits the data (a DistributedSampler: per-rank batch = its batch_size) is used as it
    is, with ``set_epoch`` called every epoch, as a torch training loop does (each epoch another order)."""
    root = write_nyuv2(tmp_path / "nyuv2", n_train=8, n_val=8, size=(16, 16))
    mp.spawn(libmtl_worker, args=(2, free_port(), str(root), str(tmp_path), True, "distributed"), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"libmtl{r}.pt", weights_only=False) for r in range(2)]
    for out in ranks:
        assert out["ddp"] and out["sizes"] == [4, 4]  # 4 samples a rank an epoch, batch 4, two epochs
        assert out["seen"][:4] != out["seen"][4:]
    for epoch in range(2):
        assert sorted(ranks[0]["seen"][4 * epoch:4 * epoch + 4] + ranks[1]["seen"][4 * epoch:4 * epoch + 4]) \
            == list(range(8))


def libmtl_failed_write_worker(rank, world, port, root, folder):
    join_with_timeout(rank, world, port)
    write_outcome(os.path.join(folder, f"libmtl_write{rank}.txt"),
                  lambda: libmtl_script(root, epochs=1, save_path=os.path.join(folder, "save")), "finished")
    leave_group()


def test_a_libmtl_scripts_weights_rank_0_cannot_write_stop_every_rank_with_its_message(tmp_path):
    """The Trainer's model.pt, as its checkpoints: when rank 0 cannot write it, every rank raises the WriteError
    (the other rank went on into test(), whose metrics' sync waited for rank 0 until gloo gave up)."""
    root = write_nyuv2(tmp_path / "nyuv2", n_train=8, n_val=8, size=(16, 16))
    (tmp_path / "save" / "model.pt").mkdir(parents=True)  # a folder where the weights file should be
    mp.spawn(libmtl_failed_write_worker, args=(2, free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"libmtl_write{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("WriteError: could not write") and "model.pt" in outcomes[0]
    assert outcomes[0].endswith(" [every rank]")


class Draws(Dataset):
    """Sample ``i``: ``(i, a number drawn from torch's global RNG)``, as a user's own augmentation draws."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([float(i), float(torch.rand(()))])


def workers_worker(rank, world, port, folder):
    join_group(rank, world, port)
    torch.manual_seed(0)
    loader = DataLoader(Draws(), batch_size=4, shuffle=True, num_workers=1, multiprocessing_context="fork")
    data = LoaderData(loader, Draws(), Draws())
    batches = [batch.tolist() for epoch in range(2) for batch in data.batches(data.train, key=(0, epoch))]
    torch.save(batches, os.path.join(folder, f"workers{rank}.pt"))
    dist.destroy_process_group()


def test_loader_workers_draw_each_ranks_own_augmentations(tmp_path):
    """A user's dataset drawing its augmentation in the loader's workers: every rank's workers would be seeded alike
    (from the ranks' alike RNGs), so the k-th sample of every rank's share would draw alike; the seed is folded
    with the rank."""
    mp.spawn(workers_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"workers{r}.pt", weights_only=False) for r in range(2)]
    assert [len(batch) for batch in ranks[0]] == [len(batch) for batch in ranks[1]] == [2] * 4
    for step in range(4):
        first, second = ranks[0][step], ranks[1][step]
        assert not {i for i, _ in first} & {i for i, _ in second}
        assert [d for _, d in first] != [d for _, d in second], f"step {step}: both ranks drew alike"


def test_a_libmtl_batch_the_processes_do_not_divide_is_refused_before_training(tmp_path, monkeypatch):
    root = write_nyuv2(tmp_path / "nyuv2", n_train=8, n_val=8, size=(16, 16))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"^the batch of 3 cannot be split evenly over 2 processes; choose a batch "
                                         r"divisible by 2$"):
        libmtl_script(root, batch_size=3)


@pytest.mark.parametrize("loader, message", [
    (DataLoader(Draws(), batch_size=None), r"^train_dataloaders cannot be split over 2 processes: it does not draw "
                                           r"batches of sample indices \(an iterable dataset, or batch_size=None\)"),
    (DataLoader(Draws(), batch_size=2, sampler=torch.utils.data.DistributedSampler(Draws(), num_replicas=4, rank=1)),
     r"^train_dataloaders' DistributedSampler splits the data for rank 1 of 4 processes, but this is rank 0 of 2$"),
])
def test_a_libmtl_loader_the_processes_cannot_split_is_refused(monkeypatch, loader, message):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=message):
        LoaderData(loader, Draws(), Draws())
