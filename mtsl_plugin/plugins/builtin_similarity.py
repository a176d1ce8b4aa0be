"""Built-in similarity plugin: linear CKA (``cka``) and representational similarity analysis (``rsa``).

Both compare two representations of the same N inputs, x of shape (N, C1) and y of shape (N, C2), and return
a 0-d tensor where higher means more similar.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr

from mtsl_plugin.plugins import hookimpl

CKA_EPS = 1e-40
"""Self-HSIC (of features scaled to unit mean squared norm) below which a representation counts as constant."""


def _check_pair(x: torch.Tensor, y: torch.Tensor, minimum: int, metric: str) -> None:
    """Raise ValueError unless x (N, C1) and y (N, C2) are 2-D tensors with the same N >= ``minimum``."""
    for argument, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{metric} needs argument {argument} to be a 2-D tensor (N, C), got {shape}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{metric} needs x and y with the same number of rows, got {x.shape[0]} and {y.shape[0]}.")
    if x.shape[0] < minimum:
        raise ValueError(f"{metric} needs at least {minimum} samples (rows), got {x.shape[0]}.")


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Return the unbiased HSIC estimator HSIC_1 (Song et al., 2012) of two (n, n) Gram matrices, n >= 4.

    With K~ and L~ the Gram matrices with zeroed diagonals,
    ``HSIC_1 = [tr(K~L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
    The matrices must be symmetric. Differentiable.
    """
    n = k.shape[0]
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))
    trace_kl = (k * l).sum()  # tr(K~L~) for symmetric matrices
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * torch.dot(k.sum(dim=0), l.sum(dim=0))  # 1'K~L~1 = (K~1)'(L~1)
    return (trace_kl + sums - cross) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA with the unbiased HSIC estimator (as in Nguyen, Raghu & Kornblith, 2021).

    ``CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with ``K = x x'`` and ``L = y y'``.

    Args:
        x: (N, C1) features, N >= 4.
        y: (N, C2) features of the same N inputs.

    Returns:
        0-d tensor in [-1, 1] (about [0, 1] in practice), in the promoted dtype of x and y. Differentiable in
        x and y.

    Numerics: computed in float64 with autocast disabled. Each input is first centred over samples and divided
    by its (uncentred, detached) root-mean-square row norm; CKA is invariant to both, so the value and the
    gradient are unchanged. If either self-HSIC is below :data:`CKA_EPS` (a representation that is constant
    up to rounding, which has no defined CKA), the result is 0 by convention, with zero gradient (the authors'
    ``CKASimilarity`` gives 0 with a NaN gradient there, which would spoil an aligned network's weights).
    """
    _check_pair(x, y, 4, "Linear CKA")
    with torch.autocast(device_type=x.device.type, enabled=False):
        grams = []
        for features in (x, y):
            features = features.to(torch.float64)
            scale = features.detach().pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-300)
            features = (features - features.mean(dim=0, keepdim=True)) / scale
            grams.append(features @ features.T)
        k, l = grams
        hsic_kl = unbiased_hsic(k, l)
        hsic_kk = unbiased_hsic(k, k)
        hsic_ll = unbiased_hsic(l, l)
        defined = (hsic_kk > CKA_EPS) & (hsic_ll > CKA_EPS)
        denominator = (hsic_kk.clamp_min(CKA_EPS) * hsic_ll.clamp_min(CKA_EPS)).sqrt()
        cka = torch.where(defined, hsic_kl / denominator, torch.zeros_like(hsic_kl))
    return cka.to(torch.promote_types(x.dtype, y.dtype))


def _dissimilarity_matrix(features: torch.Tensor) -> np.ndarray:
    """Return the (N, N) RDM ``1 - Pearson correlation`` between the rows of ``features`` (N, C), in float64.

    A row with zero variance has no defined correlation; its correlation with every other row is taken as 0.
    """
    rows = features.detach().to("cpu", torch.float64).numpy()
    rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1)
    unit = np.divide(rows, norms[:, None], out=np.zeros_like(rows), where=norms[:, None] > 0)
    return 1.0 - unit @ unit.T


def rsa(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Representational similarity analysis: Spearman correlation of the two representations' RDMs.

    Each representation's representational dissimilarity matrix (RDM) is ``1 - Pearson correlation`` between
    its samples (N, N); the similarity is the Spearman rank correlation between the strict upper triangles
    (N(N-1)/2 entries) of the two RDMs, computed by ``scipy.stats.spearmanr`` (tied entries get their average
    rank). If either triangle is constant (e.g. all samples identical up to scale), the result is 0 by
    convention.

    Args:
        x: (N, C1) features, N >= 3.
        y: (N, C2) features of the same N inputs.

    Returns:
        0-d tensor in [-1, 1], in the promoted dtype of x and y, on x's device. NOT differentiable: it is
        computed with numpy and carries no gradient, so it can decide a grouping but not drive a loss.
    """
    _check_pair(x, y, 3, "RSA")
    upper = np.triu_indices(x.shape[0], k=1)
    first = _dissimilarity_matrix(x)[upper]
    second = _dissimilarity_matrix(y)[upper]
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        value = 0.0
    else:
        value = float(spearmanr(first, second).statistic)
    return torch.tensor(value, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)


@hookimpl
def mtsl_similarity_metrics() -> dict:
    """Offer ``cka`` (linear CKA, unbiased HSIC; differentiable) and ``rsa`` (RDM Spearman; not differentiable)."""
    return {"cka": linear_cka, "rsa": rsa}
