"""Datasets of the five dense tasks (S segmentation, D depth, E semantic edges, N normals, A autoencoder), and a
user's own data in a folder layout with declared tasks (:mod:`mtsl_plugin.data.folder`).

Every dataset yields ``(image, targets)``: ``image`` float32 ``(3, H, W)`` in [0, 1] and ``targets`` a dict
from task letter to tensor, for the letters in the dataset's ``tasks``:

- ``S`` int64 ``(H, W)``, class index in ``[0, num_classes)`` or -1 (ignore);
- ``D`` float32 ``(1, H, W)``, depth (metres; Cityscapes: the layout's inverse depth), 0 = invalid;
- ``E`` float32 ``(1, H, W)`` in {0, 1}, semantic edges from the labels (:func:`semantic_edges`);
- ``N`` float32 ``(3, H, W)``, unit normals in the camera frame, zero vector = invalid;
- ``A`` float32 ``(3, H, W)``, the image itself.

Datasets also carry ``tasks``, ``num_classes``, ``class_names``, ``height`` and ``width``. Folder data returns its
declared tasks' targets in their layouts (:data:`mtsl_plugin.tasks.TARGET_LAYOUTS`) and has ``num_classes`` 0
(each segmentation task declares its classes).
:func:`build_dataset` is the one factory the CLI and the tests use.
"""
from __future__ import annotations

from typing import Mapping

from torch.utils.data import Dataset

from mtsl_plugin.data.common import TASK_ORDER, semantic_edges
from mtsl_plugin.data.folder import FolderDataset, TargetFiles
from mtsl_plugin.data.real import Cityscapes, NYUv2
from mtsl_plugin.data.synthetic import SyntheticScenes

DATASETS: tuple[str, ...] = ("synthetic", "nyuv2", "cityscapes", "folder")
SPLITS: tuple[str, ...] = ("train", "val", "test")

__all__ = ["DATASETS", "SPLITS", "TASK_ORDER", "Cityscapes", "FolderDataset", "NYUv2", "SyntheticScenes",
           "TargetFiles", "build_dataset", "semantic_edges"]


def build_dataset(name: str, split: str, *, root: str | None = None, height: int | None = None,
                  width: int | None = None, n: int | None = None, seed: int = 0, augment: bool = False,
                  targets: Mapping[str, TargetFiles] | None = None, progress: bool = True) -> Dataset:
    """Build dataset ``name`` (one of :data:`DATASETS`) for ``split`` (one of :data:`SPLITS`).

    Args:
        name: "synthetic", "nyuv2", "cityscapes" (7 classes; build :class:`Cityscapes` directly for 19) or "folder".
        split: "train", "val" or "test". Synthetic splits are disjoint random streams of ``seed``;
            the real layouts have no test folder, so "test" reads "val".
        root: folder of a real dataset (required for "nyuv2", "cityscapes" and "folder", ignored otherwise).
        height, width: output size in pixels; synthetic defaults to 64 x 64, real datasets keep their stored
            size unless both are given.
        n: number of samples: required for "synthetic"; for real datasets, keep only the first ``n``.
        seed: base seed of the synthetic scenes (real datasets are fixed files and ignore it).
        augment: real datasets only: random zoom and flip of every sample (training data); the synthetic scenes
            are drawn anew for every sample and are not augmented.
        targets: "folder" only (required there): task name -> :class:`TargetFiles` (layout, sub-folder, channels).
        progress: synthetic only: a bar while the scenes are rendered (on a terminal).

    Returns:
        A ``torch.utils.data.Dataset`` of ``(image, targets)`` samples.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose from {DATASETS}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {SPLITS}.")
    if name == "synthetic":
        if n is None:
            raise ValueError("Dataset 'synthetic' needs n, the number of samples to generate.")
        return SyntheticScenes(n, 64 if height is None else height, 64 if width is None else width, seed, split=split,
                               progress=progress)
    if root is None:
        raise ValueError(f"Dataset {name!r} needs root, the folder holding its train/ and val/ folders.")
    if name == "folder":
        if targets is None:
            raise ValueError("Dataset 'folder' needs targets: the layout and sub-folder of every task.")
        return FolderDataset(root, split, targets, height, width, n=n, augment=augment)
    if name == "nyuv2":
        return NYUv2(root, split, height, width, n=n, augment=augment)
    return Cityscapes(root, split, height, width, n=n, augment=augment)
