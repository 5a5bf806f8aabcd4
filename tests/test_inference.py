"""The inference API on checkpoints of the tiny configs: TF-Hub shapes, reconstruct =
generate(encode), any batch size, EMA vs trained weights, truncation, standing statistics."""

import functools
import json
import pathlib

import flax.traverse_util
import jax
import ml_collections
import numpy as np
import pytest
from scipy import stats

from bigbigan_jax import config as config_lib
from bigbigan_jax import inference
from bigbigan_jax import sharding
from bigbigan_jax.models import networks
from bigbigan_jax.training import checkpoint as checkpoint_lib
from bigbigan_jax import train
from bigbigan_jax.training import state as state_lib

pytestmark = pytest.mark.slow  # trains and checkpoints a tiny model for the API.

ROOT = pathlib.Path(__file__).resolve().parent.parent
BATCH = 8  # Per compiled call: one example per fake device, so 13 examples take two calls.


def _tiny(variant="bigbigan"):
  return config_lib.load(str(ROOT / f"configs/tiny.py:{variant}"))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A BigBiGAN trained for 2 steps by the real trainer, EMA on from the first step."""
  config = _tiny()
  config.num_train_steps = 2
  config.ema.start_step = 0  # So the EMA copy (0.9 * init + 0.1 * trained) is not G itself.
  path = tmp_path_factory.mktemp("bigbigan")
  train.train_and_evaluate(config, str(path))
  return str(path)


@pytest.fixture(scope="module")
def biggan_workdir(tmp_path_factory):
  """An untrained class-conditional BigGAN checkpoint (no train step to compile)."""
  config = _tiny("biggan")
  nets = networks.build(config.model)
  abstract = state_lib.abstract_train_state(nets, config, sharding.make_mesh(config.mesh))
  state = state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(1))
  path = tmp_path_factory.mktemp("biggan")
  ckpt = checkpoint_lib.Checkpoints(str(path), config)
  ckpt.save(0, state, {"step": 0}, force=True)
  ckpt.wait()
  ckpt.close()
  return str(path)


@pytest.fixture(scope="module")
def model(workdir):
  return inference.load(workdir, batch_size=BATCH)


def _images(model, num, seed=0):
  """Plausible E inputs: G's samples upsampled to E's resolution."""
  return model.generate(inference.sample_z(seed, num, model.z_dim), upsample=True)


def test_outputs_have_the_tf_hub_shapes(model):
  assert (model.step, model.resolution, model.encoder_resolution, model.z_dim,
          model.num_classes, model.is_bigbigan, model.use_ema) == (2, 32, 64, 8, 0, True, True)
  assert model.config.model.kind == "bigbigan" and model.batch_size == BATCH
  z = inference.sample_z(0, 5, model.z_dim)
  images = model.generate(z)
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.float32
  assert np.all(np.abs(images) <= 1)
  upsampled = model.generate(z, upsample=True)
  assert upsampled.shape == (5, 64, 64, 3)
  np.testing.assert_array_equal(upsampled[:, ::2, ::2], images)  # Nearest neighbour.
  np.testing.assert_array_equal(upsampled[:, 1::2, 1::2], images)

  enc = model.encode(upsampled)
  width = 32 * model.config.model.encoder.base_width  # ResNet-v2 avepool features.
  assert {k: v.shape for k, v in enc.items()} == {
      "z_mean": (5, 8), "z_stdev": (5, 8), "z_sample": (5, 8), "avepool_feat": (5, width),
      "bn_crelu_feat": (5, 2 * width)}
  assert all(v.dtype == np.float32 for v in enc.values())
  assert np.all(enc["z_stdev"] > 0) and np.all(enc["bn_crelu_feat"] >= 0)

  scores = model.discriminate(images, z)
  assert {k: (v.shape, v.dtype) for k, v in scores.items()} == {
      k: ((5,), np.float32) for k in ("s_x", "s_z", "s_xz")}
  # E-resolution images are average-pooled for D, as in training.
  pooled = model.discriminate(upsampled, z)
  for k in scores:
    np.testing.assert_allclose(pooled[k], scores[k], rtol=1e-5, atol=1e-6)


def test_outputs_equal_the_networks_applied_directly(model):
  nets = model.nets
  z = inference.sample_z(3, 5, model.z_dim)
  expected = jax.jit(functools.partial(nets.generator.apply, train=False))(
      model.generator_variables, z, None)
  np.testing.assert_allclose(model.generate(z), expected, rtol=1e-5, atol=1e-6)
  x = _images(model, 5)
  enc = jax.jit(functools.partial(nets.encoder.apply, train=False))(
      model.encoder_variables, x, rngs={"noise": jax.random.PRNGKey(0)})
  ours = model.encode(x)
  for key in ("z_mean", "z_stdev", "avepool_feat", "bn_crelu_feat"):
    np.testing.assert_allclose(ours[key], enc[key], rtol=1e-5, atol=1e-6, err_msg=key)
  scores = jax.jit(functools.partial(nets.discriminator.apply, train=False))(
      model.discriminator_variables, networks.pool_for_discriminator(x, 32), z)
  for key, value in model.discriminate(x, z).items():
    np.testing.assert_allclose(value, scores[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_reconstruct_is_generate_of_encode(model):
  x = _images(model, 6, seed=1)
  enc = model.encode(x, seed=5)
  np.testing.assert_array_equal(model.reconstruct(x, seed=5), model.generate(enc["z_sample"]))
  np.testing.assert_array_equal(model.reconstruct(x, use_sample=False),
                                model.generate(enc["z_mean"]))
  np.testing.assert_array_equal(model.reconstruct(x, seed=5, upsample=True),
                                model.generate(enc["z_sample"], upsample=True))
  # The seed moves z_sample (z_mean + z_stdev * noise) and nothing else.
  other = model.encode(x, seed=6)
  np.testing.assert_array_equal(other["z_mean"], enc["z_mean"])
  assert not np.allclose(other["z_sample"], enc["z_sample"])
  noise = (enc["z_sample"] - enc["z_mean"]) / enc["z_stdev"]
  assert 0.3 < noise.std() < 3


def test_any_batch_size_agrees_with_one_big_batch_and_compiles_once(model):
  sizes = (1, 5, 13)
  z = inference.sample_z(7, sum(sizes), model.z_dim)
  x = _images(model, sum(sizes), seed=2)
  whole_g, whole_e, whole_d = model.generate(z), model.encode(x), model.discriminate(x, z)
  parts_g, parts_e, parts_d, start = [], [], [], 0
  for n in sizes:
    parts_g.append(model.generate(z[start:start + n]))
    parts_e.append(model.encode(x[start:start + n]))
    parts_d.append(model.discriminate(x[start:start + n], z[start:start + n]))
    start += n
  np.testing.assert_allclose(np.concatenate(parts_g), whole_g, rtol=1e-6, atol=1e-6)
  for key in whole_e:
    if key != "z_sample":
      np.testing.assert_allclose(np.concatenate([p[key] for p in parts_e]), whole_e[key],
                                 rtol=1e-5, atol=1e-6, err_msg=key)
  for key in whole_d:
    np.testing.assert_allclose(np.concatenate([p[key] for p in parts_d]), whole_d[key],
                               rtol=1e-5, atol=1e-6, err_msg=key)
  # z_sample's noise depends on the seed and the example's place in the call, not on chunks.
  for n in sizes:
    np.testing.assert_allclose(model.encode(x[:n])["z_sample"], whole_e["z_sample"][:n],
                               rtol=1e-5, atol=1e-6)
  assert model.generate(z[:0]).shape == (0, 32, 32, 3)
  # One program per method, whatever the batch sizes.
  for name in ("generate", "encode", "discriminate"):
    assert model._programs[name]._cache_size() == 1, name  # pylint: disable=protected-access


def test_ema_and_trained_generator_differ(workdir, model):
  raw = inference.load(workdir, use_ema=False, batch_size=BATCH)
  assert not raw.use_ema
  ema_params, raw_params = _flat(model.generator_variables["params"]), _flat(
      raw.generator_variables["params"])
  assert ema_params.shape == raw_params.shape and not np.allclose(ema_params, raw_params)
  np.testing.assert_array_equal(_flat(raw.encoder_variables), _flat(model.encoder_variables))
  np.testing.assert_array_equal(_flat(raw.discriminator_variables),
                                _flat(model.discriminator_variables))
  z = inference.sample_z(0, 4, model.z_dim)
  assert not np.allclose(raw.generate(z), model.generate(z))


def test_from_state_matches_load(workdir, model):
  step, meta, _ = checkpoint_lib.read_latest(workdir)
  config = ml_collections.ConfigDict(json.loads(meta["config"]))
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", -1),))
  state = checkpoint_lib.Checkpoints(workdir, config).restore(
      step, state_lib.abstract_train_state(nets, config, mesh))
  wrapped = inference.from_state(nets, state, config, batch_size=BATCH)
  assert wrapped.step == 2 and wrapped.mesh == mesh
  z = inference.sample_z(1, 3, model.z_dim)
  np.testing.assert_array_equal(wrapped.generate(z), model.generate(z))
  x = _images(model, 3)
  np.testing.assert_array_equal(wrapped.encode(x)["z_sample"], model.encode(x)["z_sample"])


def test_truncation_bounds_and_marginals():
  t, n = 0.5, (4000, 8)
  resampled = inference.sample_z(0, *n, truncation=t, method="resample")
  scaled = inference.sample_z(0, *n, truncation=t, method="scaled")
  assert resampled.shape == n and resampled.dtype == np.float32
  assert np.abs(resampled).max() <= t and np.abs(scaled).max() <= 2 * t
  # "resample": N(0, 1) restricted to [-t, t] (shape of the normal kept inside the cut).
  assert stats.kstest(resampled.ravel(), stats.truncnorm(-t, t).cdf).pvalue > 1e-3
  # "scaled": t * truncated_normal[-2, 2].
  assert stats.kstest(scaled.ravel(), stats.truncnorm(-2, 2, scale=t).cdf).pvalue > 1e-3
  # The two methods differ: "resample" at t=1 is not TF-Hub's "scaled" at t=1.
  one = inference.sample_z(1, *n, truncation=1.0, method="resample")
  assert stats.kstest(one.ravel(), stats.truncnorm(-2, 2).cdf).pvalue < 1e-6
  plain = inference.sample_z(2, *n)
  assert stats.kstest(plain.ravel(), stats.norm.cdf).pvalue > 1e-3
  np.testing.assert_array_equal(inference.sample_z(jax.random.PRNGKey(0), *n, truncation=t),
                                resampled)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="positive number"):
      inference.sample_z(0, 2, 8, truncation=bad)
  with pytest.raises(ValueError, match="'resample', 'scaled'"):
    inference.sample_z(0, 2, 8, truncation=0.5, method="clip")


def test_pooled_moments_equal_those_of_all_examples():
  rng = np.random.default_rng(0)
  groups = rng.normal(rng.normal(size=(6, 1, 3)), 2.0, size=(6, 50, 3))  # Group means differ.
  mean, var = inference.pooled_moments(groups.mean(axis=1), groups.var(axis=1))
  everything = groups.reshape(-1, 3)
  np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(var, everything.var(axis=0), rtol=1e-5)


def test_standing_stats_replace_bn_statistics_only(workdir):
  model = inference.load(workdir, batch_size=BATCH)
  before = jax.device_get(model.generator_variables)
  z = inference.sample_z(4, 64, model.z_dim, truncation=1.0)
  running = model.generate(z)
  # G in training mode normalises with the batch's own statistics: what standing statistics
  # estimate, and the checkpoint's running averages (2 steps old) do not.
  batch_mode, _ = jax.jit(functools.partial(
      model.nets.generator.apply, train=True, mutable=["batch_stats", "spectral"]))(
          model.generator_variables, z, None)

  new = model.standing_stats(num_batches=6, batch_size=32, truncation=1.0, seed=1)
  after = jax.device_get(model.generator_variables)
  np.testing.assert_array_equal(_flat(after["params"]), _flat(before["params"]))
  np.testing.assert_array_equal(_flat(after["spectral"]), _flat(before["spectral"]))
  old = flax.traverse_util.flatten_dict(before["batch_stats"])
  new_flat = flax.traverse_util.flatten_dict(jax.device_get(new))
  assert set(new_flat) == set(old) and len(old) == 2 * 7  # 6 conditional BNs + the output BN.
  for path, value in new_flat.items():
    assert value.shape == old[path].shape and not np.allclose(value, old[path]), path
    if path[-1] == "var":
      assert np.all(value > 0), path
  standing = model.generate(z)
  assert (np.abs(standing - batch_mode).mean()
          < 0.5 * np.abs(running - batch_mode).mean())
  # Back to the checkpoint's statistics, and forward again to the kept ones.
  model.set_batch_stats(None)
  np.testing.assert_array_equal(model.generate(z), running)
  model.set_batch_stats(new)
  np.testing.assert_array_equal(model.generate(z), standing)


def test_biggan_takes_labels(biggan_workdir):
  model = inference.load(biggan_workdir, batch_size=BATCH)
  assert (model.num_classes, model.is_bigbigan, model.step) == (10, False, 0)
  z = inference.sample_z(0, 5, model.z_dim, truncation=0.5, method="scaled")
  labels = np.array([0, 3, 3, 9, 1])
  images = model.generate(z, labels)
  assert images.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(model.generate(z, np.eye(10, dtype=np.int32)[labels]), images)
  np.testing.assert_array_equal(model.generate(z, 3)[1:3], images[1:3])
  assert not np.allclose(model.generate(z, 4), model.generate(z, 3))
  scores = model.discriminate(images, labels)
  assert scores.shape == (5,) and scores.dtype == np.float32
  assert model.sample(3, seed=1).shape == (3, 32, 32, 3)
  with pytest.raises(ValueError, match="class-conditional: pass labels"):
    model.generate(z)
  with pytest.raises(ValueError, match=r"ints in \[0, 10\)"):
    model.generate(z, np.array([0, 1, 2, 3, 10]))
  with pytest.raises(ValueError, match="BigGAN"):
    model.encode(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="BigGAN"):
    model.reconstruct(np.zeros((1, 32, 32, 3), np.float32))
  model.standing_stats(num_batches=2, batch_size=16)  # Uniform labels in each pass.


def test_bad_inputs_name_the_fix(model, tmp_path):
  with pytest.raises(ValueError, match=r"\(batch, 8\)"):
    model.generate(np.zeros((2, 7), np.float32))
  with pytest.raises(ValueError, match="unconditional"):
    model.generate(np.zeros((2, 8), np.float32), labels=[0, 1])
  with pytest.raises(ValueError, match=r"\(batch, 64, 64, 3\)"):
    model.encode(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="uint8 pixels"):
    model.encode(np.zeros((2, 64, 64, 3), np.uint8))
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*python -m bigbigan_jax.main"):
    inference.load(str(tmp_path / "empty"))
  assert not (tmp_path / "empty").exists()


def test_missing_step_lists_the_available_ones(workdir):
  with pytest.raises(ValueError, match=r"no checkpoint at step 7 .* steps \[2\]"):
    inference.read_config(workdir, 7)
  assert inference.read_config(workdir, 2)[0] == inference.checkpoint_steps(workdir)[-1] == 2


def test_load_images_crops_and_resizes(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, 10:30] = 255  # The centred square is white; the sides it crops off are black.
  Image.fromarray(wide).save(tmp_path / "wide.png")
  (tmp_path / "folder").mkdir()
  Image.fromarray(np.full((9, 5), 0, np.uint8)).save(tmp_path / "folder" / "grey.jpg")
  (tmp_path / "folder" / "notes.txt").write_text("not an image")
  images = inference.load_images([str(tmp_path / "wide.png"), str(tmp_path / "folder")], 16)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
  np.testing.assert_allclose(images[0], 1.0, atol=1e-6)
  np.testing.assert_allclose(images[1], -1.0, atol=0.05)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="cannot read .*bad.png as an image"):
    inference.load_images([str(tmp_path / "bad.png")], 16)
  with pytest.raises(FileNotFoundError, match="no such image file or folder"):
    inference.load_images([str(tmp_path / "missing.png")], 16)
