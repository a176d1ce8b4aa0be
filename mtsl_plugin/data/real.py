"""NYUv2 and Cityscapes in the preprocessed ``.npy`` layouts of the MTAN / LibMTL examples.

Layout (one ``.npy`` file per sample and task, integer file names, not necessarily contiguous, read in numeric
order; a name is taken as it is, so ``0007.npy`` is sample 7 and must have that name in every folder, and two names
of one number, ``7.npy`` and ``07.npy``, are refused)::

    root/{train,val}/image/{i}.npy      (H, W, 3) float in [0, 1]
    root/{train,val}/<label>/{i}.npy    (H, W) class index, -1 = ignore
    root/{train,val}/depth/{i}.npy      (H, W, 1), 0 = invalid
    root/{train,val}/normal/{i}.npy     (H, W, 3) in [-1, 1]       (NYUv2 only)

These layouts ship only ``train`` and ``val``; the ``test`` split reads the ``val`` folder.
Files are read lazily, one sample per ``__getitem__``. With ``augment=True`` (the training data MTSL learns from,
never the held-out slice or the test split) every sample is randomly zoomed and flipped (:func:`augment_sample`).
"""
from __future__ import annotations

import re
from contextvars import ContextVar
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from mtsl_plugin import distributed
from mtsl_plugin.data.common import (IGNORE_INDEX, RESIZE_BY_LAYOUT, normalize_normals, ordered_tasks, resize_depth,
                                     resize_image, resize_labels, resize_normals, semantic_edges)
from mtsl_plugin.learner.schedule import require

#: the folder each split is read from (the ``.npy`` layouts keep their test images in ``val/``)
SPLIT_FOLDERS: dict[str, str] = {"train": "train", "val": "val", "test": "val"}

NYUV2_CLASSES: tuple[str, ...] = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture",
                                  "sofa", "table", "tv", "wall", "window")
"""The 13-class NYUv2 labelling (Couprie et al. 2013), in index order."""

CITYSCAPES_CLASSES: dict[int, tuple[str, ...]] = {
    7: ("flat", "construction", "object", "nature", "sky", "human", "vehicle"),
    19: ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
         "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
}
"""Cityscapes class names: the 7 categories (void excluded) and the 19 evaluation (train-id) classes."""

_INDEX_NAME = re.compile(r"^(\d+)\.npy$")


ZOOMS: tuple[float, ...] = (1.0, 1.2, 1.5)
"""Zoom factors of the training augmentation (those of LibMTL's NYUv2 example)."""


#: How the zoom and mirror of :func:`augment_sample` treat the built-in targets (their target layouts).
LETTER_LAYOUTS: dict[str, str] = {"S": "labels", "D": "dense", "N": "normals"}


#: The key of the sample being read through :class:`SampleDraws` (``None`` outside one).
_SAMPLE_KEY: ContextVar[tuple[int, ...] | None] = ContextVar("sample_key", default=None)


class SampleDraws(Dataset):
    """``dataset`` whose sample ``i`` draws its augmentation window (:func:`random_window`) from a generator
    seeded with ``(*key, i)``. A run's training loaders (:class:`~mtsl_plugin.data.run_data.RunData`) read
    through one keyed by the run's seed and the epoch, so a sample of an epoch is augmented alike whichever process
    reads it: the main process or a loader's worker (any number of them), any rank of a torchrun job (whose shares
    hold other samples, so the ranks' windows differ), a run resumed from a checkpoint. The global RNG is left
    alone."""

    def __init__(self, dataset: Dataset, key: Iterable[int]):
        self.dataset, self.key = dataset, tuple(int(k) for k in key)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        token = _SAMPLE_KEY.set((*self.key, int(index)))
        try:
            return self.dataset[index]
        finally:
            _SAMPLE_KEY.reset(token)


def sample_generator(key: tuple[int, ...]) -> torch.Generator:
    """The generator a sample read through :class:`SampleDraws` draws its window from, ``key`` = ``(*key, index)``.
    Its stream is set apart (``spawn_key``) from the loader's shuffle, seeded from the loader's key: ``SeedSequence``
    pads short entropy with zeros, so ``(seed, 0, epoch)`` and sample 0's ``(seed, 0, epoch, 0)`` seeded alike."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key, spawn_key=(1,)).generate_state(1)[0]))


def random_window(hw: tuple[int, int]) -> tuple[float, int, int, bool]:
    """A random ``(zoom, top, left, flip)`` for :func:`augment_sample` on an image of size ``hw`` (one per sample).

    Read through :class:`SampleDraws` (a run's training data) it is drawn from the sample's own generator.
    Otherwise (a loader of yours, e.g. for :class:`mtsl_plugin.Trainer`) it is drawn from torch's global RNG (a
    run's checkpoints carry it, so a resumed run draws the same; in a loader's workers, the worker's RNG, which
    torch seeds from the loader's generator). Under ``torch.distributed`` every rank's global RNG is alike (seeded
    alike, drawing alike; a checkpoint keeps rank 0's and every rank resumes it), so drawn from it alone the k-th
    sample of every rank's share would get the same window: 1/N of one process's variety. There one number is
    drawn from it instead (alike on every rank, keeping the ranks' streams alike and resumable) and the window
    from a generator seeded with that number and the rank."""
    generator = None
    if (key := _SAMPLE_KEY.get()) is not None:
        generator = sample_generator(key)
    elif distributed.world_size() > 1:
        generator = distributed.rank_generator(torch.randint(1 << 62, ()))
    zoom = ZOOMS[int(torch.randint(len(ZOOMS), (), generator=generator))]
    top = int(torch.randint(hw[0] - window_side(hw[0], zoom) + 1, (), generator=generator))
    left = int(torch.randint(hw[1] - window_side(hw[1], zoom) + 1, (), generator=generator))
    return zoom, top, left, bool(torch.rand((), generator=generator) < 0.5)


def window_side(side: int, zoom: float) -> int:
    """The side of the window a zoom of ``zoom`` crops from an image side of ``side`` pixels (at least one)."""
    return max(1, int(side / zoom))


def augment_sample(image: torch.Tensor, targets: dict[str, torch.Tensor], zoom: float, top: int, left: int,
                   flip: bool, layouts: dict[str, str] | None = None,
                   inverse_depth: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Zoom into the window of ``1/zoom`` of the height and width at (``top``, ``left``), resize it back to the
    full size, and mirror it left-right when ``flip``: image ``(3, H, W)`` and every target, resized by its layout
    (``layouts``: task -> ``labels`` ``(H, W)``, ``binary`` ``(1, H, W)``, ``dense`` ``(C, H, W)``, ``normals``
    ``(3, H, W)``; default :data:`LETTER_LAYOUTS`, the real data sets' S, D, N). Mirroring negates the normals' x
    component (a mirrored surface faces the other way; copying the mirrored map alone would not). With the default
    layouts, zooming in brings the scene closer, so depth ``D`` is divided by ``zoom``, or multiplied by it where
    ``inverse_depth`` (``D`` stores inverse depth, as Cityscapes' layout does); other values are kept."""
    h, w = image.shape[-2:]
    ch, cw = window_side(h, zoom), window_side(w, zoom)
    window = (slice(top, top + ch), slice(left, left + cw))
    image = resize_image(image[:, window[0], window[1]], h, w)
    layout_of = LETTER_LAYOUTS if layouts is None else layouts
    resize = {**RESIZE_BY_LAYOUT, **({"dense": resize_depth} if layouts is None else {})}  # depth: 0 = invalid
    out = {t: resize[layout_of[t]](v[..., window[0], window[1]], h, w) for t, v in targets.items()}
    if layouts is None and "D" in out:
        out["D"] = out["D"] * zoom if inverse_depth else out["D"] / zoom
    if flip:
        image = image.flip(-1)
        out = {t: v.flip(-1) for t, v in out.items()}
        for t, v in out.items():
            if layout_of[t] == "normals":
                out[t] = v * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return image, out


def image_from_array(array: np.ndarray, path: Path) -> torch.Tensor:
    """An image file's ``(H, W, 3)`` array (uint8, or float in [0, 1]) as a float32 ``(3, H, W)`` tensor in [0, 1];
    other values, and an empty image (no pixel), raise ``ValueError`` naming ``path``."""
    if array.size == 0:
        raise ValueError(f"Image file {path} holds no pixel (shape {array.shape}).")
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < -1e-3 or array.max() > 1.0 + 1e-3:
        raise ValueError(f"Image file {path} has values outside [0, 1] (min {array.min()}, max {array.max()}).")
    return torch.from_numpy(np.clip(array, 0.0, 1.0)).permute(2, 0, 1).contiguous()


def labels_from_array(array: np.ndarray, path: Path, classes: int, owner: str, ignore: int | None = None
                      ) -> torch.Tensor:
    """A label file's ``(H, W)`` array as int64 class indices, negative or non-finite values (and ``ignore``, e.g.
    255 in PNG files) as -1; a class ``>= classes`` raises ``ValueError`` naming ``path`` and ``owner`` (who has
    that many classes, e.g. ``"NYUv2 has"``), and so does a finite value that is not a whole number (float files
    may store classes as 2.0, but 2.4 is a soft or bilinearly resized map, not a class)."""
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        rounded = np.rint(np.where(finite, array, 0))
        off = finite & (np.abs(array - rounded) > 1e-6)
        if off.any():
            raise ValueError(f"Label file {path} holds non-integer values such as {array[off][0]:g} "
                             f"({int(off.sum())} pixel(s)), but a label is a whole class index (a soft or "
                             "bilinearly resized label map?).")
        array = np.where(finite, rounded, IGNORE_INDEX)
    labels = array.astype(np.int64)
    labels[labels < 0] = IGNORE_INDEX
    if ignore is not None:
        labels[labels == ignore] = IGNORE_INDEX
    if labels.max() >= classes:
        raise ValueError(f"Label file {path} holds class {labels.max()}, but {owner} {classes} classes "
                         f"(ignore: {'-1' if ignore is None else f'{ignore} or -1'}).")
    return torch.from_numpy(labels)


def read_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load(path)``; a file that is not a readable ``.npy`` array (an ``.npz`` archive renamed too, which
    ``np.load`` opens as an archive of arrays) raises ``ValueError`` naming it."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"File {path} cannot be read as a .npy array: {reason}") from None
    if not isinstance(array, np.ndarray):  # an NpzFile: close it, it holds the file open
        array.close()
        raise ValueError(f"File {path} cannot be read as a .npy array: it is an .npz archive (np.savez) of "
                         f"{len(array.files)} array(s); save each sample's array with np.save")
    return array


def check_read_options(owner: str, split: str, splits: Iterable[str], height: int | None, width: int | None,
                       n: int | None) -> None:
    """Refuse, in one sentence naming ``owner`` (the data set), a split outside ``splits``, a side that is not an
    integer >= 1, a sample count ``n`` that is not one >= 0 (each may be ``None``), and a size given by one side."""
    if split not in splits:
        raise ValueError(f"Unknown {owner} split {split!r}; choose from {tuple(splits)}.")
    for what, value, least in (("height", height, 1), ("width", width, 1), ("n", n, 0)):
        require(f"{owner} {what}", value, int, least=least, optional=True)
    if (height is None) != (width is None):
        raise ValueError(f"{owner} needs both height and width to resize, or neither; got {height}x{width}.")


class NpyLayoutDataset(Dataset):
    """Shared reader of the one-file-per-sample-and-task ``.npy`` layout; subclasses name the folders.

    Args:
        root: dataset root holding ``train/`` and ``val/``.
        split: "train", "val" or "test" (= the ``val`` folder).
        folders: target letter → sub-folder name, for those of S, D, N the dataset has.
        class_names: names of the classes of ``S``, in index order.
        height, width: output size; both ``None`` keeps the stored size (all samples must then share it).
        n: keep only the first ``n`` samples (in numeric file order); ``None`` keeps all.
        edge_radius: neighbourhood radius of the ``E`` target derived from the labels.
        augment: zoom and flip every sample at random (:func:`augment_sample`, with a window of
            :func:`random_window`: a run's own draws, alike in any process that reads the sample).
    """

    #: Whether the layout's ``D`` is inverse depth (larger for nearer points), which a zoom multiplies.
    inverse_depth = False

    def __init__(self, root: str | Path, split: str, folders: dict[str, str], class_names: tuple[str, ...],
                 height: int | None = None, width: int | None = None, n: int | None = None,
                 edge_radius: int = 1, augment: bool = False) -> None:
        name = type(self).__name__
        check_read_options(name, split, SPLIT_FOLDERS, height, width, n)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{name} root folder {root} {'is a file' if root.exists() else 'does not exist'}.")
        self.split, self.root = split, root
        self.split_dir = root / SPLIT_FOLDERS[split]
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"{name} split folder {self.split_dir} does not exist.")
        self.folders = {"image": "image", **folders}
        self.names = self._discover(self.split_dir / "image")  # sample number -> its file name
        self.indices = list(self.names)
        for folder in self.folders.values():
            self._check_folder(self.split_dir / folder)
        self.class_names = class_names
        self.num_classes = len(class_names)
        require(f"{name} edge_radius", edge_radius, int, 1)  # checked here, not at the first sample read
        self.edge_radius = edge_radius
        self.augment = augment
        has = set(folders) | {"A"} | ({"E"} if "S" in folders else set())
        self.tasks = ordered_tasks(has)
        self.resize = height is not None
        if self.resize:
            self.height, self.width = height, width
        else:
            shape = read_npy(self._path("image", self.indices[0]), mmap_mode="r").shape
            self.height, self.width = int(shape[0]), int(shape[1])
        if n is not None:
            self.indices = self.indices[:n]

    @staticmethod
    def _numbered(folder: Path) -> dict[int, str]:
        """Sample number -> file name of the ``<integer>.npy`` files in ``folder`` (names as they are, e.g.
        ``0007.npy``), sorted numerically; two names of one number (``7.npy`` and ``07.npy``) raise ``ValueError``
        naming both."""
        names: dict[int, str] = {}
        for path in sorted(folder.iterdir()):
            if match := _INDEX_NAME.match(path.name):
                number = int(match.group(1))
                if number in names:
                    raise ValueError(f"{folder} holds two files for sample {number}: {names[number]} and "
                                     f"{path.name}.")
                names[number] = path.name
        return dict(sorted(names.items()))

    @classmethod
    def _discover(cls, folder: Path) -> dict[int, str]:
        """The samples of the image ``folder``: number -> file name (:meth:`_numbered`), sorted numerically."""
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder {folder} does not exist.")
        names = cls._numbered(folder)
        if not names:
            raise FileNotFoundError(f"Image folder {folder} holds no files named <integer>.npy.")
        return names

    def _check_folder(self, folder: Path) -> None:
        """Raise if ``folder`` is missing, lacks the file of one of the indexed samples (named as in the image
        folder), holds a sample the image folder lacks (it would be dropped without a word, as a half-copied image
        folder drops its samples) or holds two names of one number."""
        if not folder.is_dir():
            raise FileNotFoundError(f"{type(self).__name__} sub-folder {folder} does not exist.")
        present = self._numbered(folder)
        missing = [self.names[i] for i in self.indices if present.get(i) != self.names[i]]
        if missing:
            raise FileNotFoundError(f"{type(self).__name__} file {folder / missing[0]} does not exist "
                                    f"({len(missing)} sample(s) missing in that folder).")
        orphans = [name for i, name in present.items() if i not in self.names]
        if orphans:
            raise FileNotFoundError(f"{type(self).__name__} file {folder / orphans[0]} has no image: "
                                    f"{self.split_dir / self.folders['image']} holds no file of its number "
                                    f"({len(orphans)} file(s) without an image in that folder).")

    def _path(self, key: str, index: int) -> Path:
        return self.split_dir / self.folders[key] / self.names[index]

    def _load(self, key: str, index: int, channels: int | None, hw: tuple[int, int] | None) -> np.ndarray:
        """Load one file as ``(H, W, C)`` (``channels`` given) or ``(H, W)``, checking its shape against ``hw``."""
        path = self._path(key, index)
        array = read_npy(path)
        if channels is None and array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if channels is not None and array.ndim == 2 and channels == 1:
            array = array[..., None]
        want = 2 if channels is None else 3
        if array.ndim != want or (channels is not None and array.shape[-1] != channels):
            layout = "(H, W)" if channels is None else f"(H, W, {channels})"
            raise ValueError(f"File {path} has shape {array.shape}, expected {layout}.")
        if hw is not None and array.shape[:2] != hw:
            raise ValueError(f"File {path} has spatial size {array.shape[:2]}, but the sample's image is {hw}.")
        return array

    def _image(self, index: int) -> torch.Tensor:
        return image_from_array(self._load("image", index, 3, None), self._path("image", index))

    def _labels(self, index: int, hw: tuple[int, int]) -> torch.Tensor:
        return labels_from_array(self._load("S", index, None, hw), self._path("S", index), self.num_classes,
                                 f"{type(self).__name__} has")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(image (3, H, W), targets)`` with the targets of :attr:`tasks` (shapes as in the package docs)."""
        index = self.indices[item]
        image = self._image(index)
        hw = tuple(image.shape[1:])
        if not self.resize and hw != (self.height, self.width):
            raise ValueError(f"File {self._path('image', index)} is {hw}, but this dataset's samples are "
                             f"{(self.height, self.width)}; pass height and width to resize.")
        h, w = self.height, self.width
        targets: dict[str, torch.Tensor] = {}  # at the stored size first
        if "S" in self.folders:
            targets["S"] = self._labels(index, hw)
        if "D" in self.folders:
            depth = self._load("D", index, 1, hw).astype(np.float32)
            depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
            targets["D"] = torch.from_numpy(depth).permute(2, 0, 1).contiguous()
        if "N" in self.folders:
            normals = self._load("N", index, 3, hw).astype(np.float32)
            targets["N"] = normalize_normals(torch.from_numpy(normals).permute(2, 0, 1))
        if self.augment:
            image, targets = augment_sample(image, targets, *random_window(hw), inverse_depth=self.inverse_depth)
        resize = {"S": resize_labels, "D": resize_depth, "N": resize_normals}
        targets = {t: resize[t](v, h, w) for t, v in targets.items()}
        if "S" in targets:
            targets["E"] = semantic_edges(targets["S"], self.edge_radius)
        image = resize_image(image, h, w)
        targets["A"] = image.clone()
        return image, {t: targets[t] for t in self.tasks}


class NYUv2(NpyLayoutDataset):
    """NYUv2 (13 classes) in the LibMTL / MTAN layout with targets S, D (metres), E, N, A.

    Normals are re-normalised to unit length on load; vectors of (near) zero length are invalid (0).
    """

    def __init__(self, root: str | Path, split: str = "train", height: int | None = None, width: int | None = None,
                 n: int | None = None, edge_radius: int = 1, augment: bool = False) -> None:
        super().__init__(root, split, {"S": "label", "D": "depth", "N": "normal"}, NYUV2_CLASSES,
                         height, width, n, edge_radius, augment)


class Cityscapes(NpyLayoutDataset):
    """Cityscapes in the MTAN layout with targets S (``label_7`` or ``label_19``), D, E, A.

    ``D`` is returned exactly as that layout stores it: an inverse-depth (disparity-derived) value,
    larger for nearer points, 0 where invalid. It is *not* converted to metres, because the layout
    does not carry the camera constants; depth metrics on it are therefore in the layout's units. The training
    augmentation's zoom multiplies it (a nearer scene), where it divides NYUv2's metres.
    """

    inverse_depth = True

    def __init__(self, root: str | Path, split: str = "train", height: int | None = None, width: int | None = None,
                 num_classes: int = 7, n: int | None = None, edge_radius: int = 1, augment: bool = False) -> None:
        if num_classes not in CITYSCAPES_CLASSES:
            raise ValueError(f"Cityscapes num_classes must be one of {tuple(CITYSCAPES_CLASSES)}, got {num_classes}.")
        super().__init__(root, split, {"S": f"label_{num_classes}", "D": "depth"}, CITYSCAPES_CLASSES[num_classes],
                         height, width, n, edge_radius, augment)
