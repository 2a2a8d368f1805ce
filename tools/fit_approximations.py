"""Fit the polynomial and rational approximations used by ``mlx_unet/activations.py``.

    python tools/fit_approximations.py

Prints the coefficients and the worst error of each fit evaluated in float32 (the precision the
kernels run in). The fits are weighted least squares on dense Chebyshev-spaced samples,
refined by Lawson's iteration toward an equal-ripple (minimax) error; numpy only.
"""

import math

import numpy as np


def chebyshev_points(lo: float, hi: float, n: int) -> np.ndarray:
    k = np.arange(n)
    return 0.5 * (lo + hi) + 0.5 * (hi - lo) * np.cos(np.pi * (k + 0.5) / n)


def lawson(design: np.ndarray, target: np.ndarray, scale: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Minimise max |design @ c - target| / scale by iteratively reweighted least squares."""
    weights = np.full(len(target), 1.0 / len(target))
    for _ in range(iterations):
        w = np.sqrt(weights) / scale
        coef, *_ = np.linalg.lstsq(design * w[:, None], target * w, rcond=None)
        err = np.abs(design @ coef - target) / scale
        weights = weights * err
        weights /= weights.sum()
    return coef


def fit_exp2(degree: int = 6) -> np.ndarray:
    """2**f on [-0.5, 0.5], relative error, constant term pinned to 1 (so 2**0 is exact)."""
    f = chebyshev_points(-0.5, 0.5, 4000)
    design = np.stack([f**k for k in range(1, degree + 1)], axis=1)
    coef = lawson(design, 2.0**f - 1.0, 2.0**f)
    return np.concatenate([[1.0], coef])


def fit_erf(num_terms: int = 7, den_terms: int = 5, clip: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """erf(z) ~ z * P(z^2) / Q(z^2) on [0, clip]; Q's constant term fixed at 1.

    Linearised (Sanathanan-Koerner): minimise |z P(z^2) - erf(z) Q(z^2)| / |Q_prev(z^2)|.
    """
    z = chebyshev_points(0.0, clip, 6000)
    target = np.array([math.erf(v) for v in z])
    s = z * z
    q_prev = np.ones_like(z)
    for _ in range(12):
        design = np.concatenate(
            [np.stack([z * s**k for k in range(num_terms)], 1),
             np.stack([-target * s**k for k in range(1, den_terms + 1)], 1)], 1)
        coef = lawson(design, target, q_prev, iterations=60)
        p, q = coef[:num_terms], np.concatenate([[1.0], coef[num_terms:]])
        q_prev = np.abs(np.polyval(q[::-1], s))
    return p, q


def horner(coefs, x):
    acc = np.zeros_like(x) + np.float32(coefs[-1])
    for c in coefs[-2::-1]:
        acc = acc * x + np.float32(c)
    return acc


def main() -> None:
    exp2 = fit_exp2()
    f = np.linspace(-0.5, 0.5, 200001, dtype=np.float32)
    approx = horner(exp2.astype(np.float32), f)
    print("EXP2 =", [float(np.float32(c)) for c in exp2])
    print("  max relative error (float32):", float(np.max(np.abs(approx / 2.0 ** f.astype(np.float64) - 1))))

    p, q = fit_erf()
    z = np.linspace(0, 4.0, 400001, dtype=np.float32)
    s = z * z
    approx = z * horner(p.astype(np.float32), s) / horner(q.astype(np.float32), s)
    exact = np.array([math.erf(v) for v in z.astype(np.float64)])
    print("ERF_P =", [float(np.float32(c)) for c in p])
    print("ERF_Q =", [float(np.float32(c)) for c in q])
    print("  max absolute error on [0, 4] (float32):", float(np.max(np.abs(approx - exact))))
    print("  1 - erf(4):", 1 - math.erf(4.0))


if __name__ == "__main__":
    main()
