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


def microbatch_loop(optim: ml_collections.ConfigDict, mesh=None) -> str:
  """config.optim.microbatch_loop with "auto" resolved for the mesh's platform: "unrolled"
  on the CPU, whose convolutions run far slower inside a while loop (docs/design.md, "The
  step"); "scan" elsewhere, where one micro-batch's program keeps memory flat in k."""
  loop = optim.microbatch_loop
  if loop == "auto":
    platform = (mesh.devices.flat[0].platform if mesh is not None
                else jax.default_backend())
    loop = "unrolled" if platform == "cpu" else "scan"
  return loop


def microbatch_key(key, j, k: int):
  """Micro-batch j's key of k: the key itself when there is one micro-batch (the step
  without accumulation), else fold_in(key, j)."""
  return key if k == 1 else jax.random.fold_in(key, j)


def accumulate(fn, carry, inputs, *, k: int, loop: str = "unrolled", mesh=None):
  """Runs `fn` on k micro-batches of `inputs` in order and averages what it returns.

  Args:
    fn: (carry, micro-batch inputs, j) → (carry, (grads, metrics)). The carry threads through
      the micro-batches in order (spectral-norm vectors, running BN statistics); j is the
      micro-batch's index (a Python int when unrolled, a traced int32 in a scan).
    carry: its initial value.
    inputs: a pytree whose leaves have the (global) example axis first.
    k: micro-batches. Micro-batch j holds rows j, j + k, j + 2k, ... of every leaf: each
      device's contiguous share of the batch splits into k equal parts, so every micro-batch
      is spread over every device and no example moves between devices.
    loop: "unrolled" (k copies of fn in the program) or "scan" (lax.scan: one copy).
    mesh: the step's mesh, to keep each micro-batch sharded over its data axis.

  Returns:
    (final carry, the mean over micro-batches of fn's (grads, metrics)). With k = 1 this is
    fn(carry, inputs, 0) itself: the program without accumulation.
  """
  if k == 1:
    return fn(carry, inputs, 0)

  def split(x):  # (B, ...) → (B/k, k, ...): [:, j] is micro-batch j.
    parts = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    if mesh is not None:
      parts = jax.lax.with_sharding_constraint(parts, sharding_lib.batch_sharding(mesh))
    return parts

  parts = jax.tree_util.tree_map(split, inputs)
  add = functools.partial(jax.tree_util.tree_map, jnp.add)
  if loop == "unrolled":
    total = None
    for j in range(k):
      carry, out = fn(carry, jax.tree_util.tree_map(lambda x, j=j: x[:, j], parts), j)
      total = out if total is None else add(total, out)
  elif loop == "scan":
    take = lambda j: jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False), parts)

    def body(loop_carry, j):
      carry, total = loop_carry
      carry, out = fn(carry, take(j), j)
      return (carry, add(total, out)), None

    shapes = jax.eval_shape(lambda: fn(carry, take(0), 0)[1])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (carry, total), _ = jax.lax.scan(body, (carry, zeros), jnp.arange(k))
  else:
    raise ValueError(f"microbatch loop {loop!r}: use 'unrolled' or 'scan'")
  return carry, jax.tree_util.tree_map(lambda t: t / k, total)


def d_microbatch(d_params, d_state, mb: dict, key, *, state: state_lib.TrainState,
                 nets: networks.Networks, objective: objectives.Objective):
  """D's loss on one micro-batch and its gradient.

  Args:
    d_params, d_state: D's weights and its state (threaded through the micro-batches: each
      D call in training mode takes one power-iteration step; the objective's own state, such
      as LeCam's anchors, moves once a micro-batch).
    mb: {"images", "labels"}: the real examples; {"z", "fake_labels"}: G's latents.
    key: E's noise for the real pairs (BigGAN: the wrong labels of `d_inputs`).
    state: the step's train state (G's and E's weights and statistics).

  Returns:
    (D's new spectral state, (gradient, metrics)).
  """
  # G and E run in training mode (batch statistics), but neither learns here, and their
  # state updates are dropped: the E/G update makes them.
  g_vars = {"params": state.params[G], **state.model_state[G]}
  fake = jax.lax.stop_gradient(nets.generator.apply(
      g_vars, mb["z"], mb["fake_labels"], train=True, mutable=["spectral", "batch_stats"])[0])
  real = objective.real_pairs(state.params, state.model_state, mb["images"], mb["labels"],
                              key)
  x, c = objective.d_inputs(real._replace(c=jax.lax.stop_gradient(real.c)), fake,
                            objective.fake_condition(mb["z"], mb["fake_labels"]), key)

  def loss_fn(p):
    scores, new_state = nets.discriminator.apply({"params": p, **d_state}, x, c, train=True,
                                                 mutable=["spectral"])
    loss, metrics = objective.d_loss(scores, fake.shape[0], d_state)
    new_state = {**d_state, **new_state,
                 **objective.next_d_state(scores, fake.shape[0], d_state)}
    return loss, (metrics, new_state)

  (_, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
  return new_state, (grads, metrics)


def eg_microbatch(ge_params, model_state, mb: dict, keys, *, state: state_lib.TrainState,
                  score: objectives.Score, nets: networks.Networks,
                  objective: objectives.Objective, ortho_fn=None):
  """The E/G loss on one micro-batch and its gradient.

  Args:
    ge_params: {network: weights} of what the E/G update trains.
    model_state: every network's non-trained state, G's and E's threaded through the
      micro-batches (running BN statistics, spectral-norm vectors).
    mb: as `d_microbatch`'s.
    keys: (E's noise for the real pairs, E's noise for the latent regression).
    state: the step's train state (the weights of what does not learn here).
    score: D's scores in evaluation mode, its updated weights bound.
    ortho_fn: G's weights → the orthogonal regulariser, added to the loss; None leaves it
      out (the step then takes its gradient once per update).

  Returns:
    (model_state with G's and E's updates, (gradient, metrics)).
  """
  noise_key, regression_key = keys

  def loss_fn(ge):
    params = {**state.params, **ge}
    labels = objective.g_labels(mb["fake_labels"], state.step)
    fake, g_state = nets.generator.apply({"params": ge[G], **model_state[G]}, mb["z"],
                                         labels, train=True, mutable=["spectral", "batch_stats"])
    real = objective.real_pairs(params, model_state, mb["images"], mb["labels"], noise_key)
    loss, terms = objective.eg_loss(
        score, real, fake, objective.fake_condition(mb["z"], labels), params, model_state,
        regression_key)
    g_reg, g_terms = objective.g_regulariser(fake, mb["z"], state.step)
    if g_terms:  # The objective has a term on G's samples alone (BigGAN's mode seeking).
      loss, terms = loss + g_reg, {**terms, **g_terms}
    new_state = {G: g_state, **real.new_state}
    if ortho_fn is None:
      return loss, ({"eg_loss": loss, **terms}, new_state)
    ortho = ortho_fn(ge[G])
    return loss + ortho, ({"eg_loss": loss, "ortho_loss": ortho, **terms}, new_state)

  (_, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ge_params)
  return {**model_state, **new_state}, (grads, metrics)


def train_step(state: state_lib.TrainState, batch: dict, *, nets: networks.Networks,
               config: ml_collections.ConfigDict, mesh=None):
  """One iteration: `d_steps` D updates, one E/G update, the EMA of G.

  What the two model kinds differ in (the pairs, the losses, who learns) is the objective's
  (`objectives.build`); this function has no model-kind branch.

  With `optim.microbatches` = k > 1 each update (every D update, the E/G update) averages
  the gradients of k micro-batches of B/k (`accumulate`) before its one optimiser update.
  Per micro-batch: batch-norm statistics (of the micro-batch, across devices), the updates
  of the running statistics and of the spectral-norm vectors (threaded in order), E's noise.
  Per update: the latents (drawn for the whole batch and split, so they do not depend on
  k), the orthogonal regulariser, the optimiser, the EMA. Metrics are means over the
  micro-batches. docs/design.md ("Gradient accumulation") says why.

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
  k = config.optim.microbatches
  accumulate_k = functools.partial(accumulate, k=k, loop=microbatch_loop(config.optim, mesh),
                                   mesh=mesh)
  step_key = jax.random.fold_in(state.rng, state.step)
  d_keys = jax.random.split(jax.random.fold_in(step_key, 0), batch["image"].shape[0])
  ortho_fn = lambda g_params: sharding_lib.sum_of_shares(
      functools.partial(losses.orthogonal_regularizer, beta=config.loss.ortho_beta),
      mesh, g_params)

  # --- D updates, unrolled in Python: XLA:CPU runs convolutions inside a while loop (what
  # lax.scan lowers to, even with unroll=True) ~50x slower: 75 s vs 1.5 s a step on the
  # digits config. d_steps is 1-2, so the program stays small.
  def d_update(carry, inputs):
    d_params, d_state, opt_d = carry
    (images, labels), key = inputs
    latent_key, noise_key = jax.random.split(key)
    z, fake_labels = sample_latents(latent_key, nets, batch_size)
    micro = lambda d_state, mb, j: d_microbatch(
        d_params, d_state, mb, microbatch_key(noise_key, j, k), state=state, nets=nets,
        objective=objective)
    d_state, (grads, metrics) = accumulate_k(
        micro, d_state, {"images": images, "labels": labels, "z": z,
                         "fake_labels": fake_labels})
    updates, opt_d = tx_d.update(grads, opt_d, d_params)
    metrics["grad_norm/d"] = optax.tree.norm(grads)
    return (optax.apply_updates(d_params, updates), d_state, opt_d), metrics

  carry = (state.params[D], state.model_state[D], state.opt_d)
  for i in range(batch["image"].shape[0]):
    carry, d_metrics = d_update(carry, ((batch["image"][i], batch["label"][i]), d_keys[i]))
  d_params, d_state, opt_d = carry  # d_metrics: the last D update's.

  # --- E/G update. ----------------------------------------------------------------------
  latent_key, noise_key = jax.random.split(jax.random.fold_in(step_key, 1))
  regression_key = jax.random.fold_in(step_key, 2)
  z, fake_labels = sample_latents(latent_key, nets, batch_size)
  d_vars = {"params": d_params, **d_state}
  score = lambda x, c: nets.discriminator.apply(d_vars, x, c, train=False)
  ge_params = {name: state.params[name] for name in objective.eg_networks}
  # One micro-batch: the orthogonal regulariser joins the loss (the step without
  # accumulation). Several: its gradient is taken once, below, not once per micro-batch.
  micro = lambda model_state, mb, j: eg_microbatch(
      ge_params, model_state, mb,
      (microbatch_key(noise_key, j, k), microbatch_key(regression_key, j, k)), state=state,
      score=score, nets=nets, objective=objective, ortho_fn=ortho_fn if k == 1 else None)
  model_state, (grads, ge_metrics) = accumulate_k(
      micro, state.model_state, {"images": batch["image"][-1], "labels": batch["label"][-1],
                                 "z": z, "fake_labels": fake_labels})
  if k > 1:
    ortho, ortho_grads = jax.value_and_grad(ortho_fn)(ge_params[G])
    grads = {**grads, G: jax.tree_util.tree_map(jnp.add, grads[G], ortho_grads)}
    ge_metrics["ortho_loss"] = ortho
  updates, opt_ge = tx_ge.update(grads, state.opt_ge, ge_params)
  ge_params = optax.apply_updates(ge_params, updates)
  ge_metrics.update({f"grad_norm/{name[0]}": optax.tree.norm(g) for name, g in grads.items()})

  # --- EMA of G: a copy of the weights until ema.start_step, then a moving average. ---------
  decay = jnp.where(state.step >= config.ema.start_step, config.ema.decay, 0.0)
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params,
                               ge_params[G])

  model_state = {**model_state, D: d_state}
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

  The step reads only config.loss, .optim and .ema, and num_train_steps for a decay
  (`state.step_settings`): equal networks, settings and shardings give the same jitted
  function, already traced and compiled when a process trains a second time (a notebook cell
  run again, the resume tests).
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
