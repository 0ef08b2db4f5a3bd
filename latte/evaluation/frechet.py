"""Feature statistics in float64 and the Fréchet distance between two Gaussians, as StyleGAN-V computes them
(its ``FeatureStats`` and ``compute_fvd``): mean = sum / n, covariance = sum of outer products / n - mean
meanᵀ (the biased estimate), distance = |mu1 - mu2|² + tr(s1 + s2 - 2 sqrtm(s1 s2)), real part.

A rank accumulates the moments of its share of the features; the shares are added on rank 0, so the result
differs between world sizes only by the order of float64 additions (~1e-16 relative), and no rank ever
holds all the features (FID's real frames are millions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass
class Moments:
    """Running float64 sums of features (n, D): count, sum (D,), sum of outer products (D, D)."""

    count: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def add(self, features: np.ndarray) -> None:
        """Add features (n, D) (float32 from the detector, summed in float64)."""
        x = np.asarray(features, np.float64)
        self.count += len(x)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x  # (D, n) @ (n, D)

    def merge(self, other: Moments) -> None:
        self.count += other.count
        self.total += other.total
        self.outer += other.outer

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) of the features added."""
        mean = self.total / self.count
        return mean, self.outer / self.count - np.outer(mean, mean)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64: scipy's ``sqrtm`` of
    sigma1 sigma2 (the product of two covariances is not symmetric) and the real part of the trace, as
    StyleGAN-V and Latte's ``tools/metrics`` do."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if isinstance(root, tuple):  # scipy < 1.18 with disp=False returned (root, error estimate)
        root = root[0]
    m = np.square(mu1 - mu2).sum()
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2.0 * root)))
