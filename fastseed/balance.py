"""Balancing teachers' targets: each teacher's embeddings mapped to a common scale before a
student regresses them, so that no teacher dominates the loss by the size of its numbers.

    raw          x' = x
    standardize  x' = (x - mu) / sigma          per dimension (Theia, UNIC)
    phi-s        x' = H U^T (x - mu) / alpha    PHI Standardization (Ranzinger et al., 2024,
                                                "PHI-S: Distribution Balancing for Label-Free
                                                Multi-Teacher Distillation", arXiv:2410.01680)

PHI-S: with the covariance Sigma = U diag(lambda) U^T of the teacher's embeddings, U^T rotates
them onto its principal axes, where dimension i has variance lambda_i; the normalised Hadamard
matrix H (entries +-1/sqrt(C), H H^T = I) then spreads the variance evenly, since dimension i of
H y has variance sum_j H_ij^2 lambda_j = mean(lambda); one scalar alpha = sqrt(mean(lambda))
makes it 1 in every dimension. The map is a rotation and one scale: distances keep their
ratios (the standardisation is isotropic, it does not distort), and its inverse
x = U H^T x' alpha + mu gives a teacher-space estimate from a student's prediction.

H of order C exists here for C = 2^k m with m = 1, or m = q + 1 (Paley I, q prime, q = 3 mod 4),
or m = 2 (q + 1) (Paley II, q prime, q = 1 mod 4): among others 384, 512, 768, 1024, 1152, 1280,
1536, 2048 (the widths of ResNet, ViT, DINOv2, SigLIP and EfficientNet teachers). Another width
is refused with a ValueError that names `standardize`.

Eigenvectors have a sign each: U's columns are made canonical (the largest entry of each is
positive), so one set of embeddings gives one transform on any machine.
"""
from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("phi-s", "standardize", "raw")
EPS = 1e-6  # a variance below this (a constant dimension) is taken as this


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _paley(q: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of Paley's construction I (q = 3 mod 4, order q + 1) or II
    (q = 1 mod 4, order 2 (q + 1)), q prime; the quadratic residues mod q make its Jacobsthal matrix."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i)
    ones = torch.ones(q, dtype=torch.float64)
    if q % 4 == 3:
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = ones, -ones, jac
        return s + torch.eye(q + 1, dtype=torch.float64)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric conference matrix
    c[0, 1:], c[1:, 0], c[1:, 1:] = ones, ones, jac
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)  # for C's zeros (its diagonal)
    sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)   # for its +-1 entries
    return torch.kron(c, sign) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def hadamard(n: int) -> torch.Tensor:
    """The normalised Hadamard matrix of order `n` (float64, entries +-1/sqrt(n), orthogonal):
    Sylvester's doubling of a Paley core (see the module's docstring for the orders)."""
    power = (n & -n).bit_length() - 1  # the largest power of two dividing n
    for k in range(power, -1, -1):
        m = n >> k
        if m == 1:
            core = torch.ones(1, 1, dtype=torch.float64)
        elif _is_prime(m - 1) and (m - 1) % 4 == 3:
            core = _paley(m - 1)
        elif m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
            core = _paley(m // 2 - 1)
        else:
            continue
        h = core
        for _ in range(k):
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(n)
    raise ValueError(f"PHI-S needs a Hadamard matrix of order {n}, which this build has no construction for: "
                     "balance this teacher with standardize instead")


def _canonical(u: torch.Tensor) -> torch.Tensor:
    """`u`'s columns with signs such that the largest-magnitude entry of each is positive."""
    rows = u.abs().argmax(0)
    return u * torch.sign(u[rows, torch.arange(u.shape[1])])[None, :]


class Balance(nn.Module):
    """One teacher's balancing map, estimated from its embeddings (`estimate`) and saved with the
    run (its buffers: `mean`, `rotation` [C, C] (phi-s; identity otherwise), `scale` (a scalar for
    phi-s, per dimension for standardize, 1 for raw))."""

    def __init__(self, kind: str, mean: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown balancing {kind!r}: choose {', '.join(KINDS)}")
        self.kind = kind
        self.register_buffer("mean", mean.float())
        self.register_buffer("rotation", rotation.float())
        self.register_buffer("scale", scale.float())

    @classmethod
    def estimate(cls, kind: str, x: torch.Tensor) -> "Balance":
        """The map of `kind` for embeddings `x` [N, C] (statistics in float64)."""
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError(f"balancing needs embeddings [N >= 2, C], got {tuple(x.shape)}")
        x = x.double()
        c = x.shape[1]
        mean = x.mean(0)
        if kind == "raw":
            return cls(kind, torch.zeros(c), torch.eye(c), torch.ones(()))
        if kind == "standardize":
            return cls(kind, mean, torch.eye(c), x.var(0).clamp_min(EPS).sqrt())
        if kind not in KINDS:
            raise ValueError(f"unknown balancing {kind!r}: choose {', '.join(KINDS)}")
        h = hadamard(c)
        centred = x - mean
        cov = centred.T @ centred / (x.shape[0] - 1)
        lam, u = torch.linalg.eigh(cov)
        alpha = lam.clamp_min(0).mean().clamp_min(EPS).sqrt()
        return cls(kind, mean, h @ _canonical(u).T, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher space -> balanced space."""
        y = (x.float() - self.mean) @ self.rotation.T
        return y / self.scale

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Balanced space -> teacher space (a student's prediction as the teacher's embedding)."""
        return (y.float() * self.scale) @ self.rotation + self.mean
