"""Does an image look like the model's validation images? A check on pixel statistics, at decode time.

Feature-space guards (medclf.monitor.ood) see an image through the model, and a model sees only what
it was trained to tell apart: the demo model, trained on synthetic phantoms, put 97% of real chest
films within its kNN threshold (docs/ood.md). Eleven statistics of the preprocessed image (intensity
mean, spread and quantiles, mean gradients, Laplacian energy, skew) tell real films from phantoms by
two orders of magnitude, need no model, and cost a few hundred microseconds per image.

The reference is one Gaussian of those statistics over the validation images (Ledoit-Wolf
shrinkage); an image's distance is its squared Mahalanobis distance over the number of statistics.
The threshold is the `ood.appearance_quantile` quantile of out-of-fold distances, folds drawn by
patient (as the ood threshold's). It is a small dict stored in the domain record (model.json), so the
decode tasks get it with the model's gate and no file is read.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from medclf.imaging.arrays import as_float64, concat, diff, log, quantile, std, var

REASONS = {"appearance": "image statistics"}
FOLDS = 10
STAT_NAMES = ("mean", "sd", "p2", "p25", "p50", "p75", "p98", "grad_x", "grad_y", "log_laplacian_var", "skew")


def appearance_stats(pixels):
    """The statistics of one preprocessed image ((1, S, S) or (S, S), as medclf.imaging.preprocess gives it):
    numpy for a numpy image, a float64 tensor on the image's device for a torch one (medclf.imaging.arrays)."""
    g = as_float64(pixels).reshape(tuple(pixels.shape[-2:]))
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    sd = std(g)
    return concat([g.mean(), sd, quantile(g, [0.02, 0.25, 0.5, 0.75, 0.98]),
                   abs(diff(g, axis=1)).mean(), abs(diff(g, axis=0)).mean(),
                   log(var(lap) + 1e-8), ((g - g.mean()) ** 3).mean() / (sd ** 3 + 1e-8)])


def fold_of(n: int, groups: Optional[list], folds: int, seed: int) -> np.ndarray:
    """Out-of-fold fold number per image; with `groups` (patients), all images of a group share one fold.
    At most `folds` folds, and at least two groups (or images) per fold.
    The one rule for both guards' thresholds (this check's and medclf.monitor.ood's)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        index = np.arange(n)
    else:
        index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    n_groups = int(index.max()) + 1 if n else 0
    folds = max(2, min(folds, n_groups // 2))
    return (rng.permutation(n_groups) % folds)[index]


def _gaussian(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    mean = stats.mean(axis=0)
    covariance = LedoitWolf(assume_centered=True).fit(stats - mean).covariance_
    return mean, np.linalg.pinv(covariance, hermitian=True)


def _distance(stats: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = np.atleast_2d(stats) - mean
    return ((d @ precision) * d).sum(axis=1) / d.shape[1]


def fit_appearance(stats: np.ndarray, groups: Optional[list], quantile: float, seed: int = 0) -> dict:
    """The reference and threshold from the validation images' statistics (n, len(STAT_NAMES))."""
    stats = np.asarray(stats, np.float64)
    fold = fold_of(len(stats), groups, FOLDS, seed)
    held = np.empty(len(stats))
    for f in np.unique(fold):
        held[fold == f] = _distance(stats[fold == f], *_gaussian(stats[fold != f]))
    threshold = float(np.quantile(held, quantile))
    mean, precision = _gaussian(stats)
    return {"mean": mean.tolist(), "precision": precision.tolist(), "threshold": threshold, "quantile": quantile,
            "validation_flag_rate": float((held > threshold).mean()), "n_fit": len(stats)}


def appearance_distance(pixels: np.ndarray, reference: dict) -> float:
    return distance_from(appearance_stats(pixels), reference)


def distance_from(stats: np.ndarray, reference: dict) -> float:
    """`appearance_distance` from an image's `appearance_stats` (on the host)."""
    return float(_distance(np.asarray(stats, np.float64), np.asarray(reference["mean"]),
                           np.asarray(reference["precision"]))[0])


def appearance_reason(pixels: np.ndarray, reference: Optional[dict]) -> Optional[str]:
    """Why this preprocessed image does not look like the validation images, or None."""
    if not reference:
        return None
    return reason_from(appearance_stats(pixels), reference)


def reason_from(stats: np.ndarray, reference: dict) -> Optional[str]:
    """`appearance_reason` from an image's `appearance_stats` (on the host), with a reference."""
    distance = distance_from(stats, reference)
    if distance <= reference["threshold"]:
        return None
    return (f"{REASONS['appearance']} unlike the training images: distance {distance:.3g} above the threshold "
            f"{reference['threshold']:.3g} ({100 * reference['quantile']:g}% quantile of validation)")
