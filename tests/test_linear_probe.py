"""The linear probe on synthetic features, on one device and sharded over eight."""

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from bigbigan_jax import sharding
from bigbigan_jax.evaluation import linear_probe


def _clusters(rng, n, centres, noise):
  labels = rng.integers(0, centres.shape[0], n)
  return centres[labels] + noise * rng.normal(size=(n, centres.shape[1])), labels


def _mesh(n_devices):
  return Mesh(np.asarray(jax.devices()[:n_devices]), (sharding.DATA,))


def test_separable_clusters_are_learned():
  rng = np.random.default_rng(0)
  centres = 6.0 * rng.normal(size=(10, 32))
  train = _clusters(rng, 500, centres, noise=1.0)
  test = _clusters(rng, 500, centres, noise=1.0)
  # An offset and scale that standardisation must remove.
  result = linear_probe.train_linear_probe(
      100.0 + 50.0 * train[0], train[1], 100.0 + 50.0 * test[0], test[1],
      num_classes=10, steps=200)
  assert result["top1"] >= 0.99 and result["train_top1"] >= 0.99
  assert result["top5"] >= result["top1"]


def test_random_labels_give_chance_on_held_out_data():
  rng = np.random.default_rng(1)
  train_x, test_x = rng.normal(size=(300, 64)), rng.normal(size=(3000, 64))
  train_y, test_y = rng.integers(0, 10, 300), rng.integers(0, 10, 3000)
  result = linear_probe.train_linear_probe(train_x, train_y, test_x, test_y,
                                           num_classes=10, steps=300)
  assert result["train_top1"] > 0.5  # It memorises the training set...
  assert 0.06 < result["top1"] < 0.14  # ...but held out it is at chance (1/10)...
  assert 0.44 < result["top5"] < 0.56  # ...for top-5 too (5/10).
  assert result["top5"] >= result["top1"]


def test_top5_is_top_k_with_few_classes():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
  result = linear_probe.train_linear_probe(x, y, x, y, num_classes=3, steps=10)
  assert result["top5"] == 1.0  # Top-min(5, 3) of 3 classes always contains the label.


@pytest.mark.parametrize("batch_size", [None, 64])
def test_eight_device_mesh_matches_one_device(batch_size):
  assert jax.device_count() >= 8
  rng = np.random.default_rng(3)
  centres = 0.5 * rng.normal(size=(7, 16))
  # 203 and 101 rows: neither divides over 8 devices, so the padding is exercised.
  train = _clusters(rng, 203, centres, noise=1.0)
  test = _clusters(rng, 101, centres, noise=1.0)
  kwargs = dict(num_classes=7, steps=60, lr=5e-2, batch_size=batch_size, eval_batch_size=40)
  one = linear_probe.train_linear_probe(*train, *test, mesh=_mesh(1), **kwargs)
  eight = linear_probe.train_linear_probe(*train, *test, mesh=_mesh(8), **kwargs)
  assert 0.3 < one["top1"] < 0.95  # Not saturated: a wrong sharding would show.
  np.testing.assert_allclose(eight["train_loss"], one["train_loss"], rtol=1e-4)
  for key in ("top1", "top5", "train_top1"):
    assert abs(eight[key] - one[key]) <= 1.0 / 101, key


def test_bad_inputs_are_rejected():
  x = np.zeros((4, 3))
  with pytest.raises(ValueError, match="labels"):
    linear_probe.train_linear_probe(x, np.array([0, 1, 2, 5]), x, np.zeros(4), num_classes=3)
  with pytest.raises(ValueError, match="data"):
    linear_probe.train_linear_probe(x, np.zeros(4), x, np.zeros(4), num_classes=3,
                                    mesh=Mesh(np.asarray(jax.devices()[:1]), ("batch",)))
