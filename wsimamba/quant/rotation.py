"""Orthogonal rotations for quantization: Hadamard matrices of any size, the fast Walsh–Hadamard
transform, random Hadamard rotations (QuaRot) and KLT-enhanced rotations (MambaQuant).

Conventions: activations are row vectors; a rotation R (n, n) acts as x ↦ x @ R, and a Linear layer
y = x Wᵀ stays the same function when its input is rotated and its weight becomes W R
(x R (W R)ᵀ = x R Rᵀ Wᵀ = x Wᵀ).

Sizes that are not powers of two. H(n) = H_m ⊗ H_{2^k} / √n with n = m · 2^k:

- m = 1: Sylvester's Hadamard matrix.
- otherwise m is the smallest m = o · 2^j (o the odd part of n, j ≤ k) for which a Paley type-I
  Hadamard matrix exists (m − 1 a prime ≡ 3 mod 4): 12, 20, 24, 44, 48, 60, 68, 72, 80, 84, …, so
  Vim/VMamba widths such as 192 = 12 · 16 or 384 = 12 · 32 get a true Hadamard matrix.
- when no Paley order fits (e.g. n = 28, 6, 10: odd part 7, 3, 5 without enough factors of 2), the factor is a random orthogonal
  matrix of size o (QR of a Gaussian matrix, fixed seed): still orthogonal, so folding stays exact,
  but its entries are not all ±1/√m, so it spreads outliers less evenly. This is documented, not hidden.

The fast transform applies H_{2^k} with log₂(2^k) butterfly passes and H_m as a small matmul.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_transform",
    "klt_rotation",
    "random_signs",
    "second_moment",
]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def _paley(m: int) -> torch.Tensor:
    """Paley type-I Hadamard matrix of order m = q + 1, q prime ≡ 3 (mod 4); entries ±1, float64."""
    q = m - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal matrix Q[i, j] = χ(j − i), skew for q ≡ 3 (mod 4)
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(m, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _factor(n: int) -> tuple[int, torch.Tensor | None, bool]:
    """(m, H_m normalised to orthogonal (float64) or None when m = 1, whether H_m is a true Hadamard matrix)."""
    if n < 1:
        raise ValueError(f"n: expected a positive size, got {n}")
    k = (n & -n).bit_length() - 1  # the power of two in n
    odd = n >> k
    if odd == 1:
        return 1, None, True
    for j in range(k + 1):
        m = odd << j
        if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            h = _paley(m) / math.sqrt(m)
            return m, h, True
    gen = torch.Generator().manual_seed(1000 + odd)
    q, r = torch.linalg.qr(torch.randn(odd, odd, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]  # a Haar-distributed orthogonal matrix
    return odd, q.contiguous(), False


def hadamard_factor(n: int) -> tuple[int, bool]:
    """(m, exact): the Kronecker factor size m of H(n) = H_m ⊗ H_{n/m}, and whether H_m is a Hadamard matrix."""
    m, _, exact = _factor(n)
    return m, exact


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The orthogonal (normalised) Hadamard-type matrix H(n) (n, n) that :func:`hadamard_transform` applies."""
    m, hm, _ = _factor(n)
    p = n // m
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(p)
    if hm is not None:
        h = torch.kron(hm, h)
    return h.to(dtype=dtype, device=device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H(n) over the last dimension (n = x.shape[-1]) without forming H: O(n log n) per row.

    x (..., n) → (..., n), same dtype.
    """
    n = x.shape[-1]
    m, hm, _ = _factor(n)
    p = n // m
    lead = x.shape[:-1]
    y = x.reshape(-1, m, p)
    h = 1
    while h < p:
        # one butterfly stage: pairs (i, i + h) inside blocks of 2h
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p) * (1.0 / math.sqrt(p))
    if hm is not None:
        # x viewed as (m, p) = X: (x @ kron(A, B)) = Aᵀ X B
        y = torch.einsum("bip,iq->bqp", y, hm.to(dtype=y.dtype, device=y.device))
    return y.reshape(*lead, n)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random ±1 (float64) from `seed`: diag(signs) · H(n) is QuaRot's random Hadamard rotation."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """Σ xᵀx over every row of x (..., n), in float64: (n, n)."""
    flat = x.detach().reshape(-1, x.shape[-1]).double()
    return flat.t() @ flat


def klt_rotation(moment: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """MambaQuant's KLT-enhanced rotation R = K · diag(signs) · H (n, n), float64.

    `moment` (n, n) is the calibration second-moment matrix E[xᵀx] of the rotated layer's input (the
    uncentered covariance: symmetric quantizers see the mean too). K holds its eigenvectors, so x K has
    uncorrelated channels with second moments λ_i; the Hadamard matrix then mixes them so that every
    output channel has the same second moment, mean(λ) (exactly when H(n) is a true Hadamard matrix:
    (Hᵀ Λ H)_jj = Σ_i H_ij² λ_i = mean λ), which plain H does only for uncorrelated inputs.
    """
    moment = moment.double()
    moment = (moment + moment.t()) / 2
    _, k = torch.linalg.eigh(moment)
    h = hadamard_matrix(moment.shape[0], device=moment.device)
    if signs is not None:
        h = signs.double().to(moment.device)[:, None] * h
    return k @ h
