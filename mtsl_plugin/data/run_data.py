"""The data of one run and how it is batched: :class:`RunData`, what :meth:`mtsl_plugin.trainer.MTLTrainer.fit`
and the structural phases draw their batches from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mtsl_plugin import distributed
from mtsl_plugin.data.real import SampleDraws


def drops_last_batch(samples: int, batch_size: int) -> bool:
    """Whether a training epoch over ``samples`` leaves out its last, partial batch: it does unless the set holds
    under two batches (its one partial batch is then a third of the data or more)."""
    return samples >= 2 * batch_size


def smallest_batch(samples: int, batch_size: int, drop_last: bool, processes: int = 1) -> int:
    """The fewest samples one of ``processes`` processes trains on in a step of a training epoch over ``samples``
    (:meth:`RunData.batches`, which drops the last, partial batch where :func:`drops_last_batch` says so; under
    ``torch.distributed`` each global batch is split evenly, a last, partial one cut to a multiple of
    ``processes`` and left out where that leaves none); 0 when the epoch has no step."""
    sizes = [batch_size] * (samples // batch_size)
    partial = samples % batch_size
    if partial and not drop_last:
        sizes.append(partial - partial % processes)
    sizes = [size // processes for size in sizes if size >= processes]
    return min(sizes) if sizes else 0


@dataclass
class RunData:
    """The data of one run: training set, held-out slice of the training data (for grouping decisions),
    evaluation set, and how to batch them. Batch order depends only on ``seed`` and the key asked for, and so do
    the random augmentations of shuffled (training) batches (:class:`~mtsl_plugin.data.real.SampleDraws`), so
    ``workers``, the number of processes that read and augment samples besides the main one, changes no result;
    ``pin_memory`` puts the batches in page-locked memory (faster copies to a GPU)."""

    train: Dataset
    holdout: Dataset | None
    test: Dataset
    batch_size: int
    seed: int = 0
    workers: int = 0
    pin_memory: bool = False

    def batches(self, dataset: Dataset, key: Sequence[int] | None = None, shard: bool = True) -> DataLoader:
        """A loader over ``dataset``; shuffled with a generator seeded by (seed, *key) when ``key`` is given.

        Under ``torch.distributed`` a shuffled loader gives this rank its share of every global batch
        (:func:`mtsl_plugin.distributed.shard_batches`; the global batches are those of one process, a last
        partial one cut to a multiple of the number of processes), unless ``shard`` is False; unshuffled loaders
        give every rank all of ``dataset`` (the grouping data, decided on rank 0's measurements; the test split is
        sharded before, :func:`mtsl_plugin.distributed.shard_samples`)."""
        generator = None
        if key is not None:
            seed = np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            dataset = SampleDraws(dataset, (self.seed, *key))
        drop_last = key is not None and drops_last_batch(len(dataset), self.batch_size)
        reading = {"num_workers": self.workers, "pin_memory": self.pin_memory}
        if key is None or not shard or distributed.world_size() == 1:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=key is not None, generator=generator,
                              drop_last=drop_last, **reading)
        distributed.per_rank_batch(self.batch_size)  # only its check: a batch the ranks do not divide is refused
        # the order DataLoader(shuffle=True, generator=...) gives one process: its iterator first draws its workers'
        # base seed from the generator, then RandomSampler the permutation (tested against a DataLoader's order)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        steps = len(order) // self.batch_size if drop_last else -(-len(order) // self.batch_size)
        global_batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(steps)]
        # a last, partial batch (kept when the set holds under two batches) is cut to a multiple of the number
        # of processes: every rank trains on as many samples (DDP weighs the ranks' gradients alike) and none on
        # an empty batch; the up to n - 1 samples left out are others every epoch
        size = distributed.world_size()
        global_batches = [batch[:len(batch) - len(batch) % size] for batch in global_batches]
        return DataLoader(dataset, batch_sampler=distributed.shard_batches([b for b in global_batches if b]), **reading)
