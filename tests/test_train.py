"""The train step and loop on the tiny config: sharding equivalence, resume, checkpoints
across device counts, errors before compiling, divergence handling, the entry point."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_steps import flat
from train_steps import initial_state
from train_steps import LIFECYCLE_RUN
from train_steps import one_step
from train_steps import tensorboard_scalars

from bigbigan_jax import config as config_lib
from bigbigan_jax import inference
from bigbigan_jax import sharding
from bigbigan_jax import train
from bigbigan_jax.models import flops
from bigbigan_jax.models import networks
from bigbigan_jax.tools import benchmark
from bigbigan_jax.tools import conditioning
from bigbigan_jax.training import checkpoint as checkpoint_lib
from bigbigan_jax.training import loop
from bigbigan_jax.training import state as state_lib
from bigbigan_jax.training import step as step_lib

pytestmark = pytest.mark.slow  # compiles and runs the train step and the loop.

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TO_GLOBAL = step_lib.to_global


def tiny(variant="bigbigan", **overrides):
  config = config_lib.load(str(ROOT / f"configs/tiny.py:{variant}"))
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def lifecycle_run(**overrides):
  """The loop tests' config: test_faults' and test_storage's runs (one step program for all
  of them), with `overrides` that leave the step as it is (steps, checkpoints, samples)."""
  return tiny("lifecycle", **{**LIFECYCLE_RUN, **overrides})


def test_step_on_8_devices_equals_1_device():
  # Adam's first update is about lr * sign(grad): with the default eps=1e-8 a gradient that is
  # ~0 on both sides can flip sign under a different summation order and move a weight by
  # 2 * lr. A larger eps keeps the comparison about the step's math, not that amplification.
  # Even so, on some CPUs a few of E's weights (10 of 35,124 here) get a near-zero gradient
  # whose sign differs between layouts (E's gradient goes through D's just-updated weights,
  # so D's rounding reaches it amplified by Adam twice). Such a weight moves by at most
  # 2 lr; a layout bug would move most of them.
  # The CPU's default convolution weight gradient ("matmul", a custom VJP); XLA's own, the
  # TPU default, gives the same gradients (tests/test_layers.py), so one layout test serves.
  config = tiny(optim__eps=1e-4)
  one, m1, _ = one_step(config, 1)
  eight, m8, _ = one_step(config, 8)
  max_lr = max(config.optim.g_lr, config.optim.e_lr, config.optim.d_lr)
  for name in one.params:
    a, b = flat(eight.params[name]), flat(one.params[name])
    off = ~np.isclose(a, b, rtol=1e-4, atol=1e-6)
    assert off.mean() <= 1e-3, (name, int(off.sum()), a.size)
    np.testing.assert_array_less(np.abs(a - b), 2 * max_lr + 1e-6, err_msg=name)
  np.testing.assert_allclose(flat(eight.model_state), flat(one.model_state), rtol=1e-4,
                             atol=1e-6)
  for key in m1:
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-4, atol=1e-5, err_msg=key)
  # Each network took Adam steps of its own learning rate. Adam's first update of a weight is
  # lr * g / (|g| + eps): about lr, never more (to float32 rounding of weights near 1). D takes
  # d_steps=2 updates; the second is at most lr * sqrt(1 + b2) (its v averages g1² and g2²).
  init = initial_state(config)
  lrs = {"generator": config.optim.g_lr, "encoder": config.optim.e_lr,
         "discriminator": config.optim.d_lr}
  assert config.optim.d_steps == 2 and sorted(one.params) == sorted(lrs)
  for name, lr in lrs.items():
    moved = np.abs(flat(one.params[name]) - flat(init.params[name])) / lr
    bound = 1 + np.sqrt(1 + config.optim.b2) if name == "discriminator" else 1.0
    print(f"{name}: |update| / lr max {moved.max():.4f}, median {np.median(moved):.4f}")
    assert moved.max() <= 1.01 * bound, name
    assert (moved > 0.1).mean() > 0.9 and np.median(moved) > 0.5, name
  assert {"d_loss", "eg_loss", "e_loss", "g_loss", "ortho_loss", "d_accuracy", "grad_norm/d",
          "grad_norm/g", "grad_norm/e", "score/real_s_xz", "score/fake_s_x",
          "sigma0/g_first", "sigma0/d_last"} <= set(m1)
  assert all(np.isfinite(v) for v in m1.values())


def test_biggan_step_trains_g_and_d_and_ema_tracks_g():
  config = tiny("biggan", ema__start_step=0, ema__decay=0.5)
  init = initial_state(config)
  state, metrics, _ = one_step(config, 1)
  assert set(state.params) == {"generator", "discriminator"}
  assert {"score/real", "score/fake", "g_loss"} <= set(metrics)
  # From start_step on, ema = decay * ema + (1 - decay) * new params.
  expected = 0.5 * flat(init.ema_params) + 0.5 * flat(state.params["generator"])
  np.testing.assert_allclose(flat(state.ema_params), expected, rtol=1e-5, atol=1e-7)


class _Recorder:
  """Wraps step_lib.to_global to keep every step's local batch."""

  def __init__(self, monkeypatch, poison_step=None):
    self.batches = []
    original = _TO_GLOBAL

    def record(local, *args):
      self.batches.append({k: np.copy(v) for k, v in local.items()})
      if poison_step is not None and len(self.batches) == poison_step:
        local = {**local, "image": np.full_like(local["image"], np.nan)}
      return original(local, *args)

    monkeypatch.setattr(step_lib, "to_global", record)


def test_resume_and_rollback_give_the_same_params_and_batches(tmp_path, monkeypatch):
  straight = _Recorder(monkeypatch)
  # Snapshots every 2 steps are kept past the rotation (keep 2: 4 and 6).
  run = functools.partial(lifecycle_run, sample_every_steps=2, checkpoint_every_steps=2)
  final_straight = train.train_and_evaluate(run(num_train_steps=6, keep_every_steps=2),
                                            str(tmp_path / "a"))
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["2", "4", "6"]

  resumed = _Recorder(monkeypatch)
  train.train_and_evaluate(run(num_train_steps=3), str(tmp_path / "b"))
  assert checkpoint_lib.read_latest(str(tmp_path / "b"))[0] == 3
  final_resumed = train.train_and_evaluate(run(num_train_steps=6), str(tmp_path / "b"))

  assert int(final_resumed.step) == int(final_straight.step) == 6
  assert len(resumed.batches) == len(straight.batches) == 6
  for a, b in zip(straight.batches, resumed.batches):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  np.testing.assert_array_equal(flat(final_resumed.params), flat(final_straight.params))
  np.testing.assert_array_equal(flat(final_resumed.ema_params), flat(final_straight.ema_params))
  np.testing.assert_array_equal(flat(final_resumed.opt_ge), flat(final_straight.opt_ge))

  # Rolling back as the README says: a kept step copied into a new workdir, the same command.
  shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "c" / "checkpoints" / "2")
  final_rolled_back = train.train_and_evaluate(run(num_train_steps=6), str(tmp_path / "c"))
  np.testing.assert_array_equal(flat(final_rolled_back.params), flat(final_straight.params))
  np.testing.assert_array_equal(flat(final_rolled_back.opt_d), flat(final_straight.opt_d))

  # What the workdir holds: checkpoints (keep 2), PNG grids, TensorBoard events.
  b = tmp_path / "b"
  assert sorted(os.listdir(b / "checkpoints")) == ["4", "6"]
  assert (b / "samples" / "step_0000006.png").exists()
  assert (b / "reconstructions" / "step_0000006.png").exists()
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(b / "tensorboard"))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  _Recorder(monkeypatch, poison_step=3)
  with pytest.raises(FloatingPointError, match="step 3") as error:
    train.train_and_evaluate(lifecycle_run(num_train_steps=6, checkpoint_every_steps=2),
                             str(tmp_path))
  assert "last good checkpoint is step 2" in str(error.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_a_collapse_rule_warns_and_stop_on_collapse_saves_and_stops(tmp_path, caplog):
  # A rule set to fire at once: D's accuracy "pinned" at >= 1e-9 on one log.
  config = lifecycle_run(num_train_steps=6, log_every_steps=1, collapse__d_accuracy=1e-9,
                         collapse__pinned_logs=1, collapse__stop_on_collapse=True)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert int(final.step) == 1
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  warned = [r.getMessage() for r in caplog.records if "Collapse rule" in r.getMessage()]
  assert len(warned) == 1 and warned[0].startswith("Collapse rule d_accuracy fired at step 1")
  assert "No checkpoint from before step 1 is kept" in warned[0]
  assert any("Stopped at step 1: collapse.stop_on_collapse" in r.getMessage()
             for r in caplog.records)
  assert {"collapse/d_accuracy"} <= set(tensorboard_scalars(tmp_path / "tensorboard"))


def test_checkpoint_from_8_devices_restores_on_4(tmp_path):
  config = tiny(shard_params=True)
  nets = networks.build(config.model)
  mesh8 = sharding.make_mesh((("data", 8),), jax.devices()[:8])
  abstract8 = state_lib.abstract_train_state(nets, config, mesh8)
  state = state_lib.make_init_fn(nets, config, abstract8)(jax.random.PRNGKey(3))
  sharded = [x for x in jax.tree_util.tree_leaves(state) if not x.sharding.is_fully_replicated]
  assert sharded, "shard_params splits the larger leaves over the 8 devices"
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), config)
  ckpt.save(7, state, {"step": 7}, force=True)
  ckpt.wait()

  mesh4 = sharding.make_mesh((("data", 4),), jax.devices()[:4])
  restored = checkpoint_lib.Checkpoints(str(tmp_path), config).restore(
      7, state_lib.abstract_train_state(nets, config, mesh4))
  np.testing.assert_array_equal(flat(restored), flat(state))
  devices = {d for x in jax.tree_util.tree_leaves(restored) for d in x.sharding.device_set}
  assert devices == set(jax.devices()[:4])


def _listing(path):
  return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 12}, "batch_size=12 is not divisible by the 8 devices"),
    ({"optim__d_lr": float("nan")}, "config.optim.d_lr=nan"),
    ({"data__source": "tfds", "data__name": "no_such_dataset"}, "no dataset 'no_such_dataset'"),
    ({"data__source": "folder", "data__folder": "/nonexistent"}, "does not exist"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny(**overrides), str(workdir))
  assert not workdir.exists()


def test_empty_image_folder_is_rejected(tmp_path):
  (tmp_path / "images" / "cats").mkdir(parents=True)
  (tmp_path / "images" / "cats" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="has no images"):
    loop.prepare(tiny(data__source="folder", data__folder=str(tmp_path / "images")),
                  str(tmp_path / "run"))


def test_checkpoint_of_another_model_is_refused_untouched(tmp_path):
  config = lifecycle_run()
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", -1),))
  abstract = state_lib.abstract_train_state(nets, config, mesh)
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), config)
  ckpt.save(5, state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0)), {"step": 5},
            force=True)
  ckpt.wait()
  before = _listing(tmp_path)
  with pytest.raises(ValueError, match=r"different model:\n  model.ch: checkpoint 4 vs config 8"):
    train.train_and_evaluate(lifecycle_run(model__ch=8), str(tmp_path))
  assert _listing(tmp_path) == before
  # Settings that do not change what is stored may differ on resume.
  step, _ = checkpoint_lib.check_compatible(str(tmp_path), lifecycle_run(model__remat=True))
  assert step == 5


def test_benchmark_reports_its_figures():
  result = benchmark.run(tiny("biggan"), steps=2, warmup=0)
  assert result["compile_s"] > 0 and result["step_s"] > 0
  assert result["images_per_s"] == pytest.approx(8 * 2 / result["step_s"])
  assert result["peak_host_memory_mb"] > 100
  count = flops.train_step(tiny("biggan"))
  assert result["model_flops_per_step"] == count["model"] + count["ortho"] + count["per_replica"]
  # At 1 TFLOP/s a device: the FLOPs of a step over its seconds, over 1e12 x the devices
  # (the tests' 8 CPU devices: the benchmark spreads the batch over every local device).
  assert result["devices"] == jax.device_count() == 8
  assert benchmark.model_flops_utilisation(result, 1.0) == pytest.approx(
      result["model_flops_per_step"] / result["step_s"] / 8e12)


def test_biggan_pytorch_layout_follows_the_config_and_bad_input_is_named(tmp_path):
  with pytest.raises(ValueError, match="compares class-conditional BigGAN"):
    benchmark.biggan_pytorch_spec(tiny(), str(tmp_path), 2, 0)
  config = tiny("biggan", model__d_attention_res=0)
  config.loss.wrong_label_ranking = 1.0
  with pytest.raises(ValueError, match=r"has none of loss.wrong_label_ranking=1.0: add "
                                       r"--config.loss.wrong_label_ranking=0"):
    benchmark.biggan_pytorch_spec(config, str(tmp_path), 2, 0)
  config.loss.wrong_label_ranking = 0.0
  with pytest.raises(ValueError, match="not a BigGAN-PyTorch checkout .no BigGAN.py, "
                                       "train_fns.py, utils.py, layers.py"):
    benchmark.biggan_pytorch_spec(config, str(tmp_path), 2, 0)
  for name in ("BigGAN.py", "train_fns.py", "utils.py", "layers.py"):
    (tmp_path / name).write_text("")
  spec = benchmark.biggan_pytorch_spec(config, str(tmp_path), 5, 1)
  model = config.model
  assert spec["resolution"] == model.resolution and spec["ch"] == model.ch
  assert spec["batch"] == config.batch_size and spec["d_steps"] == config.optim.d_steps
  assert spec["g_attn"] == str(model.g_attention_res) != "0" and spec["d_attn"] == "0"
  assert (spec["steps"], spec["warmup"], spec["dir"]) == (5, 1, str(tmp_path))


def _run_main(*args, timeout=600, cwd=ROOT):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "bigbigan_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_entry_point_trains_and_writes_the_workdir(tmp_path):
  # A relative --workdir, as in the README's command (orbax itself wants absolute paths).
  workdir = tmp_path / "run"
  # With the conditioning options of configs/digits.py:biggan on (D's wrong-label ranking, G's
  # mode seeking, DiffAugment, LeCam, the learning-rate decay), and two checkpoints for
  # tools.conditioning (which must read D's state with LeCam's anchors in it).
  out = _run_main(f"--config={ROOT}/configs/tiny.py:biggan", "--workdir=run",
                  "--config.num_train_steps=2", "--config.checkpoint_every_steps=1",
                  "--config.loss.wrong_label_ranking=1.0", "--config.loss.translate=1",
                  "--config.loss.cutout=0.25", "--config.optim.decay_from=0.5",
                  "--config.loss.lecam=0.1", "--config.loss.mode_seeking=0.1",
                  "--config.loss.mode_seeking_from=1", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 2/2 | d_loss" in out.stderr
  scalars = tensorboard_scalars(workdir / "tensorboard")
  values = lambda name: [v for tag, vs in scalars.items() if tag.endswith(name) for v in vs]
  for name in ("d_lecam", "g_diversity"):
    assert len(values(name)) == 2 and all(np.isfinite(v) and v > 0 for v in values(name)), (
        name, values(name))
  # Mode seeking joins G's loss from step 1 on: not in the first update, in the second.
  seeking = values("g_mode_seeking")
  assert len(seeking) == 2 and seeking[0] == 0 and seeking[1] > 0, seeking
  # LeCam's anchors, kept in D's state, moved from 0 (test_losses has their arithmetic).
  anchors = inference.load(str(workdir)).discriminator_variables["lecam"]
  assert all(float(a) != 0 for a in jax.tree_util.tree_leaves(anchors)), anchors
  assert (workdir / "samples" / "step_0000002.png").exists()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
  assert (workdir / "config.json").exists()
  tool = subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.conditioning",
                         "--workdir=run", "--num=16"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert tool.returncode == 0, tool.stderr[-3000:]
  assert "2 checkpoints measured" in tool.stdout
  measures = json.loads((workdir / "conditioning.json").read_text())
  assert sorted(measures) == ["1", "2"]
  for step in measures.values():
    assert sorted(step) == sorted(conditioning.COLUMNS)
    assert all(np.isfinite(v) for v in step.values())
    assert 0 <= step["d_class_accuracy"] <= 1 and step["g_z_chunk_norm"] > 0
  # G's embedding moved in the two steps (its gradient from D's projection reached it).
  assert measures["1"]["g_shared_norm"] != measures["2"]["g_shared_norm"]
  assert (workdir / "conditioning.png").stat().st_size > 10_000


def test_entry_point_reports_bad_input_and_help(tmp_path):
  out = _run_main("--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                  "--config.batch_size=3")
  assert out.returncode != 0
  assert "error: config.batch_size=3 is not divisible" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "run").exists()
  out = _run_main("--help")
  assert "--workdir" in out.stdout and "--config" in out.stdout and "resumes" in out.stdout


def test_learning_rates_are_constant_unless_decay_from_is_set(load_config):
  config = load_config("tiny.py")
  assert config.optim.decay_from == 1.0 and state_lib.learning_rate(2e-4, config) == 2e-4
  config.num_train_steps, config.optim.decay_from = 10, 0.6
  g = state_lib.learning_rate(2e-4, config)
  d = state_lib.learning_rate(2e-4, config, updates_per_step=2)  # D: 2 updates a step.
  # Held to step 6, then linear to 0 at step 10, counted in each optimiser's own updates.
  np.testing.assert_allclose([float(g(n)) for n in (0, 6, 8, 10, 12)],
                             [2e-4, 2e-4, 1e-4, 0, 0], atol=1e-12)
  np.testing.assert_allclose([float(d(n)) for n in (0, 12, 16, 20)], [2e-4, 2e-4, 1e-4, 0],
                             atol=1e-12)
  tx_d, tx_ge = state_lib.make_optimizers(config)
  params = {"w": jax.numpy.ones(3)}
  grads = {"w": jax.numpy.ones(3)}
  opt = tx_d.init(params)
  sizes = []
  for _ in range(20):
    updates, opt = tx_d.update(grads, opt, params)
    sizes.append(float(abs(updates["w"][0])))
  # Adam's unit steps scaled by D's rate: full for 12 updates, then shrinking to 0.
  np.testing.assert_allclose(sizes[:12], 2e-4, rtol=1e-3)
  assert sizes[12] > sizes[15] > sizes[19] > 0
  for bad in (1.5, -0.1):
    config.optim.decay_from = bad
    with pytest.raises(ValueError, match="optim.decay_from"):
      config_lib.validate(config)
