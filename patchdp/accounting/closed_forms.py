"""Closed forms: the Gaussian mechanism's privacy profile (Balle & Wang 2018), used to
check the accountant, and the data-level noise comparator."""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

from patchdp.accounting.queries import check_delta

__all__ = ["gaussian_mechanism_delta", "gaussian_mechanism_epsilon", "data_level_noise_profile"]


def gaussian_mechanism_delta(epsilon, mu: float):
    """δ(ε) of the Gaussian mechanism with sensitivity/std = μ (Balle & Wang 2018):
    Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2). T-fold composition: μ·sqrt(T)."""
    eps = np.asarray(epsilon, dtype=np.float64)
    a = special.log_ndtr(-eps / mu + mu / 2)
    b = eps + special.log_ndtr(-eps / mu - mu / 2)
    return np.exp(a) * -np.expm1(np.minimum(b - a, 0.0))


def gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of the Gaussian mechanism with sensitivity/std = μ (exact, by root finding)."""
    check_delta(delta)
    if gaussian_mechanism_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gaussian_mechanism_delta(high, mu) > delta:
        high *= 2
    return optimize.brentq(lambda e: float(gaussian_mechanism_delta(e, mu)) - delta, 0.0, high,
                           xtol=1e-12, rtol=1e-12)


def data_level_noise_profile(epsilons, noise_std: float, patch_area: int, channels: int = 3,
                             pixel_range: float = 255.0) -> np.ndarray:
    """COMPARATOR: δ(ε) of adding N(0, σ²) once to every pixel of the data (input
    perturbation; training afterwards is post-processing). A patch of ``patch_area``
    pixels changes the image by at most sqrt(area·channels)·pixel_range in L2."""
    sensitivity = math.sqrt(patch_area * channels) * pixel_range
    return gaussian_mechanism_delta(epsilons, sensitivity / noise_std)

