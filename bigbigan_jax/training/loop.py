"""The pieces of the training loop below the evaluators: set-up and resume (`prepare`), the
non-finite check, and the sample and reconstruction previews. `bigbigan_jax.train` runs the
loop itself, with the evaluators and checkpoint keeping, from above both.

`prepare` does every check that can fail on bad input (and the restore) before anything is
compiled.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax.data import pipeline
from bigbigan_jax.models import networks
from bigbigan_jax.models.networks import E
from bigbigan_jax.models.networks import G
from bigbigan_jax.reporting import images as images_lib
from bigbigan_jax.training import checkpoint as checkpoint_lib
from bigbigan_jax.training import state as state_lib
from bigbigan_jax.training import step as step_lib


@functools.lru_cache(maxsize=8)
def make_sample_fn(nets, mesh):
  """jit'd (EMA params, G state, z, labels) → G(z) in eval mode (running BN statistics)."""
  def sample(ema_params, g_state, z, labels):
    return nets.generator.apply({"params": ema_params, **g_state}, z, labels, train=False)
  return jax.jit(sample, out_shardings=sharding_lib.replicated(mesh))


@functools.lru_cache(maxsize=8)
def make_reconstruct_fn(nets, mesh):
  """jit'd (state, x, key) → G_ema(E(x).z_sample) in eval mode."""
  def reconstruct(state, images, key):
    enc = nets.encoder.apply({"params": state.params[E], **state.model_state[E]}, images,
                             train=False, rngs={"noise": key})
    return nets.generator.apply({"params": state.ema_params, **state.model_state[G]},
                                enc["z_sample"], None, train=False)
  return jax.jit(reconstruct, out_shardings=sharding_lib.replicated(mesh))


class Prepared(NamedTuple):
  nets: networks.Networks
  mesh: Any
  abstract_state: state_lib.TrainState
  resume_step: int | None  # None: a fresh start.
  resumed_state: state_lib.TrainState | None  # The checkpoint's train state at resume_step.
  train_iter: pipeline.InputIterator  # Positioned where the resumed run continues.


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Prepared:
  """Every check that can fail on bad input, and the resume, before anything is compiled.

  Raises:
    ValueError: invalid config, indivisible batch, unusable data source (unknown dataset or
      split, empty folder, ...), a workdir holding a checkpoint of a different model, or one
      whose checkpoints are all damaged.
  """
  nets, mesh, abstract_state = state_lib.setup(config)
  resume_step, state, data_state = checkpoint_lib.restore_newest_intact(
      workdir, config, abstract_state)
  train_iter = pipeline.create_input_iter(config, split=config.data.train_split,
                                                start_state=data_state, train=True)
  return Prepared(nets, mesh, abstract_state, resume_step, state, train_iter)


def check_finite(metrics: dict, step: int, ckpt: checkpoint_lib.Checkpoints) -> dict:
  """Stops the run at the first non-finite loss, leaving the last good checkpoint alone."""
  bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
  if bad:
    ckpt.wait()
    last = ckpt.latest_step()
    raise FloatingPointError(
        f"non-finite values at step {step}: {', '.join(bad)}. Training stopped; the last good "
        f"checkpoint is step {last} (kept). Lower the learning rates (config.optim.*_lr) or "
        "check the input data, then rerun to resume from it.")
  return metrics


class Previews:
  """Sample grids of the EMA generator at fixed z, and real | G(E(x)) reconstructions."""

  def __init__(self, nets, config, mesh, workdir, writer):
    self.nets, self.workdir, self.writer = nets, workdir, writer
    n = config.num_sample_images
    key = jax.random.PRNGKey(config.seed + 1)
    self.z, self.labels = step_lib.sample_latents(key, nets, n)
    if nets.num_classes:  # Classes in order, so each row of the grid is readable.
      self.labels = jnp.arange(n, dtype=jnp.int32) % nets.num_classes
    self.sample = make_sample_fn(nets, mesh)
    self.reconstruct = make_reconstruct_fn(nets, mesh) if nets.is_bigbigan else None
    self.reals = None
    self.num = n

  def set_reals(self, local_images):
    """Fixes the real images to reconstruct: process 0's first ones, the same on all hosts."""
    if self.reconstruct is None:
      return
    n = min(self.num, local_images.shape[0])
    self.reals = multihost_utils.broadcast_one_to_all(np.asarray(local_images[:n]))

  def write(self, step: int, state: state_lib.TrainState):
    cols = int(math.ceil(math.sqrt(self.num)))
    grids = {"samples": images_lib.grid(jax.device_get(
        self.sample(state.ema_params, state.model_state[G], self.z, self.labels)), cols)}
    if self.reconstruct is not None and self.reals is not None:
      recon = jax.device_get(self.reconstruct(state, self.reals, jax.random.PRNGKey(0)))
      reals = jax.device_get(networks.pool_for_discriminator(jnp.asarray(self.reals),
                                                    self.nets.resolution))
      cols = 2 * max(1, int(math.sqrt(len(reals) / 2)))
      grids["reconstructions"] = images_lib.grid(images_lib.interleave(reals, recon), cols)
    if jax.process_index() == 0:
      for name, image in grids.items():
        images_lib.save_png(os.path.join(self.workdir, name, f"step_{step:07d}.png"), image)
      self.writer.images(step, grids)
