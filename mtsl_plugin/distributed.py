"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``): one process per device, the
model replicated and wrapped in ``DistributedDataParallel``, each rank training on its share of every global
batch.

What this module holds is plain: who we are (:func:`rank`, :func:`world_size`), starting the process group from
torchrun's environment (:func:`init_from_env`), sharding a global batch order (:func:`shard_batches`; a user's
loader: :class:`RankShares`) and an evaluation set (:func:`shard_samples`, :func:`own_batches`), and
keeping replicas identical through structural edits (:func:`check_structure`, :func:`broadcast_module`,
:func:`check_replicas`).
Without a process group every function is the single-process identity, so the rest of the code calls them
unconditionally.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def on_every_rank(exc: E) -> E:
    """``exc``, marked as raised alike on every rank at the same point of the run (after the ranks agreed on it),
    so that they can go on together, e.g. with the next run of a sweep (:func:`raised_on_every_rank`)."""
    exc.on_every_rank = True
    return exc


def raised_on_every_rank(exc: BaseException) -> bool:
    """Whether every rank raised ``exc`` together (:func:`on_every_rank`); always true in one process."""
    return not active() or getattr(exc, "on_every_rank", False)


def barrier() -> None:
    if active():
        dist.barrier()


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started several processes for this job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment): gloo on CPU, NCCL on
    CUDA with one GPU per rank (``LOCAL_RANK``). Returns the device this rank trains on (``cuda:<local rank>``
    on CUDA). A single process is left alone."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def per_rank_batch(batch_size: int) -> int:
    """The batch each rank trains on: the global batch split evenly; a batch the ranks do not divide is refused."""
    size = world_size()
    if batch_size % size:
        raise ValueError(f"the batch of {batch_size} cannot be split evenly over {size} processes; choose a "
                         f"batch divisible by {size}")
    return batch_size // size


def shard_batches(batches: Sequence[Sequence[int]]) -> list[list[int]]:
    """This rank's part of each global batch (sample indices): rank ``r`` of ``n`` takes positions ``r, r + n,
    ...``, so the ranks' parts of one step together are that step's global batch."""
    size, me = world_size(), rank()
    return [list(batch[me::size]) for batch in batches]


class GlobalBatchShards(Sampler[list[int]]):
    """This rank's share of every batch of a user's ``batch_sampler``: the global batches are rank 0's (every
    rank draws its own, so the ranks' RNGs stay alike, and takes rank 0's, so ranks seeded differently still
    split one order), each cut to a multiple of the number of processes (a last, partial batch; every rank gets
    as many samples and none an empty batch) and split as :func:`shard_batches` splits ours."""

    def __init__(self, batch_sampler: Iterable[list[int]]):
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:  # the progress bar's; one over when a last batch under N samples is dropped
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:  # a generator: the user's sampler draws when the loader's does
        size = world_size()
        batches = broadcast_object([list(batch) for batch in self.batch_sampler])
        batches = [batch[:len(batch) - len(batch) % size] for batch in batches]
        yield from shard_batches([batch for batch in batches if batch])


#: What :class:`RankShares` keeps of the user's training loader (all but its sampling and its workers' seeds).
LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                  "prefetch_factor", "persistent_workers")


class RankShares(DataLoader):
    """A user's training loader as one rank of a ``torch.distributed`` job iterates it: its dataset, collate_fn and
    workers, over this rank's share of every batch it draws (:class:`GlobalBatchShards`). Every iteration first
    draws what iterating the user's loader draws first, the seed of its workers (from its ``generator``, else
    the global RNG: the ranks' streams stay alike and a checkpoint resumes them), and folds the rank into it, so
    the workers augment each rank's samples in their own way (ranks seeded alike would give the k-th sample of
    every share the same draws; :func:`~mtsl_plugin.data.real.random_window` does the same in the main process)."""

    def __init__(self, loader: DataLoader):
        super().__init__(loader.dataset, batch_sampler=GlobalBatchShards(loader.batch_sampler),
                         **{name: getattr(loader, name) for name in LOADER_OPTIONS})
        self.shared_generator = loader.generator

    def __iter__(self):
        self.generator = rank_generator(torch.empty((), dtype=torch.int64).random_(generator=self.shared_generator))
        return super().__iter__()


def rank_generator(shared: int | torch.Tensor) -> torch.Generator:
    """A generator of this rank's own, seeded with ``shared`` (a number drawn alike on every rank, so their streams
    stay alike and a checkpoint resumes them) and the rank folded in."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(shared), rank()]).generate_state(1)[0]))


def shard_samples(dataset: Dataset) -> Dataset:
    """This rank's share of an evaluation set: samples ``r, r + n, ...`` (no sample twice, no padding, shares may
    differ by one). Metrics evaluated on the shares are exact over the whole set because torchmetrics sums their
    states across the ranks in ``compute()``. A set smaller than the number of ranks is not split."""
    size = world_size()
    if size == 1 or len(dataset) < size:
        return dataset
    return Subset(dataset, range(rank(), len(dataset), size))


def own_batches(batches: Iterable[T], count: int) -> Iterator[tuple[int, T]]:
    """This rank's batches of an evaluation loader of ``count`` batches, each with its index in the loader:
    batches ``r, r + n, ...``. Whole batches, so whatever is drawn per batch index (a corruption's seed) or
    computed over a batch (a PGD attack on a batch loss) is what one process does; the metrics are exact over the
    whole set as with :func:`shard_samples`, and a loader of fewer batches than ranks is not split."""
    size, me = world_size(), rank()
    for index, batch in enumerate(batches):
        if count < size or index % size == me:
            yield index, batch


def mean_all(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over the ranks of every tensor (new tensors, same shapes and dtypes), in one all-reduce of their
    flattened concatenation (all tensors on one device), summed in float32 or the widest of their dtypes (float64
    gradients keep their precision; bfloat16 ones are summed in float32)."""
    if not active() or not tensors:
        return list(tensors)
    wide = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    flat = torch.cat([t.detach().reshape(-1).to(wide) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; backward: the sum over the ranks of the gradient for this
    rank's rows (an all-reduce, which every backend has, of the zero-padded gathered gradient)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        count = torch.tensor([rows.shape[0]], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(world_size())]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.start = sizes, sum(sizes[:rank()])
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.sizes[rank()]]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` (n_r, ...) concatenated in rank order, on every rank (shares may differ in size),
    differentiably. When every rank computes the same loss of the gathered rows, the gradient reaching a rank's
    rows is the sum of all ranks' (N times the loss's own), so averaging the resulting parameter gradients
    across the ranks (:func:`mean_all`) gives exactly the gradient one process computes on all the rows."""
    return _GatherRows.apply(rows) if active() else rows


def broadcast_module(module: nn.Module) -> None:
    """Make every rank's parameters and buffers rank 0's (in place)."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def checksum(module: nn.Module) -> str:
    """A hash of the names and shapes of the module's parameters and buffers, and of each one's sum of values
    (in float64; to compare replicas)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float64).sum().numpy().tobytes())
    return digest.hexdigest()


def structure(module: nn.Module) -> str:
    """A hash of the module's parameter and buffer names, shapes and dtypes (not their values)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()


def check_structure(module: nn.Module, when: str) -> None:
    """Fail on every rank, in one sentence, when the ranks' modules hold different parameters or buffers (names,
    shapes, dtypes): :func:`broadcast_module` over them would pair unrelated tensors or wait forever."""
    if not active():
        return
    hashes: list[str | None] = [None] * world_size()
    dist.all_gather_object(hashes, structure(module))
    if len(set(hashes)) > 1:
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise on_every_rank(RuntimeError(f"the processes' networks differ {when}: rank(s) {differ} hold other "
                                         "parameters than rank 0"))


def check_replicas(module: nn.Module, when: str) -> None:
    """Fail loudly when the ranks' replicas differ (their checksums, gathered)."""
    if not active():
        return
    sums: list[str | None] = [None] * world_size()
    dist.all_gather_object(sums, checksum(module))
    if len(set(sums)) > 1:
        raise on_every_rank(RuntimeError(f"the processes' models diverged {when}: checksums {sums}"))


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def fail_together(action: Callable[[], T], errors: type[BaseException] | tuple[type[BaseException], ...]) -> T:
    """``action()`` on every rank, failing on every rank when it fails on one: an exception of ``errors`` raised on
    a rank is raised there as it is and, with its type and message, on every other rank (a rank that went on
    would wait in collectives the failed rank never joins, or pair them with those of the next run of a sweep).
    Rank 0's writes (checkpoints, results) go through it."""
    failure, result = None, None
    try:
        result = action()
    except errors as exc:
        failure = exc
    if active():
        reports: list = [None] * world_size()
        dist.all_gather_object(reports, None if failure is None else (type(failure), str(failure)))
        first = next((r for r in reports if r is not None), None)
        if failure is None and first is not None:
            kind, message = first
            raise on_every_rank(kind(message))
        if failure is not None:
            raise on_every_rank(failure)
    if failure is not None:
        raise failure
    return result
