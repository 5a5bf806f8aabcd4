"""FID and Inception Score from Inception outputs, with the reference implementations' numerics.

Everything here is numpy/scipy in float64 on the host, because published numbers come from
code that does exactly that:

- FID: `fid_from_stats` follows TTUR's `fid.py` / pytorch-fid's `calculate_frechet_distance`:
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), sqrtm by scipy; a singular product is
  expected and its root checked (no warning when it squares back to the product); when the
  root is not finite, or not accurate, retry with eps on both diagonals; keep the real
  part (rejecting a large imaginary diagonal). `feature_stats` gives the mean and the unbiased
  covariance (`np.cov(rowvar=False)`), as both do.
- IS: `inception_score` follows OpenAI's improved-gan code: split the N predictions into
  `splits` consecutive chunks, score each as exp(mean_x KL(p(y|x) || p(y))) with p(y) the
  chunk's mean prediction, and report the mean and the (population) std over chunks.
- Reference statistics live in .npz files with keys `mu` and `sigma`, the layout of
  pytorch-fid's precomputed statistics, so files of either kind load with `load_stats`.
"""

from __future__ import annotations

import logging
import os
from typing import Any
import warnings

import numpy as np
import scipy.linalg
import scipy.special

from bigbigan_jax import storage

_STATS_KEYS = ("mu", "sigma")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features, as FID uses them.

  Args:
    features: (N, D) array, N >= 2.

  Returns:
    mu: (D,) float64 mean.
    sigma: (D, D) float64 unbiased covariance (divides by N - 1, as np.cov).
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be (N >= 2, D), got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                   eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1: (D,) mean of the first set.
    sigma1: (D, D) covariance of the first set.
    mu2: (D,) mean of the second set.
    sigma2: (D, D) covariance of the second set.
    eps: added to both diagonals only if sqrtm of the plain product is not finite.

  Returns:
    The distance, a Python float.

  Raises:
    ValueError: mismatched shapes, or a matrix square root with a large imaginary diagonal
      (the product is far from positive semi-definite: the statistics are broken).
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not fit means "
                     f"of shape {mu1.shape}")
  diff = mu1 - mu2
  product = sigma1 @ sigma2
  covmean, singular = _sqrtm(product)
  if not np.isfinite(covmean).all() or (singular and _residual(covmean, product) > 1e-3):
    # A near-singular product (fewer samples than dimensions) can break the Schur method;
    # the reference code then regularises both covariances and tries once more.
    logging.warning("FID: sqrtm of the covariance product is not %s; adding %g to both "
                    "diagonals", "finite" if not np.isfinite(covmean).all() else "accurate",
                    eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of up to "
                       f"{np.max(np.abs(covmean.imag)):.3g}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
  """scipy's sqrtm, and whether it said the matrix is singular. Covariances of fewer
  independent features than dimensions (a small judge's logits, few samples) give a singular
  product; its square root is still well defined (zero eigenvalues stay zero), so instead of
  passing scipy's LinAlgWarning on, the caller checks the root itself (`_residual`)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
    root = scipy.linalg.sqrtm(a)
  return root, any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)


def _residual(root: np.ndarray, a: np.ndarray) -> float:
  """||root² - a|| / ||a|| (Frobenius, real parts): how far root is from a square root."""
  root = np.real(root)
  return float(np.linalg.norm(root @ root - a) / max(np.linalg.norm(a), 1e-300))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two sets of features (e.g. Inception pool3), via `feature_stats`.

  Args:
    features1: (N1, D) features.
    features2: (N2, D) features.

  Returns:
    The distance, a Python float.
  """
  return fid_from_stats(*feature_stats(features1), *feature_stats(features2))


def _looks_like_probs(x: np.ndarray) -> bool:
  return bool(np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))


def inception_score(logits_or_probs: np.ndarray, splits: int = 10, *,
                    from_logits: bool | None = None) -> tuple[float, float]:
  """Inception Score as OpenAI's improved-gan code computes it.

  Per split (consecutive chunks `[i*N//splits, (i+1)*N//splits)`):
  exp(mean_x KL(p(y|x) || p(y))), p(y) the split's mean of p(y|x). The terms with
  p(y|x) = 0 count as 0 (the limit), where the reference code would produce NaN.

  Args:
    logits_or_probs: (N, K) logits (the FID Inception's 1008-way logits, see inception.py)
      or class probabilities.
    splits: number of chunks; N >= splits.
    from_logits: True for logits (softmax over all K classes is taken in float64), False for
      probabilities. None: probabilities if every row is non-negative and sums to 1 within
      1e-3, else logits.

  Returns:
    (mean, std) over splits; std is the population std (np.std), as the reference reports.
  """
  x = np.asarray(logits_or_probs, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected (N, classes), got shape {x.shape}")
  if not 1 <= splits <= x.shape[0]:
    raise ValueError(f"splits must be in [1, N={x.shape[0]}], got {splits}")
  if from_logits is None:
    from_logits = not _looks_like_probs(x)
  probs = scipy.special.softmax(x, axis=1) if from_logits else x
  n = probs.shape[0]
  scores = []
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    marginal = part.mean(axis=0, keepdims=True)
    kl = scipy.special.rel_entr(part, marginal).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **meta: Any) -> None:
  """Saves FID reference statistics (pytorch-fid's `mu`/`sigma` .npz layout).

  Args:
    path: the .npz file to write (written whole, then renamed into place).
    mu: (D,) mean.
    sigma: (D, D) covariance.
    **meta: extra numbers or strings to keep beside them (e.g. dataset="imagenet128",
      num_samples=50000); each must convert to a non-object numpy array.
  """
  mu, sigma = np.asarray(mu), np.asarray(sigma)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
  arrays = {"mu": mu, "sigma": sigma}
  for key, value in meta.items():
    array = np.asarray(value)
    if array.dtype == object:
      raise ValueError(f"meta[{key!r}] = {value!r} cannot be stored without pickle")
    arrays[key] = array
  storage.save_npz(os.fspath(path), **arrays)


def load_stats(path: str | os.PathLike, *, with_meta: bool = False):
  """Loads FID reference statistics written by `save_stats` (or by pytorch-fid).

  Args:
    path: the .npz file.
    with_meta: also return the extra entries.

  Returns:
    (mu, sigma) as float64 arrays, or (mu, sigma, meta) with `with_meta`; meta values that
    were scalars come back as Python scalars.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file lacks `mu` or `sigma`.
  """
  path = os.fspath(path)
  if not storage.exists(path):
    raise FileNotFoundError(f"FID statistics not found at {path!r}")
  with storage.local_copy(path) as local, np.load(local, allow_pickle=False) as data:
    missing = [k for k in _STATS_KEYS if k not in data.files]
    if missing:
      raise ValueError(f"{path!r} lacks {missing}; it holds {sorted(data.files)}")
    mu = np.asarray(data["mu"], np.float64)
    sigma = np.asarray(data["sigma"], np.float64)
    meta = {k: (data[k].item() if data[k].ndim == 0 else data[k])
            for k in data.files if k not in _STATS_KEYS}
  return (mu, sigma, meta) if with_meta else (mu, sigma)
