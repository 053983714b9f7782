"""MAUVE (Pillutla et al. 2021) of two feature sets: mauve-text's ``compute_mauve(p_features=..., q_features=...)``
when installed (never its text mode, which downloads gpt2-large), else a built-in implementation of the same
recipe: l2-normalise, PCA keeping 90 % of the variance, k-means (``num_buckets = max(2, round(min(n_p, n_q) /
10))``, 5 restarts) on the union, histograms p/q, divergence curve over 25 mixtures with scaling c = 5, area
under it.
"""


from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from abft_lens.errors import AbftLensError

__all__ = ["mauve_available", "mauve_score", "auto_buckets", "quantize", "kmeans", "mauve_from_histograms"]


def mauve_available() -> bool:
    """True when mauve-text (the optional extra ``abft-lens[mauve]``) is installed."""
    import importlib.util

    return importlib.util.find_spec("mauve") is not None


def _numpy(features) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise AbftLensError(f"MAUVE features must be a non-empty [n, d] array, got shape {array.shape}.",
                            "pass hidden_features(...) output.")
    return array


def mauve_score(p_features, q_features, *, backend: str = "auto", num_buckets: int | str = "auto",
                seed: int = 25, scaling_factor: float = 5.0, discretization: int = 25,
                explained_variance: float = 0.9, num_redo: int = 5, max_iter: int = 500) -> float:
    """MAUVE of two feature sets (1 = same distribution, near 0 = disjoint).

    ``backend``: ``"mauve-text"`` (the reference package), ``"builtin"``, or ``"auto"`` (mauve-text when
    installed). Both follow mauve-text 0.4.0's defaults; their k-means differ (faiss vs numpy), so scores agree
    closely but not to the last digit. With mauve-text the histograms are its own and the area is computed by
    :func:`mauve_from_histograms`, equal to its ``out.mauve`` except where the divergence curve has exact ties
    (identical histograms), which mauve-text can score 0.75 instead of 1.
    """
    p, q = _numpy(p_features), _numpy(q_features)
    if p.shape[1] != q.shape[1]:
        raise AbftLensError(f"MAUVE features differ in width: {p.shape[1]} vs {q.shape[1]}.",
                            "embed both text sets with the same model.")
    if backend == "auto":
        backend = "mauve-text" if mauve_available() else "builtin"
    if backend == "mauve-text":
        if not mauve_available():
            raise AbftLensError("mauve-text is not installed.", "pip install 'abft-lens[mauve]' (mauve-text==0.4.0), "
                                                               "or use backend='builtin'.")
        import mauve

        out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, seed=seed,
                                  mauve_scaling_factor=scaling_factor, kmeans_explained_var=explained_variance,
                                  kmeans_num_redo=num_redo, kmeans_max_iter=max_iter,
                                  divergence_curve_discretization_size=discretization, device_id=-1, verbose=False)
        # the area from mauve-text's own histograms, with ties ordered along the curve (mauve_from_histograms)
        return mauve_from_histograms(out.p_hist, out.q_hist, scaling_factor=scaling_factor,
                                     discretization=discretization)
    if backend != "builtin":
        raise AbftLensError(f"MAUVE backend {backend!r} is unknown.", "use 'auto', 'mauve-text' or 'builtin'.")
    if num_buckets == "auto":
        num_buckets = auto_buckets(min(len(p), len(q)))
    p_hist, q_hist = quantize(p, q, int(num_buckets), seed=seed, explained_variance=explained_variance,
                              num_redo=num_redo, max_iter=max_iter)
    return mauve_from_histograms(p_hist, q_hist, scaling_factor=scaling_factor, discretization=discretization)


def auto_buckets(n: int) -> int:
    """mauve-text's ``num_buckets="auto"``: max(2, round(n / 10)) for n texts on the smaller side."""
    return max(2, int(round(n / 10)))


def quantize(p: np.ndarray, q: np.ndarray, num_buckets: int, *, seed: int = 25, explained_variance: float = 0.9,
             num_redo: int = 5, max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of p and q over k-means clusters of their union (l2-normalised, PCA to ``explained_variance``)."""
    data = np.vstack([q, p])
    data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)
    centred = data - data.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    ratio = s ** 2 / max(float((s ** 2).sum()), 1e-300)
    keep = int(np.argmax(np.cumsum(ratio) >= explained_variance)) + 1 if ratio.sum() > 0 else 1
    data = centred @ vt[:keep].T
    labels = kmeans(data, num_buckets, seed=seed, num_redo=num_redo, max_iter=max_iter)
    q_counts = np.bincount(labels[:len(q)], minlength=num_buckets).astype(np.float64)
    p_counts = np.bincount(labels[len(q):], minlength=num_buckets).astype(np.float64)
    return p_counts / p_counts.sum(), q_counts / q_counts.sum()


def kmeans(data: np.ndarray, k: int, *, seed: int = 0, num_redo: int = 5, max_iter: int = 500) -> np.ndarray:
    """Cluster labels by Lloyd's algorithm with k-means++ seeding; the best of ``num_redo`` restarts."""
    rng = np.random.default_rng(seed)
    n = len(data)
    k = min(k, n)
    best_labels, best_inertia = None, math.inf
    for _ in range(max(1, num_redo)):
        centres = [data[rng.integers(n)]]
        for _ in range(1, k):
            d2 = ((data[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
            total = d2.sum()
            centres.append(data[rng.integers(n)] if total <= 0 else data[rng.choice(n, p=d2 / total)])
        centres = np.asarray(centres)
        labels = None
        for _ in range(max_iter):
            dist = ((data[:, None, :] - centres[None]) ** 2).sum(-1)
            new = dist.argmin(1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = data[labels == c]
                if len(members):
                    centres[c] = members.mean(0)
        inertia = float(((data - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if np.logical_and(p != 0, q == 0).any():
        return math.inf
    keep = np.logical_and(p != 0, q != 0)
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def mauve_from_histograms(p: np.ndarray, q: np.ndarray, *, scaling_factor: float = 5.0,
                          discretization: int = 25) -> float:
    """Area under the divergence curve exp(−c·(KL(Q‖R_w), KL(P‖R_w))), R_w = w·P + (1−w)·Q, as mauve-text."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    curve = [[0.0, math.inf]]
    for w in np.linspace(1e-6, 1 - 1e-6, discretization):
        r = w * p + (1 - w) * q
        curve.append([_kl(q, r), _kl(p, r)])
    curve.append([math.inf, 0.0])
    x, y = np.exp(-scaling_factor * np.asarray(curve)).T
    # Ties are ordered along the curve (x up, y down): mauve-text's unstable argsort can put (1, 0) before the
    # tied (1, 1) points of identical histograms and report 0.75 instead of 1 (seen with 4 identical texts).
    i, j = np.lexsort((-y, x)), np.lexsort((-x, y))
    return float(0.5 * (np.trapezoid(y[i], x[i]) + np.trapezoid(x[j], y[j])))
