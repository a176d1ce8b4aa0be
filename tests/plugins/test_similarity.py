"""Tests of the built-in similarity metrics: linear CKA (unbiased HSIC) and RSA."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from mtsl_plugin.plugins import similarity
from mtsl_plugin.plugins.builtin_similarity import linear_cka, rsa, unbiased_hsic


def _random(n: int, c: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=generator, dtype=dtype)


def _orthogonal(c: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_random(c, c, seed))
    return q


def _hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC written from its U-statistic definition, with explicit loops over distinct indices.

    HSIC = E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq], each expectation estimated over distinct indices.
    """
    n = k.shape[0]
    pairs = triples = quadruples = 0.0
    for i, j in itertools.permutations(range(n), 2):
        pairs += k[i, j] * l[i, j]
    for i, j, q in itertools.permutations(range(n), 3):
        triples += k[i, j] * l[i, q]
    for i, j, q, r in itertools.permutations(range(n), 4):
        quadruples += k[i, j] * l[q, r]
    return (
        pairs / (n * (n - 1))
        + quadruples / (n * (n - 1) * (n - 2) * (n - 3))
        - 2.0 * triples / (n * (n - 1) * (n - 2))
    )


def test_unbiased_hsic_matches_u_statistic_definition() -> None:
    for n, seed in ((4, 0), (6, 1), (7, 2)):
        x = _random(n, 3, seed) + 0.5  # non-centred on purpose
        y = _random(n, 5, seed + 10) - 1.0
        k, l = x @ x.T, y @ y.T
        expected = _hsic_u_statistic(k.numpy(), l.numpy())
        assert unbiased_hsic(k, l).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_cka_matches_u_statistic_definition() -> None:
    x = _random(6, 4, 3) * 2.0 + 1.0
    y = _random(6, 2, 4) - 0.3
    k, l = (x @ x.T).numpy(), (y @ y.T).numpy()
    expected = _hsic_u_statistic(k, l) / np.sqrt(_hsic_u_statistic(k, k) * _hsic_u_statistic(l, l))
    assert linear_cka(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_cka_of_identical_inputs_is_one() -> None:
    x = _random(32, 16, 5, torch.float32)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert similarity("cka")(x, x.clone()).item() == pytest.approx(1.0, abs=1e-5)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling() -> None:
    x = _random(20, 8, 6)
    y = torch.tanh(x @ _random(8, 5, 7)) + 0.1 * _random(20, 5, 8)
    reference = linear_cka(x, y)
    assert 0.0 < reference.item() < 1.0
    torch.testing.assert_close(linear_cka(x @ _orthogonal(8, 9), y), reference)
    torch.testing.assert_close(linear_cka(x, y @ _orthogonal(5, 10)), reference)
    torch.testing.assert_close(linear_cka(3.7 * x, y), reference)
    torch.testing.assert_close(linear_cka(x, 1e-3 * y), reference)


def test_cka_invariant_to_a_common_offset_of_the_features() -> None:
    """Features far from zero mean (post-ReLU activations, say) give the CKA of their centred selves: the
    offset drowns neither the value nor its float32 version in rounding."""
    x = _random(16, 8, 11)
    y = x @ _random(8, 6, 12) + _random(16, 6, 13)
    reference = linear_cka(x, y)
    assert 0.3 < reference.item() < 0.95
    for offset in (10.0, 1e4):
        torch.testing.assert_close(linear_cka(x + offset, y - offset), reference, rtol=1e-9, atol=0)
        torch.testing.assert_close(linear_cka((x + offset).float(), y.float()), reference.float(),
                                   rtol=1e-4, atol=0)


def test_cka_is_symmetric_and_bounded() -> None:
    for seed in range(5):
        x, y = _random(10, 3, seed), _random(10, 7, seed + 100)
        torch.testing.assert_close(linear_cka(x, y), linear_cka(y, x))
        assert -1.0 <= linear_cka(x, y).item() <= 1.0


def test_cka_gradient_flows_to_both_inputs() -> None:
    x = _random(16, 6, 11, torch.float32).requires_grad_()
    y = _random(16, 4, 12, torch.float32).requires_grad_()
    value = similarity("cka")(x, y)
    assert value.dtype == torch.float32 and value.dim() == 0
    value.backward()
    for grad in (x.grad, y.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_cka_gradient_matches_finite_differences() -> None:
    x = _random(8, 3, 13).requires_grad_()
    y = _random(8, 2, 14)
    assert torch.autograd.gradcheck(lambda a: linear_cka(a, y), (x,))


def test_cka_of_constant_features_is_zero_with_finite_gradient() -> None:
    x = torch.full((10, 4), 2.5, requires_grad=True)
    y = _random(10, 3, 15, torch.float32)
    value = linear_cka(x, y)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(x.grad).all()
    assert linear_cka(torch.zeros(10, 4), y).item() == 0.0
    # A constant that float64 averaging does not reproduce exactly still counts as constant.
    assert linear_cka(torch.full((7, 4), 0.1, dtype=torch.float64) * 3.0, y[:7]).item() == 0.0


def test_cka_needs_four_samples() -> None:
    x = _random(3, 4, 16)
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(x, x)
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(_random(5, 2, 17), _random(6, 2, 18))
    with pytest.raises(ValueError, match="argument y"):
        linear_cka(_random(5, 2, 17), torch.zeros(5, 2, 2))


def test_rsa_of_identical_inputs_is_one_and_scale_invariant() -> None:
    x = _random(12, 6, 19, torch.float32)
    assert rsa(x, x).item() == pytest.approx(1.0)
    y = x @ _random(6, 4, 20, torch.float32)
    assert rsa(5.0 * x, y).item() == pytest.approx(rsa(x, y).item(), abs=1e-6)
    assert rsa(x, 0.01 * y).item() == pytest.approx(rsa(x, y).item(), abs=1e-6)


def test_rsa_hand_checked_case() -> None:
    # Rows of x: r1 = 2 r0 + 1 (corr 1), r2 = reversed r0 (corr -1), r3 with corr 0.5 to r0 and -0.5 to r2.
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 5.0, 7.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # Upper triangle of x's RDM (pairs 01, 02, 03, 12, 13, 23): (0, 2, 0.5, 2, 0.5, 1.5).
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # y's RDM triangle: (0, 2, 0, 2, 0, 2). Average ranks: (1, 5.5, 2.5, 5.5, 2.5, 4) vs (2, 5, 2, 5, 2, 5),
    # whose Pearson correlation is 13.5 / sqrt(16.5 * 13.5) = 3 / sqrt(11).
    assert rsa(x, y).item() == pytest.approx(3.0 / np.sqrt(11.0), rel=1e-6)


def test_rsa_matches_scipy_on_random_data() -> None:
    for seed in range(5):
        x = _random(15, 5, seed + 30)
        y = torch.relu(x @ _random(5, 8, seed + 40)) + 0.5 * _random(15, 8, seed + 50)
        upper = np.triu_indices(15, k=1)
        rdm_x = (1.0 - np.corrcoef(x.numpy()))[upper]
        rdm_y = (1.0 - np.corrcoef(y.numpy()))[upper]
        expected = spearmanr(rdm_x, rdm_y).statistic
        assert similarity("rsa")(x, y).item() == pytest.approx(expected, abs=1e-9)


def test_rsa_returns_zero_when_a_dissimilarity_matrix_is_constant() -> None:
    x = torch.ones(6, 3) * torch.arange(1.0, 7.0)[:, None] + torch.tensor([0.0, 1.0, 2.0])  # all rows correlate 1
    y = _random(6, 3, 60)
    assert rsa(x, y).item() == 0.0


def test_rsa_returns_zero_when_the_second_dissimilarity_matrix_is_constant() -> None:
    """Protects the constant-RDM convention for either argument (not only x): y whose rows all correlate 1."""
    y = torch.ones(6, 3) * torch.arange(1.0, 7.0)[:, None] + torch.tensor([0.0, 1.0, 2.0])
    assert rsa(_random(6, 3, 61), y).item() == 0.0


def test_rsa_takes_a_zero_variance_row_as_uncorrelated_with_every_other_row() -> None:
    """Protects the documented convention that a constant row correlates 0 with the others (RDM entries 1)."""
    x = _random(7, 4, 62)
    x[2] = 3.0  # no variance across its features
    y = torch.relu(x @ _random(4, 5, 63)) + 0.5 * _random(7, 5, 64)
    upper = np.triu_indices(7, k=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.nan_to_num(np.corrcoef(x.numpy()), nan=0.0)
    expected = spearmanr((1.0 - correlation)[upper], (1.0 - np.corrcoef(y.numpy()))[upper]).statistic
    assert rsa(x, y).item() == pytest.approx(expected, abs=1e-9)


def test_rsa_needs_three_samples_and_returns_the_promoted_dtype() -> None:
    """Protects RSA's argument check (N >= 3) and its result's dtype (promoted from x's and y's)."""
    with pytest.raises(ValueError, match="at least 3 samples"):
        rsa(_random(2, 3, 65), _random(2, 3, 66))
    x32, y64 = _random(5, 3, 67, torch.float32), _random(5, 2, 68)
    assert rsa(x32, y64).dtype == torch.float64 and rsa(y64, x32).dtype == torch.float64
