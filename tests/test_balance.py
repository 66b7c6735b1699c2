"""Teacher balancing (fastseed/balance.py) against the PHI-S paper's equations (Ranzinger et al.,
2024, arXiv:2410.01680, section 2): x' = H U^T (x - mu) / alpha, with Sigma = U diag(lambda) U^T,
H a normalised Hadamard matrix and alpha = sqrt(mean(lambda)); written here in float64 numpy."""
import numpy as np
import pytest
import torch

from fastseed.balance import Balance, hadamard


def sylvester(n: int) -> np.ndarray:
    """The normalised Hadamard matrix of order 2^k by Sylvester's doubling, in numpy."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def embeddings(n: int, c: int, seed: int = 0) -> np.ndarray:
    """Teacher-like embeddings: an offset and a few directions far wider than the rest."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(30.0, 0.05, c)
    mixing = np.linalg.qr(rng.normal(size=(c, c)))[0]
    return rng.normal(size=(n, c)) * scales @ mixing.T + rng.normal(size=c) * 5


def phi_s_reference(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    mu = x.mean(0)
    sigma = np.cov(x, rowvar=False)
    lam, u = np.linalg.eigh(sigma)
    u = u * np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])  # the documented sign rule
    alpha = np.sqrt(lam.mean())
    return (h @ u.T @ (x - mu).T).T / alpha


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 44, 384, 768, 1280])
def test_hadamard_matrices_are_orthogonal_with_equal_entries(n):
    h = hadamard(n).numpy()
    assert np.allclose(h @ h.T, np.eye(n), atol=1e-12)
    assert np.allclose(np.abs(h), 1 / np.sqrt(n))


def test_powers_of_two_are_sylvesters():
    for n in (1, 2, 8, 64):
        assert np.array_equal(hadamard(n).numpy(), sylvester(n))


@pytest.mark.parametrize("c", [6, 10, 100])
def test_a_width_without_a_construction_is_refused_naming_the_alternative(c):
    with pytest.raises(ValueError, match=f"order {c}.*standardize"):
        Balance.estimate("phi-s", torch.randn(50, c))


@pytest.mark.parametrize("c", [16, 20])  # Sylvester and Paley I
def test_phi_s_matches_the_papers_equations(c):
    x = embeddings(4000, c)
    got = Balance.estimate("phi-s", torch.from_numpy(x))(torch.from_numpy(x)).double().numpy()
    h = sylvester(c) if c == 16 else hadamard(c).numpy()
    want = phi_s_reference(x, h)
    assert np.allclose(got, want, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("c", [16, 36])  # Sylvester and Paley II
def test_phi_s_gives_every_dimension_unit_variance_with_one_scale(c):
    x = embeddings(6000, c, seed=1)
    assert np.var(x, 0).max() / np.var(x, 0).min() > 5  # unbalanced before
    b = Balance.estimate("phi-s", torch.from_numpy(x))
    y = b(torch.from_numpy(x)).double().numpy()
    assert np.allclose(y.mean(0), 0, atol=1e-4)
    assert np.allclose(y.var(0, ddof=1), 1.0, atol=1e-3)
    assert b.scale.dim() == 0  # isotropic: one scale, so distances keep their ratios
    d_x = np.linalg.norm(x[:100, None] - x[None, :100], axis=-1)
    d_y = np.linalg.norm(y[:100, None] - y[None, :100], axis=-1)
    assert np.allclose(d_y * float(b.scale), d_x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["phi-s", "standardize", "raw"])
def test_the_inverse_recovers_the_teachers_embeddings(kind):
    x = torch.from_numpy(embeddings(500, 12, seed=2))
    b = Balance.estimate(kind, x)
    assert torch.allclose(b.inverse(b(x)).double(), x, atol=1e-4 * x.abs().max().item())


def test_standardize_is_per_dimension_and_raw_is_the_identity():
    x = embeddings(3000, 8, seed=3)
    y = Balance.estimate("standardize", torch.from_numpy(x))(torch.from_numpy(x)).double().numpy()
    assert np.allclose(y, (x - x.mean(0)) / x.std(0, ddof=1), atol=1e-4)
    raw = Balance.estimate("raw", torch.from_numpy(x))
    assert torch.equal(raw(torch.from_numpy(x).float()), torch.from_numpy(x).float())


def test_a_balance_is_saved_and_restored_with_its_run():
    x = torch.from_numpy(embeddings(300, 12, seed=4))
    b = Balance.estimate("phi-s", x)
    fresh = Balance("phi-s", torch.zeros(12), torch.eye(12), torch.ones(()))
    fresh.load_state_dict(b.state_dict())
    assert torch.equal(fresh(x), b(x))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[N >= 2, C\]"):
        Balance.estimate("phi-s", torch.randn(1, 8))
    with pytest.raises(ValueError, match="unknown balancing 'pca'"):
        Balance.estimate("pca", torch.randn(10, 8))
