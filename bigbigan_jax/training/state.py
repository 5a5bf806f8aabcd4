"""The train state: what a run carries from step to step, its optimisers, and creating it
sharded.

`init_train_state` is pure; `abstract_train_state` gives its shapes with the target shardings
(no allocation), which the trainer, the checkpoint restore, `tools.aot` and `tools.benchmark`
all start from.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bigbigan_jax import config as config_lib
from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax.models import networks
from bigbigan_jax.models.networks import D
from bigbigan_jax.models.networks import E
from bigbigan_jax.models.networks import G
from bigbigan_jax.training import objectives


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


def learning_rate(lr: float, config: ml_collections.ConfigDict, updates_per_step: int = 1):
  """`lr`, constant (the papers), or with `optim.decay_from` = f < 1 held until step
  f · num_train_steps and then decayed linearly to 0 at num_train_steps. Optax counts
  optimiser updates; D makes `updates_per_step` of them a train step."""
  o = config.optim
  if o.decay_from >= 1:
    return lr
  total = int(config.num_train_steps) * updates_per_step
  start = int(round(float(o.decay_from) * total))
  return optax.schedules.join_schedules(
      [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(1, total - start))],
      [start])


def make_optimizers(config: ml_collections.ConfigDict):
  """(D's optimiser, G+E's optimiser): Adam with β1=0, β2=0.999 by default (BigGAN's recipe),
  at constant learning rates unless `optim.decay_from` < 1."""
  o = config.optim
  adam = lambda lr, n=1: optax.adam(learning_rate(lr, config, n), b1=o.b1, b2=o.b2, eps=o.eps)
  ge = optax.multi_transform(
      {G: adam(o.g_lr), E: adam(o.e_lr)},
      lambda params: {name: jax.tree_util.tree_map(lambda _: name, p)
                      for name, p in params.items()})
  return adam(o.d_lr, int(o.d_steps)), ge


def init_train_state(rng: jax.Array, *, nets: networks.Networks,
                     config: ml_collections.ConfigDict) -> TrainState:
  """A fresh train state (pure: jit it with out_shardings to create it sharded)."""
  init_key, state_key = jax.random.split(rng)
  variables = nets.init(init_key)
  params = {name: v["params"] for name, v in variables.items()}
  model_state = {name: {c: x for c, x in v.items() if c != "params"}
                 for name, v in variables.items()}
  objective = objectives.build(nets, config.loss)
  model_state[D] = {**model_state[D], **objective.extra_d_state()}
  tx_d, tx_ge = make_optimizers(config)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
      ema_params=params[G], opt_d=tx_d.init(params[D]),
      opt_ge=tx_ge.init({n: params[n] for n in objective.eg_networks}), rng=state_key)


def abstract_train_state(nets, config, mesh):
  """The train state's shapes with their target shardings attached (no allocation).

  Tracing the init for its shapes takes seconds; equal networks, settings and mesh reuse the
  first answer (a notebook's second run, a resume in the same process).
  """
  return _abstract_train_state(nets, step_settings(config), mesh, bool(config.shard_params))


@functools.lru_cache(maxsize=8)
def _abstract_train_state(nets, settings, mesh, shard_params: bool):
  shapes = jax.eval_shape(functools.partial(init_train_state, nets=nets, config=settings),
                          jax.random.PRNGKey(0))
  shardings = sharding_lib.state_sharding(mesh, shapes, shard_params)
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def shardings_of(tree):
  return jax.tree_util.tree_map(lambda s: s.sharding, tree)


def step_settings(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """What the train step and the init read of a config (loss, optim, ema, and the run's length
  when the learning rates decay), frozen: hashable, so equal settings find the programs
  already built for them."""
  steps = int(config.num_train_steps) if config.optim.decay_from < 1 else 0
  return ml_collections.FrozenConfigDict(
      {"loss": config.loss, "optim": config.optim, "ema": config.ema, "num_train_steps": steps})


class HashableTree:
  """A pytree of hashable leaves (shardings), compared and hashed by structure and leaves."""

  def __init__(self, tree):
    leaves, self._treedef = jax.tree_util.tree_flatten(tree)
    self._leaves = tuple(leaves)

  @property
  def tree(self):
    return jax.tree_util.tree_unflatten(self._treedef, self._leaves)

  def __eq__(self, other):
    return (isinstance(other, HashableTree) and self._treedef == other._treedef
            and self._leaves == other._leaves)

  def __hash__(self):
    return hash((self._treedef, self._leaves))


def make_init_fn(nets, config, abstract_state):
  """rng → the initial train state, every array in its sharding of `abstract_state`.

  A replicated state (every run without `shard_params`) is computed by one program on one
  device and copied to every device: the same program on any mesh, device count or number
  of hosts, so it is compiled once per model and settings rather than once per mesh. A state
  with sharded leaves is created directly in its sharding by jit(init_train_state), so that
  no device ever holds all of it.

  The same networks, settings and shardings give the same function, so a notebook (or a test)
  that starts a second run in the process does not trace and load it again.
  """
  settings, shardings = step_settings(config), shardings_of(abstract_state)
  if all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(shardings)):
    return functools.partial(_replicate, _jit_init(nets, settings, None), HashableTree(shardings))
  return _jit_init(nets, settings, HashableTree(shardings))


@functools.lru_cache(maxsize=8)
def _jit_init(nets, settings, shardings: HashableTree | None):
  """jit(init_train_state): with `shardings`, created in them; without, on the default
  device."""
  return jax.jit(functools.partial(init_train_state, nets=nets, config=settings),
                 out_shardings=None if shardings is None else shardings.tree)


def _replicate(init, shardings: HashableTree, rng):
  """`init`(rng) on this process's default device, copied to every device of `shardings`
  (replicated ones) that this process holds. Every process computes the same state from the
  same rng, so together they hold one global array per leaf."""
  local = jax.device_get(init(rng))
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      local, shardings.tree)


class Setup(NamedTuple):
  nets: networks.Networks
  mesh: Any
  abstract_state: TrainState  # ShapeDtypeStructs with their target shardings.


def setup(config: ml_collections.ConfigDict, devices=None, *,
          model: ml_collections.ConfigDict | None = None) -> Setup:
  """What the trainer, `tools.aot` and `tools.benchmark` all start from, after every check
  that needs neither data nor a compile: the config validated, the networks built (from
  `model` instead of config.model when given), the mesh over `devices` (default: all), the
  batch checked against it (and its micro-batches), and the train state's sharded shapes.

  Raises:
    ValueError: an invalid config, or a batch that does not split over the mesh.
  """
  config_lib.validate(config)
  nets = networks.build(config.model if model is None else model)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  sharding_lib.check_batch_divisible(config.batch_size, mesh, config.optim.microbatches)
  return Setup(nets, mesh, abstract_train_state(nets, config, mesh))
