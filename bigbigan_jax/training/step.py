"""One train step: `d_steps` D updates, one E/G update, the EMA of G.

Real and fake examples go through D in one concatenated call. Batch norm in G and E always uses
the global batch's statistics: the step runs under `jax.jit` on arrays sharded over every
device of every host, so the reductions span the whole batch. What BigBiGAN and BigGAN differ
in is their objective's (`training.objectives`); the step has no model-kind branch.

`train_step` is module-level and pure; `make_train_step` binds the static parts with
functools.partial and jits it with shardings. The trainer, `tools.aot` and `tools.benchmark`
all call it. docs/design.md ("The step") says why the D updates are unrolled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax.models import networks
from bigbigan_jax.models.networks import D
from bigbigan_jax.models.networks import G
from bigbigan_jax.training import losses
from bigbigan_jax.training import objectives
from bigbigan_jax.training import state as state_lib


def sample_latents(key, nets: networks.Networks, batch: int):
  """z ~ N(0, I) and, for class-conditional G, labels uniform over the classes."""
  z_key, y_key = jax.random.split(key)
  z = jax.random.normal(z_key, (batch, nets.z_dim), jnp.float32)
  labels = (jax.random.randint(y_key, (batch,), 0, nets.num_classes)
            if nets.num_classes else None)
  return z, labels


def train_step(state: state_lib.TrainState, batch: dict, *, nets: networks.Networks,
               config: ml_collections.ConfigDict, mesh=None):
  """One iteration: `d_steps` D updates, one E/G update, the EMA of G.

  What the two model kinds differ in (the pairs, the losses, who learns) is the objective's
  (`objectives.build`); this function has no model-kind branch.

  Args:
    state: the current TrainState.
    batch: {"image": (d_steps, B, R_E, R_E, 3) in [-1, 1], "label": (d_steps, B)}: one real
      batch per D update; the E/G update reuses the last. B is the global batch.
    nets, config: static; bind them with functools.partial.
    mesh: the device mesh the step runs on (static), or None: with several devices the
      orthogonal regulariser is split over its data axis (`sharding.sum_of_shares`).

  Returns:
    (new state, metrics): metrics are float32 scalars: every loss term, mean scores on real
    and fake pairs, D's accuracy, gradient norms, and σ0 of G's and D's first and last layers.
  """
  objective = objectives.build(nets, config.loss)
  tx_d, tx_ge = state_lib.make_optimizers(config)
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
    z, fake_labels = sample_latents(latent_key, nets, batch_size)
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
  regression_key = jax.random.fold_in(step_key, 2)
  z, fake_labels = sample_latents(latent_key, nets, batch_size)
  images, labels = batch["image"][-1], batch["label"][-1]
  d_vars = {"params": d_params, **d_state}
  score = lambda x, c: nets.discriminator.apply(d_vars, x, c, train=False)

  def ge_loss_fn(ge):
    params = {**state.params, **ge}
    fake, g_state = nets.generator.apply({"params": ge[G], **state.model_state[G]}, z,
                                         fake_labels, train=True,
                                         mutable=["spectral", "batch_stats"])
    real = objective.real_pairs(params, state.model_state, images, labels, noise_key)
    loss, terms = objective.eg_loss(score, real, fake, objective.fake_condition(z, fake_labels),
                                    params, state.model_state, regression_key)
    ortho = sharding_lib.sum_of_shares(
        functools.partial(losses.orthogonal_regularizer, beta=config.loss.ortho_beta),
        mesh, ge[G])
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


def batch_spec(config, nets, mesh) -> dict:
  """ShapeDtypeStructs of one step's global batch, sharded over the data axis."""
  d, b, r = config.optim.d_steps, config.batch_size, nets.encoder_resolution
  sh = sharding_lib.batch_sharding(mesh, leading_axes=1)
  return {"image": jax.ShapeDtypeStruct((d, b, r, r, 3), jnp.float32, sharding=sh),
          "label": jax.ShapeDtypeStruct((d, b), jnp.int32, sharding=sh)}


def make_train_step(nets, config, mesh, abstract_state):
  """jit(train_step) with the state donated and NamedSharding in/out shardings.

  The step reads only config.loss, .optim and .ema (`state.step_settings`): equal networks,
  settings and shardings give the same jitted function, already traced and compiled when a
  process trains a second time (a notebook cell run again, the resume tests).
  """
  return _jit_step(nets, state_lib.step_settings(config), mesh,
                   state_lib.HashableTree(state_lib.shardings_of(abstract_state)),
                   state_lib.HashableTree(state_lib.shardings_of(batch_spec(config, nets, mesh))))


@functools.lru_cache(maxsize=8)
def _jit_step(nets, settings, mesh, state_sh, batch_sh):
  return jax.jit(functools.partial(train_step, nets=nets, config=settings, mesh=mesh),
                 in_shardings=(state_sh.tree, batch_sh.tree),
                 out_shardings=(state_sh.tree, sharding_lib.replicated(mesh)), donate_argnums=0)


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
