"""The evaluators: config checks, the linear probe on separable data, FID/IS with stand-in
Inception weights (reference statistics cached), and `main --mode=eval` end to end.

No real Inception weights exist offline: a random file of the real variables' names and shapes
stands in for them, which is enough to check the plumbing (FID of a set against itself is 0
whatever the network)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
from train_steps import LIFECYCLE_FLAGS
from train_steps import tensorboard_scalars

from bigbigan_jax import config as config_lib
from bigbigan_jax import inference
from bigbigan_jax import sharding
from bigbigan_jax.evaluation import common
from bigbigan_jax.evaluation import evaluators
from bigbigan_jax.evaluation import fid_eval
from bigbigan_jax.evaluation import inception
from bigbigan_jax.models import networks
from bigbigan_jax.training import state as state_lib

pytestmark = pytest.mark.slow  # trains tiny models for the evaluators, and the train-then-eval run.

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny(variant="bigbigan"):
  return config_lib.load(str(ROOT / f"configs/tiny.py:{variant}"))


@pytest.fixture(scope="module")
def fresh_model():
  """A freshly initialised tiny BigBiGAN on 2 devices (evaluators need no training)."""
  config = tiny()
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", 2),), jax.devices()[:2])
  abstract = state_lib.abstract_train_state(nets, config, mesh)
  state = state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0))
  return inference.from_state(nets, state, config, batch_size=16)


# ---------------------------------------------------------------------------------------------
# Config checks.


def test_unknown_or_inapplicable_evaluator_is_rejected(tmp_path):
  config = tiny()
  config.evals = ("linear_probe", "fdi")
  with pytest.raises(ValueError, match="'fdi' is not an evaluator; allowed values are "
                     "'linear_probe', 'fid'"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="unknown evaluator 'fdi'.*'linear_probe', 'fid'"):
    evaluators.build(tiny(), str(tmp_path), names=("fdi",))
  biggan = tiny("biggan")
  biggan.evals = ("linear_probe",)
  with pytest.raises(ValueError, match="only model.kind='bigbigan' has an encoder"):
    config_lib.validate(biggan)
  config = tiny()
  config.eval.probe_features = ("avepool",)
  with pytest.raises(ValueError, match="config.eval.probe_features"):
    config_lib.validate(config)
  config = tiny()
  config.eval.num_samples, config.eval.is_splits = 5, 10
  with pytest.raises(ValueError, match="config.eval.is_splits"):
    config_lib.validate(config)


# ---------------------------------------------------------------------------------------------
# Linear probe.


def _colour_folder(root: pathlib.Path, per_class: int = 8) -> None:
  """Three classes of 8x8 images: noisy red, green and blue squares (linearly separable)."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(("red", "green", "blue")):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      image = rng.uniform(0, 60, (8, 8, 3))
      image[..., c] += 180
      Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}.png")


def test_linear_probe_separates_separable_classes(tmp_path, fresh_model):
  _colour_folder(tmp_path / "colours", per_class=16)
  config = tiny()
  config.data.source, config.data.folder = "folder", str(tmp_path / "colours")
  config.eval.probe_train_split, config.eval.probe_test_split = "train[:70%]", "train[70%:]"
  config.evals = ("linear_probe",)
  config.eval.batch_size = 16
  config.eval.probe_steps = 50
  config.eval.probe_baselines = True
  probe, = evaluators.build(config, str(tmp_path))
  results = evaluators.run([probe], fresh_model)
  names = ["avepool_feat", "bn_crelu_feat", "pixels", "random_encoder/avepool_feat",
           "random_encoder/bn_crelu_feat"]
  assert set(results) == {f"probe/{n}/{k}" for n in names for k in ("top1", "top5", "train_top1")}
  # Held-out colours of the same three classes: separable by pixels, and by any features.
  assert results["probe/pixels/top1"] == 1.0
  for n in names:
    assert 0.9 <= results[f"probe/{n}/top1"] <= results[f"probe/{n}/top5"] == 1.0, n


def test_probe_on_the_same_images_twice_is_refused(tmp_path):
  _colour_folder(tmp_path / "colours")
  config = tiny()
  config.data.source, config.data.folder = "folder", str(tmp_path / "colours")
  config.evals = ("linear_probe",)
  with pytest.raises(ValueError, match=r"the linear probe: the train split 'train' and the "
                     r"test split 'validation' of config.data share 24 examples.*train\[:90%\]"):
    evaluators.build(config, str(tmp_path))
  config.evals = ("judge",)
  with pytest.raises(ValueError, match="the judge: the train split"):
    evaluators.build(config, str(tmp_path))
  config.eval.probe_train_split, config.eval.probe_test_split = "train[:60%]", "train[50%:]"
  with pytest.raises(ValueError, match="share 2 examples"):
    evaluators.build(config, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# FID / IS.


def test_fid_without_weights_says_which_file_and_how_to_make_it(tmp_path):
  config = tiny()
  config.evals = ("fid",)
  with pytest.raises(fid_eval.MissingInceptionWeights,
                     match="config.eval.inception_path is empty.*python -m "
                     "bigbigan_jax.evaluation.inception_weights --convert_from="):
    evaluators.build(config, str(tmp_path))
  config.eval.inception_path = str(tmp_path / "nowhere.npz")
  with pytest.raises(FileNotFoundError, match="nowhere.npz' names no file"):
    evaluators.build(config, str(tmp_path))
  # The trainer's way: skipped (with a warning), the other evaluators kept.
  config.evals = ("linear_probe", "fid")
  built = evaluators.build(config, str(tmp_path), skip_unavailable=True)
  assert [e.name for e in built] == ["linear_probe"]


def _random_inception_weights(path: pathlib.Path) -> None:
  """Random weights with the FID Inception's names and shapes, activations kept O(1)."""
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in inception.variable_shapes().items():
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":
      value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0, 0.1, shape)
    flat[name] = value.astype(np.float32)
  np.savez(path, **flat)


class _RealsAsSamples:
  """Stands in for a Model whose G draws exactly the reference images."""

  def __init__(self, images, mesh):
    self.images, self.mesh = images, mesh
    self.z_dim, self.num_classes = 8, 0

  def generate(self, z, labels=None):
    assert labels is None
    return self.images[:len(z)]


def test_fid_of_the_reference_set_with_itself_is_zero_and_stats_are_cached(tmp_path,
                                                                           monkeypatch):
  weights = tmp_path / "inception_fid.npz"
  _random_inception_weights(weights)
  config = tiny()
  config.evals = ("fid",)
  config.eval.inception_path = str(weights)
  config.eval.batch_size = 8
  config.eval.num_samples = config.eval.fid_reference_examples = 8
  config.eval.is_splits = 2
  workdir = str(tmp_path / "run")
  fid, = evaluators.build(config, workdir)
  reals = np.concatenate([x for x, _ in common.real_batches(config, "train", 8)])
  reals = np.asarray(networks.pool_for_discriminator(reals, config.model.resolution))
  mesh = sharding.make_mesh((("data", 8),))
  # FID's sqrtm of a singular 2048x2048 product takes ~30 s here; that math has its own tests
  # (test_metrics). What this checks: the evaluator hands it the samples' and the reference's
  # statistics, equal here, so FID is 0.
  compared = []
  monkeypatch.setattr(fid_eval.metrics_lib, "fid_from_stats",
                      lambda *stats: compared.append(stats) or 0.0)
  results = fid.run(_RealsAsSamples(reals, mesh))
  assert set(results) == {"fid", "inception_score", "inception_score_std"}
  (mu1, sigma1, mu2, sigma2), = compared
  assert mu1.shape == (2048,) and sigma1.shape == (2048, 2048)
  np.testing.assert_allclose(mu1, mu2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma1, sigma2, rtol=1e-5, atol=1e-6)
  assert results["inception_score"] >= 1.0 and np.isfinite(results["inception_score_std"])
  path = fid.stats_path()
  assert path == os.path.join(workdir, "eval", "fid_reference_digits_train_32px_8.npz")
  assert os.path.isfile(path)

  # A new evaluator reads the cache and touches no real data.
  def no_data(*args, **kwargs):
    raise AssertionError("the cached statistics should have been used")
  monkeypatch.setattr(common, "real_batches", no_data)
  again, = evaluators.build(config, workdir)
  mu, sigma = again.reference_stats(mesh)
  mu0, sigma0 = fid.reference_stats(mesh)
  np.testing.assert_array_equal(mu, mu0)
  np.testing.assert_array_equal(sigma, sigma0)


# ---------------------------------------------------------------------------------------------
# The entry point.


def _run_main(*args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "bigbigan_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_train_then_eval_mode_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  small_probe = ["--config.eval.probe_max_examples=32", "--config.eval.probe_steps=20",
                 "--config.eval.batch_size=16"]
  # Training runs config.evals at the end; FID without weights is skipped, not fatal.
  # Evaluated at both steps, keeping the newest checkpoint and the best by the probe.
  # The 16 px BigBiGAN of the tests of a run's life, whose step program they share.
  config = ("--config=configs/tiny.py:lifecycle", *LIFECYCLE_FLAGS)
  out = _run_main(*config, f"--workdir={workdir}", "--config.num_train_steps=2", "--config.evals=('linear_probe','fid')",
                  "--config.eval_every_steps=1", "--config.keep_checkpoints=1",
                  "--config.keep_best=1", "--config.keep_best_metric=probe/avepool_feat/top1",
                  *small_probe)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Skipping the 'fid' evaluator" in out.stderr
  # The first line of ours says what the run will do; the last, where its results are.
  ours = [line.split("] ", 1)[1] for line in out.stderr.splitlines()
          if ".py:" in line and "] " in line]
  assert ours[0] == (f"Training bigbigan (configs/tiny.py:lifecycle) on digits[train] for 2 "
                     f"steps at batch 16 in 2 micro-batches, on 8 cpu device(s) in 1 "
                     f"process(es), in {workdir}."), ours[0]
  assert ours[-1].startswith(f"Done. In {workdir}: samples/ and reconstructions/"), ours[-1]
  trained = json.loads((workdir / "eval" / "step_0000002.json").read_text())
  assert trained["step"] == 2 and "probe/avepool_feat/top1" in trained["results"]
  assert (workdir / "reconstructions" / "step_0000002.png").exists()
  top1 = {step: json.loads((workdir / "eval" / f"step_{step:07d}.json").read_text())[
      "results"]["probe/avepool_feat/top1"] for step in (1, 2)}
  best = 1 if top1[1] >= top1[2] else 2  # Of a tie, the earlier step.
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({2, best}), (kept, top1)

  os.remove(workdir / "eval" / "step_0000002.json")
  out = _run_main("--mode=eval", *config, f"--workdir={workdir}",
                  "--config.eval.probe_baselines=True", *small_probe)
  assert out.returncode == 0, out.stderr[-3000:]
  printed = json.loads(out.stdout[out.stdout.index("{"):])
  saved = json.loads((workdir / "eval" / "step_0000002.json").read_text())
  assert saved["results"] == printed
  # The same checkpoint, probed in another process, gives the same figures as at the end of
  # training: the evaluators are seeded, not stateful.
  for key, value in trained["results"].items():
    assert printed[key] == pytest.approx(value, abs=1e-6), key
  # probe_baselines adds the pixel and random-E probes (pinned in test_linear_probe.py).
  baselines = {f"probe/{name}/{k}" for name in ("pixels", "random_encoder/avepool_feat",
                                                 "random_encoder/bn_crelu_feat")
               for k in ("top1", "top5", "train_top1")}
  assert baselines <= set(printed) and not baselines & set(trained["results"])
  assert "eval/probe/random_encoder/bn_crelu_feat/top5" in tensorboard_scalars(
      workdir / "tensorboard")


def test_eval_mode_fails_before_any_work(tmp_path):
  """What `main --mode=eval` reports as `error: ...` (main's handling is tested in
  test_train), raised before a checkpoint is read or anything is written."""
  config = tiny()
  config.evals = ("fid",)
  with pytest.raises(fid_eval.MissingInceptionWeights, match="inception_path is empty"):
    evaluators.evaluate(config, str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train one first"):
    evaluators.evaluate(tiny(), str(tmp_path / "none"))
  assert not (tmp_path / "none").exists()
