"""Perturbed inputs for the robustness benchmark: natural corruptions and PGD attacks (paper MTSL, robustness).

* **Natural corruptions** (Hendrycks & Dietterich, ICLR 2019) from the ``imagecorruptions-imaug`` package: 15
  corruptions in four categories (:data:`CATEGORIES`), each at severities 1-5. :func:`corrupt_images` applies one
  to a batch; the result depends only on the images, the corruption, the severity and the seed. The elastic
  transform is our port of the package's (:func:`elastic_transform`), which warps every image size alike.
* **PGD** (untargeted L∞ projected gradient descent without random start, the iteration count of Kurakin et al.):
  :func:`pgd_attack` raises one task's loss within an ε-ball around the clean images. ε and the step are on the
  0-255 pixel scale (:data:`EPSILONS` are the paper's).

Pure functions: no files, no global state left changed.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

#: The corruption categories and their corruptions (the 15 "common" corruptions of ImageNet-C).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
#: Every corruption name, in category order.
CORRUPTIONS: tuple[str, ...] = tuple(name for names in CATEGORIES.values() for name in names)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: The smallest image side the corruptions accept (pixels).
MIN_SIZE = 32
#: The paper's PGD budgets, on the 0-255 pixel scale.
EPSILONS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
#: The shorter image side at which the package's elastic_transform parameters hold (ImageNet's 224-pixel crops).
ELASTIC_REFERENCE_SIZE = 224
# Corruptions that draw from their own generator (a ``seed`` argument) instead of numpy's global one.
_SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")
# The package's elastic_transform displacement scale (alpha) per severity.
_ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)


def corruptions_package() -> str:
    """The corruptions' package and version, e.g. ``imagecorruptions-imaug 1.1.5`` (reports record it: another
    version may corrupt otherwise)."""
    return f"imagecorruptions-imaug {importlib.metadata.version('imagecorruptions-imaug')}"


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG with ``seed`` inside the block and restore its previous state afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check_corruption(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")


def corrupt_images(images: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """Corrupt every image of a batch with corruption ``name`` at ``severity``.

    Args:
        images: ``(N, 3, H, W)`` floating-point images in [0, 1], ``H, W >= 32`` pixels (smaller images are
            refused, not upsampled).
        name: a corruption of :data:`CORRUPTIONS`, e.g. ``"gaussian_noise"``.
        severity: 1 (mild) to 5 (strong).
        seed: non-negative integer; image ``i`` is corrupted with a seed derived from ``(seed, i)``, so the result
            is deterministic and an image's corruption does not depend on the batch size.

    Returns:
        ``(N, 3, H, W)`` corrupted images in [0, 1], same dtype and device as ``images`` (quantised to 1/255, as
        the package works on 8-bit images). numpy's global RNG state is left as it was.
    """
    _check_corruption(name, severity)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"corrupt_images expects images (N, 3, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"corruptions need images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {height}x{width}")
    if seed < 0:
        raise ValueError(f"the corruption seed must be a non-negative integer, got {seed}")
    from imagecorruptions import corrupt  # deferred: the package pulls in numba, OpenCV and scikit-image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        image_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        if name == "elastic_transform":
            out[i] = elastic_transform(image, int(severity), np.random.RandomState(image_seed))
            continue
        kwargs = {"seed": image_seed} if name in _SEEDED_BY_ARGUMENT else {}
        with seeded_numpy(image_seed):
            out[i] = corrupt(np.ascontiguousarray(image), severity=int(severity), corruption_name=name, **kwargs)
    result = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=images.device, dtype=images.dtype)
    return result / 255


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """The package's ``elastic_transform`` made to warp every image size as it warps one of shorter side 224.

    The package displaces each pixel by uniform noise (amplitude 0.5 % of the height) smoothed with a Gaussian of σ
    = 1 % of each side and scaled by alpha: the smoothing divides the amplitude by σ, so the displacement is about the
    same number of pixels at every size (RMS 1 to 2.5). That is a smooth warp of 0.5-1 % of a 224-pixel image, but
    3-8 % of a 32-pixel one, where σ < 1 pixel leaves independent jitter. Here the displacement field is drawn as
    the package draws it for the image scaled to :data:`ELASTIC_REFERENCE_SIZE`, resized to the image (averaged
    when shrunk) and scaled by the size ratio; the image is warped at its own size, as the package does.

    Args:
        image: ``(H, W, 3)`` uint8 pixels.
        severity: 1 to 5.
        rng: draws the field (``RandomState(s)`` draws what the package draws after ``np.random.seed(s)``).

    Returns:
        ``(H, W, 3)`` uint8 pixels; at a shorter side of 224 exactly the package's result for the same draws.
    """
    import cv2  # deferred like the package, whose dependencies these are
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    height, width = image.shape[:2]
    scale = ELASTIC_REFERENCE_SIZE / min(height, width)
    ref_height, ref_width = round(height * scale), round(width * scale)
    amplitude = ref_height * 0.005
    interpolation = cv2.INTER_AREA if ref_height > height else cv2.INTER_LINEAR

    def displacement(ratio: float) -> np.ndarray:
        """One axis's ``(H, W)`` displacement in the image's pixels (``ratio``: image over reference pixels)."""
        noise = rng.uniform(-amplitude, amplitude, size=(ref_height, ref_width))
        field = gaussian(noise, np.array((ref_height, ref_width)) * 0.01, mode="reflect", truncate=3)
        field = (field * _ELASTIC_ALPHA[severity - 1]).astype(np.float32)
        return cv2.resize(field, (width, height), interpolation=interpolation) * np.float32(ratio)

    dx = displacement(width / ref_width)  # drawn before dy, as the package draws them
    dy = displacement(height / ref_height)
    y, x, z = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    coordinates = ((y + dy[..., None]).reshape(-1, 1), (x + dx[..., None]).reshape(-1, 1), z.reshape(-1, 1))
    warped = map_coordinates(image.astype(np.float32) / 255, coordinates, order=1, mode="reflect")
    return np.uint8(np.clip(warped.reshape(image.shape), 0, 1) * 255)


# ----------------------------------------------------------------------------------------------- PGD
def pgd_iterations(eps: float) -> int:
    """PGD's number of iterations for budget ``eps`` (0-255 scale): ``min(eps + 4, ceil(1.25 eps))``, as an int."""
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"the PGD budget eps must be a non-negative number on the 0-255 scale, got {eps}")
    return int(min(eps + 4, math.ceil(1.25 * eps)))


def pgd_attack(model_fn: Callable[[Tensor], Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor], images: Tensor,
               target: Tensor, eps: float, step: float = 1.0) -> Tensor:
    """Untargeted L∞ PGD without random start: adversarial images that raise ``loss_fn(model_fn(x), target)``.

    Starting from the clean images, each of :func:`pgd_iterations` ``(eps)`` iterations adds ``step`` times the
    sign of the loss gradient, then projects onto the ε-ball around the clean images and clips to [0, 1].
    Gradients are taken with respect to the input only, so no parameter gradient is left behind.

    Args:
        model_fn: images ``(N, 3, H, W)`` → the attacked task's prediction.
        loss_fn: ``(prediction, target)`` → scalar loss (0-d tensor) to maximise.
        images: ``(N, 3, H, W)`` clean images in [0, 1] (their device and dtype are used throughout).
        target: what ``loss_fn`` compares the prediction with.
        eps: L∞ budget on the 0-255 pixel scale (``>= 0``).
        step: step size on the 0-255 pixel scale (``> 0``).

    Returns:
        ``(N, 3, H, W)`` adversarial images in [0, 1], within ``eps / 255`` of ``images`` (detached).
    """
    iterations = pgd_iterations(eps)
    if not math.isfinite(step) or step <= 0:
        raise ValueError(f"the PGD step must be a positive number on the 0-255 scale, got {step}")
    if images.dim() != 4:
        raise ValueError(f"pgd_attack expects images (N, C, H, W), got {tuple(images.shape)}")
    clean = images.detach()
    low, high = clean - eps / 255, clean + eps / 255
    adv = clean.clone()
    with torch.enable_grad():  # also when called under torch.no_grad (e.g. inside an evaluation loop)
        for _ in range(iterations):
            adv.requires_grad_(True)
            loss = loss_fn(model_fn(adv), target)
            if loss.dim() != 0:
                raise ValueError(f"pgd_attack needs a scalar loss, got shape {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss, adv)
            adv = (adv.detach() + (step / 255) * grad.sign()).clamp(low, high).clamp(0, 1)
    return adv.detach()
