"""FID, IS and statistics files against closed forms and independent references."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from bigbigan_jax.evaluation import metrics


def _closed_form_fid(mu1, var1, mu2, var2):
  """Fréchet distance of Gaussians whose covariances share eigenvectors (eigenvalues given)."""
  return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def _eigh_fid(mu1, sigma1, mu2, sigma2):
  """Independent reference: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), by eigh."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.clip(inner, 0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _random_orthogonal(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def test_fid_diagonal_and_commuting_covariances_match_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  var1, var2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = _closed_form_fid(mu1, var1, mu2, var2)

  diag = metrics.fid_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
  np.testing.assert_allclose(diag, expected, rtol=1e-9)

  q = _random_orthogonal(rng, d)  # Same eigenvectors: the covariances commute.
  commuting = metrics.fid_from_stats(mu1, q @ np.diag(var1) @ q.T, mu2, q @ np.diag(var2) @ q.T)
  np.testing.assert_allclose(commuting, expected, rtol=1e-6)


def test_fid_of_gaussian_samples():
  rng = np.random.default_rng(1)
  d, n = 4, 200_000
  mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 1.5])
  var1, var2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 3.0])
  x1 = mu1 + np.sqrt(var1) * rng.normal(size=(n, d))
  x2 = mu2 + np.sqrt(var2) * rng.normal(size=(n, d))

  fid = metrics.fid_from_features(x1, x2)
  # The population value; the sample estimate is within a few 1e-3 at this n.
  np.testing.assert_allclose(fid, _closed_form_fid(mu1, var1, mu2, var2), rtol=1e-2)
  # The same sample statistics through an independent square-root method.
  stats1, stats2 = metrics.feature_stats(x1), metrics.feature_stats(x2)
  np.testing.assert_allclose(fid, _eigh_fid(*stats1, *stats2), rtol=1e-3)


def test_fid_general_covariances_match_eigh_reference():
  rng = np.random.default_rng(2)
  d = 32
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  sigma1, sigma2 = a @ a.T / d, b @ b.T / d + 0.1 * np.eye(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  np.testing.assert_allclose(metrics.fid_from_stats(mu1, sigma1, mu2, sigma2),
                             _eigh_fid(mu1, sigma1, mu2, sigma2), rtol=1e-3)


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
  mu, sigma = metrics.feature_stats(feats)
  assert abs(metrics.fid_from_features(feats, feats)) < 1e-6 * np.trace(sigma)


def test_feature_stats_is_mean_and_unbiased_covariance():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(50, 3)).astype(np.float32)
  mu, sigma = metrics.feature_stats(feats)
  centred = feats.astype(np.float64) - feats.mean(axis=0, dtype=np.float64)
  np.testing.assert_allclose(mu, feats.mean(axis=0, dtype=np.float64), rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)
  with pytest.raises(ValueError):
    metrics.feature_stats(feats[:1])


def test_fid_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
  real_sqrtm = scipy.linalg.sqrtm
  seen = []

  def flaky_sqrtm(a):
    seen.append(np.array(a))
    return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

  monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", flaky_sqrtm)
  sigma = np.diag([1.0, 4.0])
  fid = metrics.fid_from_stats(np.zeros(2), sigma, np.zeros(2), sigma, eps=1e-3)
  assert len(seen) == 2
  np.testing.assert_allclose(seen[1], (sigma + 1e-3 * np.eye(2)) @ (sigma + 1e-3 * np.eye(2)))
  assert np.isfinite(fid) and abs(fid) < 1e-2


def test_fid_of_singular_covariances_is_right_and_warns_nobody():
  # A feature that never varies (a judge's output no sample moves) makes both covariances,
  # and so their product, singular; scipy's sqrtm then says "Matrix is singular". The root
  # still squares back to the product, so the FID is the reference's, with no warning.
  rng = np.random.default_rng(5)
  f1, f2 = rng.normal(size=(50, 10)), rng.normal(size=(50, 10))
  f1[:, 3], f2[:, 3] = 1.0, 2.0
  (mu1, sigma1), (mu2, sigma2) = metrics.feature_stats(f1), metrics.feature_stats(f2)
  assert np.linalg.matrix_rank(sigma1 @ sigma2) < 10
  with pytest.warns(scipy.linalg.LinAlgWarning):
    scipy.linalg.sqrtm(sigma1 @ sigma2)  # What the caller no longer passes on.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fid = metrics.fid_from_stats(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(fid, _eigh_fid(mu1, sigma1, mu2, sigma2), rtol=1e-4)


def test_fid_rejects_non_psd_statistics_and_bad_shapes():
  with pytest.raises(ValueError, match="imaginary"):
    metrics.fid_from_stats(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
  with pytest.raises(ValueError):
    metrics.fid_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _improved_gan_is(probs, splits):
  """The OpenAI improved-gan formula, for strictly positive probabilities."""
  n, scores = probs.shape[0], []
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return np.mean(scores), np.std(scores)


def test_inception_score_extremes():
  n, k = 1000, 20
  mean, std = metrics.inception_score(np.full((n, k), 1.0 / k), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)

  # Confident and evenly spread: every split holds each of the K classes equally often.
  one_hot = np.eye(k)[np.arange(n) % k]
  mean, std = metrics.inception_score(one_hot, splits=10)
  assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)

  # The same through logits with a wide margin.
  mean, _ = metrics.inception_score(50.0 * one_hot, splits=10, from_logits=True)
  assert mean == pytest.approx(k, rel=1e-6)
  # Constant logits are uniform predictions, detected as logits (rows do not sum to 1).
  assert metrics.inception_score(np.zeros((n, k)), splits=10)[0] == pytest.approx(1.0)


def test_inception_score_matches_improved_gan_formula():
  rng = np.random.default_rng(5)
  logits = rng.normal(scale=3.0, size=(1003, 1008))  # N not divisible by splits.
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  expected = _improved_gan_is(probs, splits=10)
  np.testing.assert_allclose(metrics.inception_score(probs, splits=10), expected, rtol=1e-10)
  np.testing.assert_allclose(metrics.inception_score(logits, splits=10), expected, rtol=1e-10)


def test_stats_round_trip(tmp_path):
  rng = np.random.default_rng(6)
  mu, sigma = metrics.feature_stats(rng.normal(size=(100, 8)))
  path = tmp_path / "ref_stats.npz"
  metrics.save_stats(path, mu, sigma, dataset="imagenet128", num_samples=100)

  mu2, sigma2 = metrics.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  _, _, meta = metrics.load_stats(path, with_meta=True)
  assert meta == {"dataset": "imagenet128", "num_samples": 100}
  # pytorch-fid's layout: the same file read the way it reads precomputed statistics.
  with np.load(path) as data:
    np.testing.assert_array_equal(data["mu"], mu)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ref_stats.npz"]

  with pytest.raises(FileNotFoundError, match="missing.npz"):
    metrics.load_stats(tmp_path / "missing.npz")
  np.savez(tmp_path / "other.npz", mean=mu)
  with pytest.raises(ValueError, match="sigma"):
    metrics.load_stats(tmp_path / "other.npz")
  with pytest.raises(ValueError, match="pickle"):
    metrics.save_stats(path, mu, sigma, config={"a": 1})
