"""One train step from a fixed init and a fixed batch: what the step-comparison tests share."""

import pathlib

import jax
import numpy as np

from bigbigan_jax import sharding
from bigbigan_jax.models import networks
from bigbigan_jax.training import checkpoint as checkpoint_lib
from bigbigan_jax.training import state as state_lib
from bigbigan_jax.training import step as step_lib

# The runs of the tests of a run's life (resume, rollback, damaged checkpoints, signals, the
# bucket): configs/tiny.py:lifecycle with these overrides, in this process or through the
# entry point, on the 8 CPU devices. One set, so that they all run one step program, compiled
# by the first and loaded from the persistent cache by the others; it is also the program of
# test_accumulation's 8-device test and test_multihost's one-host reference (two D updates a
# step, each averaging 2 micro-batches, the EMA from step 0 at decay 0.5). Resuming must not
# change which examples, latents or noise each micro-batch gets.
LIFECYCLE_RUN = {"num_train_steps": 12, "log_every_steps": 4, "sample_every_steps": 1000,
                 "batch_size": 16, "optim__microbatches": 2, "optim__d_steps": 2,
                 "ema__start_step": 0, "ema__decay": 0.5}
# The same, as the entry point's flags.
LIFECYCLE_FLAGS = tuple(f"--config.{key.replace('__', '.')}={value}"
                        for key, value in LIFECYCLE_RUN.items())


def tensorboard_scalars(directory) -> dict:
  """{tag: [value, ...] in the order written} of the scalar summaries of every event file in
  `directory` (tf.summary.scalar writes them as tensors; images and text are left out)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted(pathlib.Path(directory).iterdir()):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          values.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
  return values


def flat(tree) -> np.ndarray:
  """Every leaf of `tree`, raveled into one float64 vector."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def _random_batch(config, nets, rng):
  r, d = nets.encoder_resolution, config.optim.d_steps
  return {"image": rng.uniform(-1, 1, (d, config.batch_size, r, r, 3)).astype(np.float32),
          "label": rng.integers(0, 10, (d, config.batch_size)).astype(np.int32)}


def run_steps(config, num_steps: int, num_devices: int = 1):
  """The state after `num_steps` train steps from PRNGKey(0)'s init, each on a fresh seeded
  random batch."""
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", num_devices),), jax.devices()[:num_devices])
  abstract = state_lib.abstract_train_state(nets, config, mesh)
  state = state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0))
  step = step_lib.make_train_step(nets, config, mesh, abstract)
  rng = np.random.default_rng(0)
  for _ in range(num_steps):
    state, _ = step(state, step_lib.to_global(_random_batch(config, nets, rng), config, nets, mesh))
  return state


def initial_state(config, num_devices: int = 1):
  """The state `one_step` and `run_steps` start from: PRNGKey(0)'s init by the same jitted
  program (a second call in a process compiles nothing; eager init would dispatch, and
  compile, each of its thousands of operations apart)."""
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", num_devices),), jax.devices()[:num_devices])
  abstract = state_lib.abstract_train_state(nets, config, mesh)
  return state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0))


def one_step(config, num_devices: int):
  """(state after one train step, its metrics on the host, the abstract state) on a mesh of
  the first `num_devices` devices, from PRNGKey(0)'s init and a seeded random batch."""
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", num_devices),), jax.devices()[:num_devices])
  abstract = state_lib.abstract_train_state(nets, config, mesh)
  state = state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  r, d = nets.encoder_resolution, config.optim.d_steps
  local = {"image": rng.uniform(-1, 1, (d, config.batch_size, r, r, 3)).astype(np.float32),
           "label": rng.integers(0, 10, (d, config.batch_size)).astype(np.int32)}
  state, metrics = step_lib.make_train_step(nets, config, mesh, abstract)(
      state, step_lib.to_global(local, config, nets, mesh))
  return state, jax.device_get(metrics), abstract


def save_initial_state(config, workdir, steps=(1,)):
  """Checkpoints of `config`'s initial weights at `steps` (what sampling, evaluation and the
  README's commands need: weights, not good ones). Returns the workdir as a str."""
  nets = networks.build(config.model)
  abstract = state_lib.abstract_train_state(nets, config, sharding.make_mesh(config.mesh))
  state = state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0))
  config = config.copy_and_resolve_references()
  config.keep_checkpoints = max(config.keep_checkpoints, len(steps))  # Every one stays.
  ckpt = checkpoint_lib.Checkpoints(str(workdir), config)
  for step in steps:  # The state's own step is the checkpoint's, as in a run.
    at_step = state.replace(step=jax.device_put(np.asarray(step, state.step.dtype),
                                                state.step.sharding))
    ckpt.save(step, at_step, {"step": step}, force=True)
  ckpt.wait()
  ckpt.close()
  return str(workdir)
