"""Helpers shared by every dataset: semantic edges from labels and task-aware resizing.

All functions take and return torch tensors in the sample layout used across the project
(image ``(3, H, W)``, labels ``(H, W)``, depth ``(1, H, W)``, normals ``(3, H, W)``); none of them
draws random numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TASK_ORDER: tuple[str, ...] = ("S", "D", "E", "N", "A")
"""Canonical order of the five dense tasks: segmentation, depth, edges, normals, autoencoder."""

IGNORE_INDEX: int = -1
"""Label value meaning "no class here" in every ``S`` target."""


def ordered_tasks(tasks: set[str] | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Return ``tasks`` filtered and sorted in the canonical order S, D, E, N, A."""
    unknown = set(tasks) - set(TASK_ORDER)
    if unknown:
        raise ValueError(f"Unknown task letter(s) {sorted(unknown)}; choose from {TASK_ORDER}.")
    return tuple(t for t in TASK_ORDER if t in tasks)


def semantic_edges(labels: torch.Tensor, edge_radius: int = 1, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mark pixels that have a different valid label within a square neighbourhood.

    A pixel is an edge when it is valid (label != ``ignore_index``) and at least one pixel within
    Chebyshev distance ``edge_radius`` (the ``(2r+1) x (2r+1)`` square around it, clipped at the
    image border) has a different valid label. Ignore pixels are never edges and never make an edge.

    Args:
        labels: integer class map ``(H, W)`` or batch ``(N, H, W)``; negative values other than
            ``ignore_index`` are not allowed.
        edge_radius: half-size of the square neighbourhood, >= 1.
        ignore_index: label value to skip.

    Returns:
        float32 tensor ``(1, H, W)`` (or ``(N, 1, H, W)``) with values in {0, 1}.
    """
    if edge_radius < 1:
        raise ValueError(f"edge_radius must be >= 1, got {edge_radius}.")
    if labels.dim() not in (2, 3):
        raise ValueError(f"labels must have shape (H, W) or (N, H, W), got {tuple(labels.shape)}.")
    batched = labels.dim() == 3
    lab = labels if batched else labels.unsqueeze(0)
    lab = lab.unsqueeze(1).to(torch.float32)  # (N, 1, H, W); class ids are exact in float32 up to 2**24
    valid = lab != ignore_index
    big = torch.finfo(torch.float32).max
    k, pad = 2 * edge_radius + 1, edge_radius
    # Max over valid neighbours: ignore pixels are pushed to -inf-like, min over valid: to +inf-like.
    neighbour_max = F.max_pool2d(torch.where(valid, lab, torch.full_like(lab, -big)), k, stride=1, padding=pad)
    neighbour_min = -F.max_pool2d(torch.where(valid, -lab, torch.full_like(lab, -big)), k, stride=1, padding=pad)
    edges = valid & ((neighbour_max > lab) | (neighbour_min < lab))
    edges = edges.to(torch.float32)
    return edges if batched else edges.squeeze(0)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinearly resize an image ``(C, H, W)`` to ``(C, height, width)``, antialiased, clipped to [0, 1]."""
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(image.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out.squeeze(0).clamp_(0.0, 1.0)


def resize_labels(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of an integer label map ``(H, W)`` to ``(height, width)``, keeping its dtype."""
    if labels.shape[-2:] == (height, width):
        return labels
    out = F.interpolate(labels[None, None].to(torch.float32), size=(height, width), mode="nearest-exact")
    return out[0, 0].round().to(labels.dtype)


def _masked_resize(values: torch.Tensor, valid: torch.Tensor, height: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resize of ``values`` ``(C, H, W)`` that averages valid pixels only.

    Returns the resized values ``(C, height, width)`` and the new validity mask ``(height, width)``:
    a pixel is valid when at least half of its interpolation weight came from valid input pixels.
    Invalid output pixels are set to zero.
    """
    weight = valid.to(values.dtype)[None, None]
    num = F.interpolate((values * weight[0]).unsqueeze(0), size=(height, width), mode="bilinear",
                        align_corners=False, antialias=True)[0]
    den = F.interpolate(weight, size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    new_valid = den >= 0.5
    out = torch.where(new_valid, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return out, new_valid


def resize_depth(depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize depth ``(1, H, W)`` (0 = invalid) to ``(1, height, width)`` without blending invalid zeros in.

    Uses validity-weighted bilinear interpolation (antialiased when shrinking): each output value is
    the weighted mean of the valid input depths under the bilinear kernel; an output pixel whose
    kernel weight is mostly (> 50 %) on invalid input pixels becomes invalid (0).
    """
    if depth.shape[-2:] == (height, width):
        return depth
    out, _ = _masked_resize(depth, depth[0] > 0, height, width)
    return out


def normalize_normals(normals: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale every normal vector of ``(3, H, W)`` to unit length; vectors shorter than ``eps``, or with a
    non-finite component (a NaN x with a finite y and z is no normal, not the normal (0, y, z)), become 0
    (invalid)."""
    normals = torch.where(torch.isfinite(normals).all(dim=0, keepdim=True), normals, 0.0)
    norm = normals.norm(dim=0, keepdim=True)
    return torch.where(norm > eps, normals / norm.clamp_min(eps), torch.zeros_like(normals))


def resize_normals(normals: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize unit normals ``(3, H, W)`` (zero vector = invalid) to ``(3, height, width)`` and re-normalise.

    Valid vectors are averaged with validity-weighted bilinear interpolation (as for depth), then
    scaled back to unit length; pixels that end up mostly invalid are the zero vector.
    """
    if normals.shape[-2:] == (height, width):
        return normals
    out, _ = _masked_resize(normals, normals.norm(dim=0) > 0, height, width)
    return normalize_normals(out)


def resize_binary(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of a {0, 1} map ``(1, H, W)`` to ``(1, height, width)``."""
    if mask.shape[-2:] == (height, width):
        return mask
    return F.interpolate(mask.unsqueeze(0), size=(height, width), mode="nearest-exact").squeeze(0)


def resize_dense(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear over each channel's finite values (a channel's value counts on its own, as in the losses and
    metrics, so a NaN in one channel does not remove the others there); values mostly off them become NaN."""
    if values.shape[-2:] == (height, width):
        return values
    resized = []
    for channel in values:
        valid = torch.isfinite(channel)
        out, new_valid = _masked_resize(torch.where(valid, channel, 0.0)[None], valid, height, width)
        resized.append(torch.where(new_valid, out[0], float("nan")))
    return torch.stack(resized)


#: The resize of each target layout (:data:`mtsl_plugin.tasks.TARGET_LAYOUTS` but ``image``).
RESIZE_BY_LAYOUT = {"labels": resize_labels, "binary": resize_binary, "dense": resize_dense, "normals": resize_normals}
