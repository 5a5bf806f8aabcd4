"""The training loop: set-up and resume, the steps, logs, previews, checkpoints and
evaluations.

`prepare` does every check that can fail on bad input (and the restore) before anything is
compiled; `train_and_evaluate` runs from there to `config.num_train_steps`, saving on
preemption and stopping at the first non-finite loss with the last good checkpoint intact.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

from absl import logging
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
from bigbigan_jax.reporting import curves
from bigbigan_jax.reporting import images as images_lib
from bigbigan_jax.reporting import metric_writer
from bigbigan_jax.training import checkpoint as checkpoint_lib
from bigbigan_jax.training import faults
from bigbigan_jax.training import objectives
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


def check(config: ml_collections.ConfigDict, workdir: str):
  """`--dry_run`: what `prepare` checks, without restoring or writing anything."""
  state_lib.setup(config)
  _, data_state = checkpoint_lib.check_compatible(workdir, config)
  pipeline.create_input_iter(config, split=config.data.train_split, start_state=data_state,
                             train=True)
  # Deferred, as in train_and_evaluate.
  from bigbigan_jax.evaluation import \
      evaluators as evaluators_lib  # pylint: disable=g-import-not-at-top
  evaluators_lib.build(config, workdir, skip_unavailable=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains (or resumes training) in `workdir` up to config.num_train_steps.

  The workdir receives checkpoints/ (orbax), tensorboard/ (event files), samples/ (EMA G at
  fixed z) and, for BigBiGAN, reconstructions/ (real | G(E(x))) as PNG grids. config.evals
  run every config.eval_every_steps and at the end, into eval/ (JSON) and TensorBoard.

  Returns:
    The final train state.
  """
  nets, mesh, abstract_state, resume_step, state, train_iter = prepare(config, workdir)
  # Deferred: evaluators builds inference.Model, and inference imports this module.
  from bigbigan_jax.evaluation import \
      evaluators as evaluators_lib  # pylint: disable=g-import-not-at-top

  # FID without Inception weights is skipped with one warning here, not a crash hours in.
  evals = evaluators_lib.build(config, workdir, skip_unavailable=True)
  primary = jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpoints(workdir, config)
  if resume_step is not None:
    logging.info("Resuming from %s at step %d.", checkpoint_lib.checkpoint_dir(workdir),
                 resume_step)
  else:
    logging.info("Starting from scratch in %s.", workdir)
    state = state_lib.make_init_fn(nets, config, abstract_state)(jax.random.PRNGKey(config.seed))
  start = int(state.step)
  batches = step_lib.stacked_batches(train_iter, config.optim.d_steps)
  step_fn = step_lib.make_train_step(nets, config, mesh, abstract_state)

  writer = metric_writer.MetricWriter(workdir, enabled=primary)
  progress = metric_writer.Progress(start, config.num_train_steps,
                                    config.batch_size * config.optim.d_steps)
  previews = _Previews(nets, config, mesh, workdir, writer)
  preemption = faults.Preemption()
  watch = None
  if jax.process_count() > 1:
    watch = faults.ProcessWatch(config.lost_process_timeout_s, workdir).start()
  if start == 0 and primary:
    with open_text(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  console_keys = objectives.build(nets, config.loss).console_keys
  previous = None  # (step, metrics) of the step before, checked once the next is queued.
  try:
    for step in range(start + 1, config.num_train_steps + 1):
      local = next(batches)
      # Everything below runs collectives: in a multi-process run, one that fails means a
      # process was lost, and this one exits saying so.
      with faults.collectives(f"Step {step}", workdir):
        if step == start + 1:
          previews.set_reals(local["image"][-1])
        batch = step_lib.to_global(local, config, nets, mesh)
        if step == start + 1:
          step_fn = faults.compile_on_every_process(step_fn, state, batch)
        state, metrics = step_fn(state, batch)
        # Checking one step late keeps the device busy while the host looks; the run still
        # stops at the first non-finite step, before any checkpoint of it is written.
        if previous is not None:
          _check_finite(jax.device_get(previous[1]), previous[0], ckpt)
        previous = (step, metrics)
        if step == start + 1:
          jax.block_until_ready(metrics)
          logging.info("First step done (compiled). Training to step %d.",
                       config.num_train_steps)
          progress.start(step)
        last = step == config.num_train_steps
        # Called on every process at every step: the preemption service agrees on the step.
        stop = preemption.reached(step)
        if step % config.log_every_steps == 0 or last or stop:
          host_metrics = _check_finite(jax.device_get(metrics), step, ckpt)
          rates = progress.report(step, host_metrics, console_keys)
          writer.scalars(step, {**host_metrics, **rates})
        if step % config.sample_every_steps == 0 or last:
          previews.write(step, state)
        if step % config.checkpoint_every_steps == 0 or last or stop:
          _check_finite(jax.device_get(metrics), step, ckpt)
          ckpt.save(step, state, train_iter.get_state(), force=True)
        # After the save: an evaluation that fails loses no training.
        if evals and (last or (config.eval_every_steps and step % config.eval_every_steps == 0)):
          evaluators_lib.report(step, evaluators_lib.run_on_state(evals, nets, state, config),
                                workdir, writer)
          if config.eval_every_steps and primary:
            curves.plot(workdir)
          progress.start(step)  # The next rate leaves the evaluation's time out.
        if stop:
          ckpt.wait()
          logging.warning("Stopped at step %d for preemption; the checkpoint is saved. Rerun "
                          "the same command to resume.", step)
          break
    if watch is not None:
      watch.finished()  # The others need not wait for this process any more.
  finally:
    ckpt.wait()
    ckpt.close()
    writer.flush()
    preemption.close()
    if watch is not None:
      watch.stop()
  return state


def open_text(path: str, mode: str):
  import tensorflow as tf  # Deferred: gfile (GCS-capable), and TF is loaded by then anyway.
  return tf.io.gfile.GFile(path, mode)


def _check_finite(metrics: dict, step: int, ckpt: checkpoint_lib.Checkpoints) -> dict:
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


class _Previews:
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
