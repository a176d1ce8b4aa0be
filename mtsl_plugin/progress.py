"""Progress bars over data loaders that iterate each loader once.

``tqdm.auto``'s bar (its asyncio variant) calls ``iter()`` on what it wraps when it is made, and the loop calls it
again. For a ``DataLoader`` with workers that starts a second set of worker processes, which the bar keeps, with
the batches they prefetched, until the loop ends. :func:`each_batch` iterates the loader itself and only updates
the bar (``tqdm.auto`` still: a notebook gets its widget, a terminal its text bar).

The throw-away iterator drew one number, the seed of its workers, from the loader's generator (from torch's global
RNG when the loader has none). That draw moves the shuffle that follows and the global stream, and every result
measured so far includes it, so :func:`each_batch` still draws it: a run draws as it did, and a loader with
workers draws as one without (unless its workers persist, whose iterators are made once and reset).
"""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

T = TypeVar("T")


def each_batch(loader: Iterable[T], desc: str, progress: bool = True) -> Iterator[T]:
    """``loader``'s batches under a transient progress bar (none when ``progress`` is False or the output is not a
    terminal), iterating ``loader`` once. A ``DataLoader``'s seed source (its ``shared_generator`` when it has one,
    :class:`~mtsl_plugin.distributed.RankShares`, else its ``generator``) first gives up the number the throw-away
    iterator drew (module docstring)."""
    if isinstance(loader, DataLoader):
        torch.empty((), dtype=torch.int64).random_(generator=getattr(loader, "shared_generator", loader.generator))
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length
        total = None
    return _counted(loader, tqdm(total=total, desc=desc, leave=False, disable=None if progress else True))


def _counted(loader: Iterable[T], bar: tqdm) -> Iterator[T]:
    with bar:
        for batch in loader:
            yield batch
            bar.update()
