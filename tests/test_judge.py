"""The judge evaluator on constructed cases, and the fair random-encoder baseline.

Each case replaces what G or E produce with images whose answer is known: reconstructions
equal to the inputs, samples that are all one image, samples that are the real held-out set.
"""

import pathlib

import jax
import numpy as np
import pytest

from bigbigan_jax import config as config_lib
from bigbigan_jax import inference
from bigbigan_jax import sharding
from bigbigan_jax.evaluation import common
from bigbigan_jax.evaluation import evaluators
from bigbigan_jax.evaluation import judge as judge_lib
from bigbigan_jax.evaluation import probe_eval
from bigbigan_jax.models import networks
from bigbigan_jax.training import state as state_lib

pytestmark = pytest.mark.slow  # trains the judge and tiny models.

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(variant="bigbigan"):
  config = config_lib.load(str(ROOT / f"configs/tiny.py:{variant}"))
  config.evals = ("judge",)
  config.eval.batch_size = 64
  config.eval.probe_max_examples = 300
  config.eval.judge_steps = 300
  config.eval.judge_num_samples = 200
  return config


def _model(config):
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
  abstract = state_lib.abstract_train_state(nets, config, mesh)
  state = state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0))
  return inference.from_state(nets, state, config, batch_size=64)


@pytest.fixture(scope="module")
def setup():
  config = _config()
  judge, = evaluators.build(config, "/nonexistent")
  model = _model(config)
  trained, test_x, test_y, _ = judge._prepare()
  return config, judge, model, trained, test_x, test_y


def _pooled(images, resolution):
  return np.asarray(networks.pool_for_discriminator(images, resolution))


def test_judge_learns_the_digits(setup):
  _, _, model, trained, test_x, test_y = setup
  # 300 tiny-config digits, 300 steps: far above chance (0.1) on held-out digits.
  assert trained.accuracy(_pooled(test_x, model.resolution), test_y) > 0.8


def test_perfect_reconstructions_score_the_judges_accuracy(setup, monkeypatch):
  config, judge, model, _, _, _ = setup
  monkeypatch.setattr(model, "reconstruct",
                      lambda images, **kw: _pooled(images, model.resolution))
  results = evaluators.run([judge], model)
  assert results["recon/class_keep"] == results["recon/judge_accuracy"]
  assert results["recon/judge_accuracy"] > 0.8


def test_reconstructions_of_one_digit_keep_only_that_class(setup, monkeypatch):
  config, judge, model, trained, test_x, test_y = setup
  first = _pooled(test_x[:1], model.resolution)
  monkeypatch.setattr(model, "reconstruct",
                      lambda images, **kw: np.repeat(first, len(images), axis=0))
  results = evaluators.run([judge], model)
  predicted = trained.predict(first)[0]
  assert results["recon/class_keep"] == pytest.approx(np.mean(test_y == predicted))


def test_samples_of_one_image_have_classifier_is_one(setup, monkeypatch):
  config, judge, model, _, test_x, _ = setup
  one = _pooled(test_x[:1], model.resolution)
  monkeypatch.setattr(model, "generate", lambda z, labels=None, **kw: np.repeat(one, len(z), 0))
  results = evaluators.run([judge], model)
  assert results["samples/classifier_is"] == pytest.approx(1.0, abs=1e-6)
  assert results["samples/classifier_fid"] > 0


def test_real_held_out_images_as_samples_score_near_the_class_count(setup, monkeypatch):
  config, judge, model, _, test_x, _ = setup
  real = _pooled(test_x, model.resolution)
  monkeypatch.setattr(model, "generate", lambda z, labels=None, **kw: real[:len(z)])
  real_results = evaluators.run([judge], model)
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
  monkeypatch.setattr(model, "generate", lambda z, labels=None, **kw: noise[:len(z)])
  noise_results = evaluators.run([judge], model)
  # Real digits: confidently and evenly spread over the 10 classes; noise: neither.
  assert real_results["samples/classifier_is"] > 7.0
  assert noise_results["samples/classifier_is"] < real_results["samples/classifier_is"] - 3
  assert real_results["samples/classifier_fid"] < noise_results["samples/classifier_fid"]


def test_classifier_score_extremes():
  one_class = np.tile(np.eye(10)[3], (50, 1))
  assert judge_lib.classifier_score(one_class) == pytest.approx(1.0)
  confident = 0.99 * np.eye(10)[np.arange(100) % 10] + 0.001
  assert judge_lib.classifier_score(confident) == pytest.approx(10.0, rel=0.1)
  balanced_exact = np.eye(10)[np.arange(100) % 10]
  assert judge_lib.classifier_score(balanced_exact) == pytest.approx(10.0, rel=1e-6)


def test_per_class_accuracy():
  overall, per_class = judge_lib.per_class_accuracy(
      np.array([0, 1, 1, 2, 0]), np.array([0, 1, 2, 2, 1]), 4)
  assert overall == pytest.approx(0.6)
  np.testing.assert_allclose(per_class[:3], [1.0, 0.5, 0.5])
  assert np.isnan(per_class[3])


def test_class_accuracy_of_a_conditional_generator(monkeypatch):
  config = _config("biggan")
  judge, = evaluators.build(config, "/nonexistent")
  model = _model(config)
  trained, test_x, test_y, _ = judge._prepare()
  real = _pooled(test_x, model.resolution)
  by_class = [real[test_y == c] for c in range(10)]

  def generate(z, labels=None, **kw):  # A perfect conditional G: a real digit of the class asked.
    return np.stack([by_class[c][i % len(by_class[c])] for i, c in enumerate(labels)])
  monkeypatch.setattr(model, "generate", generate)
  results = evaluators.run([judge], model)
  asked = np.arange(config.eval.judge_num_samples) % 10
  expected = np.mean(trained.predict(generate(None, asked)) == asked)
  assert results["samples/class_accuracy"] == pytest.approx(expected)
  assert results["samples/class_accuracy"] > 0.8
  assert {f"samples/class_accuracy/{c}" for c in range(10)} <= set(results)
  assert "recon/class_keep" not in results


def test_fair_random_encoder_estimates_bn_statistics(setup):
  config, _, model, _, _, _ = setup
  batches = list(common.real_batches(config, "train", 128))
  initial = probe_eval.random_encoder(model, seed=1)
  fair = probe_eval.random_encoder(model, seed=1, batches=batches)
  flat = lambda m: jax.tree_util.tree_leaves(m.encoder_variables["batch_stats"])
  # Same weights, statistics no longer the initial (0, 1).
  np.testing.assert_array_equal(
      jax.tree_util.tree_leaves(initial.encoder_variables["params"])[0],
      jax.tree_util.tree_leaves(fair.encoder_variables["params"])[0])
  assert any(not np.allclose(a, b) for a, b in zip(flat(initial), flat(fair)))
  images = batches[0][0]
  a, b = initial.encode(images), fair.encode(images)
  assert not np.allclose(a["avepool_feat"], b["avepool_feat"])
  # Estimated on one batch, every layer's statistics are that batch's, so evaluation mode
  # reproduces training mode on it: the last BN's mean and variance are those of the
  # evaluation-mode features of the same images.
  one = probe_eval.random_encoder(model, seed=1, batches=batches[:1])
  normed = one.encoder_variables["batch_stats"]["feat_bn"]["norm"]
  feats = one.encode(images)["avepool_feat"]
  np.testing.assert_allclose(normed["mean"], feats.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(normed["var"], feats.var(0), rtol=1e-3, atol=1e-6)


def test_learning_curves_png_from_eval_results(tmp_path):
  import json

  from PIL import Image

  from bigbigan_jax.reporting import curves
  assert curves.plot(str(tmp_path)) is None  # No results yet: nothing drawn.
  (tmp_path / "eval").mkdir()
  for step, top1 in ((100, 0.5), (200, 0.7)):
    results = {"probe/avepool_feat/top1": top1, "probe/pixels/top1": 0.8,
               "recon/class_keep": top1 / 2, "samples/classifier_is": 4.0 + step / 100}
    (tmp_path / "eval" / f"step_{step:07d}.json").write_text(
        json.dumps({"step": step, "results": results}))
  assert [s for s, _ in curves.read_results(str(tmp_path))] == [100, 200]
  path = curves.plot(str(tmp_path))
  assert path == str(tmp_path / "learning_curves.png")
  image = np.asarray(Image.open(path).convert("L"))
  assert image.shape[1] > image.shape[0] > 200 and image.std() > 10  # Lines, not a blank.
