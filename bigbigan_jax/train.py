"""BigBiGAN and BigGAN training: the train state, the update step, and the loop.

One call of `train_step` is one iteration of the paper's recipe:
  1. `d_steps` D updates, each on a fresh real batch and fresh z. BigBiGAN: D scores encoder
     pairs (x, E(x)) against generator pairs (G(z), z) with three hinged scores; BigGAN: D
     scores (x, y) against (G(z, y'), y') with the projection head. G and E get no gradient.
  2. One E/G update (BigBiGAN: E and G together on the signed score sum; BigGAN: G alone)
     plus orthogonal regularisation of G's kernels.
  3. The EMA of G's weights.
Real and fake examples go through D in one concatenated call. Batch norm in G and E always
uses the global batch's statistics: the step runs under `jax.jit` on arrays sharded over
every device of every host, so the reductions span the whole batch.

`init_train_state` and `train_step` are module-level and pure; `make_train_step` binds the
static parts with functools.partial and jits them with shardings, and both the trainer and the
ahead-of-time compile tool (`bigbigan_jax.aot`) call it.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from bigbigan_jax import checkpoint as checkpoint_lib
from bigbigan_jax import config as config_lib
from bigbigan_jax import curves
from bigbigan_jax import faults
from bigbigan_jax import images as images_lib
from bigbigan_jax import input_pipeline
from bigbigan_jax import losses
from bigbigan_jax import metric_writer
from bigbigan_jax import models
from bigbigan_jax import objectives
from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax.models import D
from bigbigan_jax.models import E
from bigbigan_jax.models import G


# ---------------------------------------------------------------------------------------------
# Train state.
# ---------------------------------------------------------------------------------------------


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run carries from step to step.

  Attributes:
    step: completed iterations.
    params: {"generator", "discriminator"[, "encoder"]} trainable weights.
    model_state: per network, its non-trained collections ("spectral", "batch_stats").
    ema_params: exponential moving average of G's params (what samples and evals use).
    opt_d: Adam state of D.
    opt_ge: Adam state of G and E (one optimiser, a learning rate per network).
    rng: base key; step s draws its randomness from fold_in(rng, s), so a resumed run and an
      uninterrupted one use the same numbers.
  """

  step: jax.Array
  params: dict
  model_state: dict
  ema_params: Any
  opt_d: Any
  opt_ge: Any
  rng: jax.Array


def make_optimizers(config: ml_collections.ConfigDict):
  """(D's optimiser, G+E's optimiser): Adam with β1=0, β2=0.999 by default (BigGAN's recipe)."""
  o = config.optim
  adam = lambda lr: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  ge = optax.multi_transform(
      {G: adam(o.g_lr), E: adam(o.e_lr)},
      lambda params: {name: jax.tree_util.tree_map(lambda _: name, p)
                      for name, p in params.items()})
  return adam(o.d_lr), ge


def _ge(params: dict) -> dict:
  return {k: params[k] for k in (G, E) if k in params}


def init_train_state(rng: jax.Array, *, nets: models.Networks,
                     config: ml_collections.ConfigDict) -> TrainState:
  """A fresh train state (pure: jit it with out_shardings to create it sharded)."""
  init_key, state_key = jax.random.split(rng)
  variables = nets.init(init_key)
  params = {name: v["params"] for name, v in variables.items()}
  model_state = {name: {c: x for c, x in v.items() if c != "params"}
                 for name, v in variables.items()}
  tx_d, tx_ge = make_optimizers(config)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
      ema_params=params[G], opt_d=tx_d.init(params[D]), opt_ge=tx_ge.init(_ge(params)),
      rng=state_key)


# ---------------------------------------------------------------------------------------------
# The update step.
# ---------------------------------------------------------------------------------------------


def _sample_latents(key, nets: models.Networks, batch: int):
  """z ~ N(0, I) and, for class-conditional G, labels uniform over the classes."""
  z_key, y_key = jax.random.split(key)
  z = jax.random.normal(z_key, (batch, nets.z_dim), jnp.float32)
  labels = (jax.random.randint(y_key, (batch,), 0, nets.num_classes)
            if nets.num_classes else None)
  return z, labels


def train_step(state: TrainState, batch: dict, *, nets: models.Networks,
               config: ml_collections.ConfigDict):
  """One iteration: `d_steps` D updates, one E/G update, the EMA of G.

  What the two model kinds differ in (the pairs, the losses, who learns) is the objective's
  (`objectives.build`); this function has no model-kind branch.

  Args:
    state: the current TrainState.
    batch: {"image": (d_steps, B, R_E, R_E, 3) in [-1, 1], "label": (d_steps, B)}: one real
      batch per D update; the E/G update reuses the last. B is the global batch.
    nets, config: static; bind them with functools.partial.

  Returns:
    (new state, metrics): metrics are float32 scalars: every loss term, mean scores on real
    and fake pairs, D's accuracy, gradient norms, and σ0 of G's and D's first and last layers.
  """
  objective = objectives.build(nets, config.loss)
  tx_d, tx_ge = make_optimizers(config)
  batch_size = batch["image"].shape[1]
  step_key = jax.random.fold_in(state.rng, state.step)
  d_keys = jax.random.split(jax.random.fold_in(step_key, 0), batch["image"].shape[0])
  g_vars = {"params": state.params[G], **state.model_state[G]}

  # --- D updates, unrolled in Python: XLA:CPU runs convolutions inside a while loop (what
  # lax.scan lowers to, even with unroll=True) ~50x slower: 75 s vs 1.5 s a step on the
  # digits config. d_steps is 1-2, so the program stays small.
  def d_update(carry, inputs):
    d_params, d_state, opt_d = carry
    (images, labels), key = inputs
    latent_key, noise_key = jax.random.split(key)
    z, fake_labels = _sample_latents(latent_key, nets, batch_size)
    # G and E run in training mode (batch statistics), but neither learns here, and their
    # state updates are dropped: the E/G step makes them.
    fake = jax.lax.stop_gradient(nets.generator.apply(g_vars, z, fake_labels, train=True,
                                                      mutable=["spectral", "batch_stats"])[0])
    real = objective.real_pairs(state.params, state.model_state, images, labels, noise_key)
    x = jnp.concatenate([real.x, fake])
    c = jnp.concatenate([jax.lax.stop_gradient(real.c),
                         objective.fake_condition(z, fake_labels)])

    def loss_fn(p):
      scores, new_state = nets.discriminator.apply({"params": p, **d_state}, x, c, train=True,
                                                   mutable=["spectral"])
      loss, metrics = objective.d_loss(*objectives.split_scores(scores, batch_size))
      return loss, (metrics, new_state)

    (_, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
    updates, opt_d = tx_d.update(grads, opt_d, d_params)
    metrics["grad_norm/d"] = optax.tree.norm(grads)
    return (optax.apply_updates(d_params, updates), new_state, opt_d), metrics

  carry = (state.params[D], state.model_state[D], state.opt_d)
  for i in range(batch["image"].shape[0]):
    carry, d_metrics = d_update(carry, ((batch["image"][i], batch["label"][i]), d_keys[i]))
  d_params, d_state, opt_d = carry  # d_metrics: the last D update's.

  # --- E/G update. ----------------------------------------------------------------------
  latent_key, noise_key = jax.random.split(jax.random.fold_in(step_key, 1))
  z, fake_labels = _sample_latents(latent_key, nets, batch_size)
  images, labels = batch["image"][-1], batch["label"][-1]
  d_vars = {"params": d_params, **d_state}
  score = lambda x, c: nets.discriminator.apply(d_vars, x, c, train=False)

  def ge_loss_fn(ge):
    params = {**state.params, **ge}
    fake, g_state = nets.generator.apply({"params": ge[G], **state.model_state[G]}, z,
                                         fake_labels, train=True,
                                         mutable=["spectral", "batch_stats"])
    real = objective.real_pairs(params, state.model_state, images, labels, noise_key)
    loss, terms = objective.eg_loss(score, real, fake, objective.fake_condition(z, fake_labels))
    ortho = losses.orthogonal_regularizer(ge[G], config.loss.ortho_beta)
    return loss + ortho, ({"eg_loss": loss, "ortho_loss": ortho, **terms},
                          {G: g_state, **real.new_state})

  ge_params = {name: state.params[name] for name in objective.eg_networks}
  (_, (ge_metrics, ge_state)), grads = jax.value_and_grad(ge_loss_fn, has_aux=True)(ge_params)
  updates, opt_ge = tx_ge.update(grads, state.opt_ge, ge_params)
  ge_params = optax.apply_updates(ge_params, updates)
  ge_metrics.update({f"grad_norm/{name[0]}": optax.tree.norm(g) for name, g in grads.items()})

  # --- EMA of G: a copy of the weights until ema.start_step, then a moving average. ---------
  decay = jnp.where(state.step >= config.ema.start_step, config.ema.decay, 0.0)
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params,
                               ge_params[G])

  model_state = {**state.model_state, D: d_state, **ge_state}
  new_state = state.replace(
      step=state.step + 1, params={**state.params, D: d_params, **ge_params},
      model_state=model_state, ema_params=ema, opt_d=opt_d, opt_ge=opt_ge)
  metrics = {**d_metrics, **ge_metrics, **objectives.sigma_metrics(objective, model_state)}
  return new_state, jax.tree_util.tree_map(lambda m: m.astype(jnp.float32), metrics)


# ---------------------------------------------------------------------------------------------
# Jitted, sharded functions.
# ---------------------------------------------------------------------------------------------


def abstract_train_state(nets, config, mesh):
  """The train state's shapes with their target shardings attached (no allocation)."""
  shapes = jax.eval_shape(functools.partial(init_train_state, nets=nets, config=config),
                          jax.random.PRNGKey(0))
  shardings = sharding_lib.state_sharding(mesh, shapes, config.shard_params)
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _shardings(tree):
  return jax.tree_util.tree_map(lambda s: s.sharding, tree)


def make_init_fn(nets, config, abstract_state):
  """jit(init_train_state) that creates every array directly in its sharding."""
  return jax.jit(functools.partial(init_train_state, nets=nets, config=config),
                 out_shardings=_shardings(abstract_state))


def batch_spec(config, nets, mesh) -> dict:
  """ShapeDtypeStructs of one step's global batch, sharded over the data axis."""
  d, b, r = config.optim.d_steps, config.batch_size, nets.encoder_resolution
  sh = sharding_lib.batch_sharding(mesh, leading_axes=1)
  return {"image": jax.ShapeDtypeStruct((d, b, r, r, 3), jnp.float32, sharding=sh),
          "label": jax.ShapeDtypeStruct((d, b), jnp.int32, sharding=sh)}


def make_train_step(nets, config, mesh, abstract_state):
  """jit(train_step) with the state donated and NamedSharding in/out shardings."""
  state_sh = _shardings(abstract_state)
  batch_sh = _shardings(batch_spec(config, nets, mesh))
  return jax.jit(functools.partial(train_step, nets=nets, config=config),
                 in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)


def make_sample_fn(nets, mesh):
  """jit'd (EMA params, G state, z, labels) → G(z) in eval mode (running BN statistics)."""
  def sample(ema_params, g_state, z, labels):
    return nets.generator.apply({"params": ema_params, **g_state}, z, labels, train=False)
  return jax.jit(sample, out_shardings=sharding_lib.replicated(mesh))


def make_reconstruct_fn(nets, mesh):
  """jit'd (state, x, key) → G_ema(E(x).z_sample) in eval mode."""
  def reconstruct(state, images, key):
    enc = nets.encoder.apply({"params": state.params[E], **state.model_state[E]}, images,
                             train=False, rngs={"noise": key})
    return nets.generator.apply({"params": state.ema_params, **state.model_state[G]},
                                enc["z_sample"], None, train=False)
  return jax.jit(reconstruct, out_shardings=sharding_lib.replicated(mesh))


# ---------------------------------------------------------------------------------------------
# Input.
# ---------------------------------------------------------------------------------------------


def stacked_batches(iterator, d_steps: int):
  """Groups `d_steps` consecutive local batches: one train step's real data."""
  while True:
    parts = [next(iterator) for _ in range(d_steps)]
    yield {k: np.stack([p[k] for p in parts]) for k in ("image", "label")}


def to_global(local_batch: dict, config, nets, mesh) -> dict:
  """Each process's slice of the batch → global arrays sharded over every device."""
  spec = batch_spec(config, nets, mesh)
  return {k: jax.make_array_from_process_local_data(spec[k].sharding, v, spec[k].shape)
          for k, v in local_batch.items()}


# ---------------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------------


class Prepared(NamedTuple):
  nets: models.Networks
  mesh: Any
  abstract_state: TrainState
  resume_step: int | None  # None: a fresh start.
  resumed_state: TrainState | None  # The checkpoint's train state at resume_step.
  train_iter: input_pipeline.InputIterator  # Positioned where the resumed run continues.


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Prepared:
  """Every check that can fail on bad input, and the resume, before anything is compiled.

  Raises:
    ValueError: invalid config, indivisible batch, unusable data source (unknown dataset or
      split, empty folder, ...), a workdir holding a checkpoint of a different model, or one
      whose checkpoints are all damaged.
  """
  config_lib.validate(config)
  nets = models.build(config.model)
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_divisible(config.batch_size, mesh)
  abstract_state = abstract_train_state(nets, config, mesh)
  resume_step, state, data_state = checkpoint_lib.restore_newest_intact(
      workdir, config, abstract_state)
  train_iter = input_pipeline.create_input_iter(config, split=config.data.train_split,
                                                start_state=data_state, train=True)
  return Prepared(nets, mesh, abstract_state, resume_step, state, train_iter)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes training) in `workdir` up to config.num_train_steps.

  The workdir receives checkpoints/ (orbax), tensorboard/ (event files), samples/ (EMA G at
  fixed z) and, for BigBiGAN, reconstructions/ (real | G(E(x))) as PNG grids. config.evals
  run every config.eval_every_steps and at the end, into eval/ (JSON) and TensorBoard.

  Returns:
    The final train state.
  """
  nets, mesh, abstract_state, resume_step, state, train_iter = prepare(config, workdir)
  # Deferred: evaluators builds inference.Model, and inference imports this module.
  from bigbigan_jax import evaluators as evaluators_lib  # pylint: disable=g-import-not-at-top
  # FID without Inception weights is skipped with one warning here, not a crash hours in.
  evals = evaluators_lib.build(config, workdir, skip_unavailable=True)
  primary = jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpoints(workdir, config)
  if resume_step is not None:
    logging.info("Resuming from %s at step %d.", checkpoint_lib.checkpoint_dir(workdir),
                 resume_step)
  else:
    logging.info("Starting from scratch in %s.", workdir)
    state = make_init_fn(nets, config, abstract_state)(jax.random.PRNGKey(config.seed))
  start = int(state.step)
  batches = stacked_batches(train_iter, config.optim.d_steps)
  step_fn = make_train_step(nets, config, mesh, abstract_state)

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
        batch = to_global(local, config, nets, mesh)
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
    self.z, self.labels = _sample_latents(key, nets, n)
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

  def write(self, step: int, state: TrainState):
    cols = int(math.ceil(math.sqrt(self.num)))
    grids = {"samples": images_lib.grid(jax.device_get(
        self.sample(state.ema_params, state.model_state[G], self.z, self.labels)), cols)}
    if self.reconstruct is not None and self.reals is not None:
      recon = jax.device_get(self.reconstruct(state, self.reals, jax.random.PRNGKey(0)))
      reals = jax.device_get(models.pool_for_discriminator(jnp.asarray(self.reals),
                                                    self.nets.resolution))
      cols = 2 * max(1, int(math.sqrt(len(reals) / 2)))
      grids["reconstructions"] = images_lib.grid(images_lib.interleave(reals, recon), cols)
    if jax.process_index() == 0:
      for name, image in grids.items():
        images_lib.save_png(os.path.join(self.workdir, name, f"step_{step:07d}.png"), image)
      self.writer.images(step, grids)
