"""The Fréchet distance between Gaussians fitted to two feature sets: the mathematics behind FID-vid and FVD."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cholesky, eigvalsh


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == has no single truth value
class FeatureStats:
    """Mean (D,) and covariance (D, D), both float64, of `count` feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        cov = np.asarray(self.cov, dtype=np.float64)
        if mean.ndim != 1 or cov.shape != (mean.size, mean.size):
            raise ValueError(f"expected mean (D,) and cov (D, D), got mean {mean.shape} and cov {cov.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise ValueError("feature statistics contain NaN or inf")
        if np.abs(cov - cov.T).max(initial=0.0) > 1e-8 * np.abs(cov).max(initial=0.0):
            raise ValueError("the covariance matrix is not symmetric")
        if isinstance(self.count, bool) or not isinstance(self.count, int | np.integer) or self.count < 2:
            raise ValueError(f"feature statistics need a count of at least 2 samples, got {self.count!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "count", int(self.count))

    @property
    def dim(self) -> int:
        return self.mean.size

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of `features` (N, D), N >= 2 (a covariance needs two samples)."""
        if not isinstance(features, np.ndarray) or features.ndim != 2 or not (
                np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
            got = f"{features.dtype} {features.shape}" if isinstance(features, np.ndarray) else type(features).__name__
            raise ValueError(f"expected real features (N, D), got {got}")
        if len(features) < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
        values = features.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("features contain NaN or inf")
        dim = values.shape[1]
        return cls(values.mean(axis=0), np.cov(values, rowvar=False).reshape(dim, dim), len(values))


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)): the Fréchet distance of two Gaussians (FID, FVD).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which are those of the
    symmetric L^T S_a L where S_b = L L^T. This gives the value of pytorch-fid's `scipy.linalg.sqrtm(S_a @ S_b)` to
    round-off, with no complex arithmetic, and for 2048-d Inception features it takes seconds instead of the
    20-50 s sqrtm takes on a small CPU. As pytorch-fid does for a near-singular product, a covariance that is not
    positive definite (e.g. fewer samples than dimensions) gets `eps` * I added to both covariances.
    """
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    cov_a, cov_b = a.cov, b.cov
    chol_b = _cholesky(cov_b)
    if chol_b is None or _cholesky(cov_a) is None:
        offset = eps * np.eye(a.dim)
        cov_a, cov_b = cov_a + offset, cov_b + offset
        chol_b = _cholesky(cov_b)
        if chol_b is None:
            raise ValueError(f"the second covariance is not positive semi-definite (Cholesky fails even with "
                             f"{eps} * I added)")
    product = chol_b.T @ cov_a @ chol_b
    eigenvalues = eigvalsh((product + product.T) / 2)
    # >= 0 in exact arithmetic; round-off leaves tiny negatives. A clearly negative one means S_a is not positive
    # semi-definite (pytorch-fid's "imaginary component" error).
    if eigenvalues.min(initial=0.0) < -1e-6 * np.abs(eigenvalues).max(initial=0.0):
        raise ValueError(f"the first covariance is not positive semi-definite (eigenvalue {eigenvalues.min():.3g} "
                         f"of S_a S_b)")
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = a.mean - b.mean
    distance = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)  # round-off can leave a tiny negative for identical statistics


def _cholesky(cov: np.ndarray) -> np.ndarray | None:
    """The lower Cholesky factor of `cov`, or None where it is not (numerically) positive definite."""
    try:
        return cholesky(cov, lower=True)
    except LinAlgError:
        return None
