"""A user's own data: one file per sample and target in a folder per task, tasks declared in the configuration.

Layout (``<id>`` is any file stem; every task folder holds one file for every image)::

    root/train/image/<id>.png|.jpg|.npy     RGB (a grey, 16-bit grey or palette file too, read as RGB);
                                            .npy: (H, W, 3) float in [0, 1] or uint8
    root/train/<folder>/<id>.png|.npy       one folder per task that reads a file (see below)
    root/val/...                            the same; the test split reads root/test/ when it exists, else val/

What a target file holds follows the task's target layout (:data:`mtsl_plugin.tasks.TARGET_LAYOUTS`):

=========  ====================================================================================================
layout     file
=========  ====================================================================================================
labels     ``(H, W)`` class index: PNG (1-bit, grey, 16-bit, palette indices, or the grey channel of grey+alpha;
           255 = ignore) or .npy (integers, or floats holding whole numbers; negative or NaN = ignore)
binary     ``(H, W)``: PNG (as labels; non-zero = 1) or .npy (> 0.5 = 1; NaN or inf refused: no "no value" here)
dense      .npy ``(H, W)`` or ``(H, W, C)`` float, C the task's channels; NaN or inf = no value at that pixel, and
           under the ``positive`` rule (:class:`TargetFiles`) 0 and negative values too
normals    .npy ``(H, W, 3)`` float or signed integers; re-normalised on load, zero or non-finite = invalid
           (unsigned integers are refused: an 8-bit normal map stores (n + 1) / 2 * 255, decode it first; and
           preflight refuses a split of floats that looks like (n + 1) / 2: map it with 2 * value - 1)
image      no file: the target is the input image (reconstruction)
=========  ====================================================================================================

Every task folder holds one file per image and none without one (a target file whose image is missing is
refused, not skipped); a ``.npy`` file holds bool, integer or float values. An image (or PNG target) whose EXIF
orientation is not 1, as phone photos store it, is refused: its pixels are read as stored, not as shown.

Samples are returned as the other data sets return them (``(image (3, H, W), {task: target})``), resized to
``height`` x ``width`` when both are given (labels and binary maps nearest-neighbour, dense maps and normals
bilinear over their valid pixels, so a "no value" never blends into a value). ``augment`` zooms and mirrors like
the real data sets' augmentation but never changes a value: dense targets whose values depend on scale or direction
(depth, flow) should train without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from mtsl_plugin.data.common import RESIZE_BY_LAYOUT, normalize_normals, resize_image
from mtsl_plugin.data.real import (augment_sample, check_read_options, image_from_array, labels_from_array,
                                   random_window, read_npy)
from mtsl_plugin.learner.schedule import require
from mtsl_plugin.tasks import TARGET_LAYOUTS, VALID_RULES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
TARGET_SUFFIXES = {"labels": (".png", ".npy"), "binary": (".png", ".npy"), "dense": (".npy",),
                   "normals": (".npy",)}
#: the folders each split is read from, the first that exists (``test`` falls back to ``val``)
SPLIT_FOLDER_CHOICES = {"train": ("train",), "val": ("val",), "test": ("test", "val")}
#: 16-bit (and 32-bit integer) grey image modes of PIL, whose own conversion to RGB would clip every value at 255.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I")
#: The EXIF orientation tag, and how each of its values other than 1 (stored upright) turns the stored pixels for
#: display.
EXIF_ORIENTATION = 0x0112
_ORIENTATIONS = {2: "mirrored left to right", 3: "rotated 180 degrees", 4: "mirrored top to bottom",
                 5: "mirrored and rotated 90 degrees", 6: "rotated 90 degrees clockwise",
                 7: "mirrored and rotated 90 degrees", 8: "rotated 90 degrees counter-clockwise"}


def folder_problem(folder: Any) -> str | None:
    """Why ``folder`` cannot be a task's sub-folder (``None`` when it can): it must be a non-empty name or relative
    path (``masks``, ``masks/v2``) inside each split's folder, so every split reads its own files (an absolute path
    or one with ``..`` would read one split's targets for another's images)."""
    if not isinstance(folder, str) or not folder.strip():
        return f"must be a non-empty folder name, got {folder!r}"
    if Path(folder).is_absolute() or ".." in Path(folder).parts:
        return f"must be a folder inside each split's folder (e.g. masks or masks/v2), got {folder!r}"
    return None


@dataclass(frozen=True)
class TargetFiles:
    """Where and how one task's targets are stored: its target ``layout``, its sub-``folder``, its ``channels``
    (the classes of ``labels``, the channels of ``dense``) and, for ``dense``, which values hold a value (the
    task's :attr:`~mtsl_plugin.tasks.Task.valid`): ``"finite"`` (NaN and inf are no value) or ``"positive"`` (0 and
    negative values are no value too, as depth maps store it: the built-in ``D``, a regression declared
    ``valid: positive``). Under ``positive`` those
    values are read as NaN, so resizing and augmenting average only the valid values; the tasks' losses and
    metrics count NaN as no value."""

    layout: str
    folder: str
    channels: int = 1
    valid: str = "finite"

    def __post_init__(self) -> None:
        if self.layout not in TARGET_LAYOUTS:
            raise ValueError(f"TargetFiles layout must be one of {TARGET_LAYOUTS}, got {self.layout!r}.")
        problem = folder_problem(self.folder) if self.layout != "image" else None  # the image layout reads no file
        if problem:
            raise ValueError(f"TargetFiles folder {problem}.")
        if self.valid not in VALID_RULES:
            raise ValueError(f"TargetFiles valid must be one of {VALID_RULES}, got {self.valid!r}.")
        require("TargetFiles channels", self.channels, int, 1)


_NDIMS = {"labels": (2,), "binary": (2,), "dense": (2, 3), "normals": (3,)}
_SHAPES = {"labels": "(H, W)", "binary": "(H, W)", "dense": "(H, W) or (H, W, C)", "normals": "(H, W, 3)"}


class FolderDataset(Dataset):
    """The folder layout of the module docstring.

    Args:
        root: the data set's folder (holding ``train/``, ``val/`` and optionally ``test/``).
        split: "train", "val" or "test".
        targets: task name -> :class:`TargetFiles`, in the order the tasks are returned.
        height, width: output size; both ``None`` keeps the stored size (all samples must then share it).
        n: keep only the first ``n`` samples (in file-name order).
        augment: random zoom and mirror of every sample (:func:`~mtsl_plugin.data.real.augment_sample`, with a
            window of :func:`~mtsl_plugin.data.real.random_window`; values unchanged but the normals' x, which
            mirroring negates).
    """

    def __init__(self, root: str | Path, split: str, targets: Mapping[str, TargetFiles], height: int | None = None,
                 width: int | None = None, n: int | None = None, augment: bool = False) -> None:
        check_read_options("folder data", split, SPLIT_FOLDER_CHOICES, height, width, n)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} {'is a file' if root.exists() else 'does not exist'}.")
        wrong = next((task for task, spec in dict(targets).items() if not isinstance(spec, TargetFiles)), None)
        if wrong is not None:
            raise TypeError(f"folder data: the targets of task {wrong!r} are {dict(targets)[wrong]!r}, not a "
                            "TargetFiles(layout, folder, channels, valid).")
        choices = SPLIT_FOLDER_CHOICES[split]
        folders = [root / name for name in choices if (root / name).is_dir()]
        if not folders:
            raise FileNotFoundError(f"data folder {root} has no {' or '.join(f'{s}/' for s in choices)} folder "
                                    f"for the {split} split.")
        self.split, self.split_dir = split, folders[0]
        self.targets = dict(targets)
        self.tasks = tuple(self.targets)
        self.num_classes = 0  # classes belong to each declared segmentation task
        self.class_names: tuple[str, ...] = ()
        self.augment = augment
        self.images = self._files("image", IMAGE_SUFFIXES)
        self.ids = sorted(self.images)
        self.files = {task: self._files(spec.folder, TARGET_SUFFIXES[spec.layout])
                      for task, spec in self.targets.items() if spec.layout != "image"}
        for task, files in self.files.items():
            self._check_pairs(task, files)
        self.resize = height is not None
        if self.resize:
            self.height, self.width = height, width
        else:
            self.height, self.width = self._image(self.ids[0]).shape[-2:]
        if n is not None:
            self.ids = self.ids[:n]

    def _check_pairs(self, task: str, files: Mapping[str, Path]) -> None:
        """Refuse, naming the first culprit, a sample without a ``task`` file and a ``task`` file without an image
        (its sample would be dropped without a word)."""
        folder, layout = self.split_dir / self.targets[task].folder, self.targets[task].layout
        missing = [i for i in self.ids if i not in files]
        if missing:
            unread = sorted(f.name for f in folder.iterdir() if f.stem == missing[0])
            why = (f"; {unread[0]} is not read: a {layout} target is a {'/'.join(TARGET_SUFFIXES[layout])} file"
                   if unread else "")
            raise FileNotFoundError(f"task {task!r}: {folder} has no file for sample {missing[0]!r} "
                                    f"({len(missing)} sample(s) missing there){why}.")
        orphans = [i for i in files if i not in self.images]
        if orphans:
            raise FileNotFoundError(f"task {task!r}: {files[orphans[0]]} has no image: {self.split_dir / 'image'} "
                                    f"holds no file for sample {orphans[0]!r} ({len(orphans)} target file(s) "
                                    "without an image there).")

    def _files(self, folder: str, suffixes: tuple[str, ...]) -> dict[str, Path]:
        """File stem -> path of the files with one of ``suffixes`` in ``split_dir / folder``; hidden files (a name
        starting with ``.``, such as the ``._<id>.png`` metadata files macOS leaves in copied folders) are not
        samples."""
        path = self.split_dir / folder
        if not path.is_dir():
            raise FileNotFoundError(f"data folder {path} does not exist.")
        files: dict[str, Path] = {}
        for file in sorted(path.iterdir()):
            if file.suffix.lower() in suffixes and not file.name.startswith("."):
                if file.stem in files:
                    raise ValueError(f"{path} holds two files for sample {file.stem!r}: {files[file.stem].name} "
                                     f"and {file.name}.")
                files[file.stem] = file
        if not files:
            others = sorted(f.name for f in path.iterdir() if not f.name.startswith("."))
            held = f" (it holds {len(others)} other file(s), e.g. {others[0]})" if others else ""
            raise FileNotFoundError(f"{path} holds no {'/'.join(suffixes)} file{held}.")
        return files

    @staticmethod
    def _read(path: Path, single_channel: bool = False) -> np.ndarray:
        """A file's array: ``.npy`` as stored (bool, integer or float values; other types raise ``ValueError``
        naming the file); an image file as ``(H, W, 3)`` RGB (a 16-bit grey one scaled to [0, 1], as PIL's own
        conversion would clip it at 255). ``single_channel`` (label and mask files) reads a grey, 16-bit or palette
        file as its ``(H, W)`` values or palette indices instead, a 1-bit one as 0/1 and a grey+alpha one as its
        grey channel; colour ones stay ``(H, W, 3)`` (and are refused by their shape). A file PIL cannot read, or
        refuses as too large (``PIL.Image.MAX_IMAGE_PIXELS``), raises ``ValueError`` naming it, and so does one with
        an EXIF orientation other than 1 (phone photos): PIL reads the stored pixels, while viewers, annotation
        tools (LabelMe, CVAT) and OpenCV show, and label, the image turned as the tag says."""
        if path.suffix.lower() == ".npy":
            array = read_npy(path)
            if array.dtype.kind not in "biuf":  # complex, strings, records, dates: no value to read
                raise ValueError(f"File {path} holds {array.dtype} values; a sample's .npy file holds bool, integer "
                                 "or float values.")
            return array
        from PIL import Image  # torchvision's dependency

        try:
            with Image.open(path) as image:
                orientation = image.getexif().get(EXIF_ORIENTATION)
                if orientation not in (None, 1):
                    turned = _ORIENTATIONS.get(orientation, "turned in a way EXIF does not define")
                    raise ValueError(f"File {path} carries EXIF orientation {orientation}: viewers, annotation tools "
                                     f"and OpenCV show it {turned}, but its pixels are read as stored, so labels "
                                     "made on what they show would not match; save it upright without the tag "
                                     "(e.g. with PIL.ImageOps.exif_transpose) after checking that its labels match "
                                     "the upright image.")
                if single_channel and image.mode == "1":
                    return np.asarray(image).astype(np.uint8)
                if single_channel and image.mode == "LA":
                    return np.asarray(image.getchannel("L"))
                if single_channel and image.mode in ("L", "P", *_WIDE_GREY):
                    return np.asarray(image)
                if image.mode in _WIDE_GREY:
                    return np.repeat(np.asarray(image).astype(np.float32)[..., None] / 65535, 3, axis=-1)
                return np.asarray(image.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as exc:  # the latter: over 2 x PIL's MAX_IMAGE_PIXELS
            raise ValueError(f"File {path} cannot be read as an image: {exc}") from None

    def _image(self, sample: str) -> torch.Tensor:
        path = self.images[sample]
        array = self._read(path)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"Image file {path} has shape {array.shape}, expected (H, W, 3).")
        return image_from_array(array, path)

    def _target(self, task: str, sample: str, hw: tuple[int, int]) -> torch.Tensor:
        spec, path = self.targets[task], self.files[task][sample]
        array = self._read(path, single_channel=spec.layout in ("labels", "binary"))
        if array.ndim == 3 and array.shape[-1] == 1 and spec.layout in ("labels", "binary"):
            array = array[..., 0]
        if (array.ndim not in _NDIMS[spec.layout] or array.shape[:2] != hw
                or (spec.layout == "normals" and array.shape[-1] != 3)):
            raise ValueError(f"task {task!r}: file {path} has shape {array.shape}; a {spec.layout} target of this "
                             f"sample is {_SHAPES[spec.layout]} with (H, W) = {hw}.")
        if spec.layout == "labels":
            return labels_from_array(array, path, spec.channels, f"task {task!r} has",
                                     ignore=255 if path.suffix.lower() == ".png" else None)
        if spec.layout == "binary":
            values = array.astype(np.float32)
            if not np.isfinite(values).all():
                raise ValueError(f"task {task!r}: file {path} holds NaN or inf, but a binary target has no "
                                 "missing value (store 0 or 1).")
            threshold = 0 if path.suffix.lower() == ".png" else 0.5
            return torch.from_numpy((values > threshold).astype(np.float32))[None]
        if spec.layout == "normals" and array.dtype.kind in "bu":  # signed integers re-normalise to their direction
            raise ValueError(f"task {task!r}: file {path} holds {array.dtype} normals, but a normal's components are "
                             "signed: decode an 8-bit normal map (n + 1) / 2 * 255 as n = value / 127.5 - 1.")
        values = array.astype(np.float32)
        if values.ndim == 2:
            values = values[..., None]
        if spec.layout == "dense" and values.shape[-1] != spec.channels:
            raise ValueError(f"task {task!r}: file {path} has {values.shape[-1]} channel(s), the task has "
                             f"{spec.channels}.")
        tensor = torch.from_numpy(values).permute(2, 0, 1).contiguous()
        if spec.layout == "normals":
            return normalize_normals(tensor)
        valid = torch.isfinite(tensor)
        if spec.valid == "positive":  # 0 = no value too: read as NaN, so resizing never averages it in
            valid &= tensor > 0
        return torch.where(valid, tensor, torch.full_like(tensor, float("nan")))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(image (3, H, W), {task: target})`` in the layouts of the module docstring."""
        sample = self.ids[item]
        image = self._image(sample)
        hw = tuple(image.shape[1:])
        if not self.resize and hw != (self.height, self.width):
            raise ValueError(f"File {self.images[sample]} is {hw}, but this data set's samples are "
                             f"{(self.height, self.width)}; give height and width to resize.")
        targets = {task: self._target(task, sample, hw) for task in self.files}
        layouts = {task: self.targets[task].layout for task in targets}
        if self.augment:
            image, targets = augment_sample(image, targets, *random_window(hw), layouts=layouts)
        targets = {t: RESIZE_BY_LAYOUT[layouts[t]](v, self.height, self.width) for t, v in targets.items()}
        image = resize_image(image, self.height, self.width)
        for task, spec in self.targets.items():
            if spec.layout == "image":
                targets[task] = image.clone()
        return image, {t: targets[t] for t in self.tasks}
