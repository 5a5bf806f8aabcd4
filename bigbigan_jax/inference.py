"""Inference over a trained BigBiGAN or BigGAN: a Python API shaped like the TF-Hub modules.

    model = inference.load("/tmp/digits")              # newest checkpoint, EMA generator
    z = inference.sample_z(0, 16, model.z_dim, truncation=0.5)
    images = model.generate(z)                         # (16, R, R, 3) in [-1, 1]
    enc = model.encode(real_images)                    # z_mean, z_stdev, z_sample, avepool_feat,
                                                       # bn_crelu_feat (TF-Hub's `encode`)
    recon = model.reconstruct(real_images)             # generate(encode(x)["z_sample"])
    scores = model.discriminate(images, z)             # s_x, s_z, s_xz
    model.standing_stats(num_batches=64, truncation=0.5)  # the paper's evaluation BN stats

Every method takes numpy (or jax) arrays of any batch size and returns numpy arrays. A call
is cut into chunks of a fixed size (`batch_size`, rounded up to a multiple of the device
count), the last chunk zero-padded, each chunk sharded over a ("data",) mesh of every
device, and the padding trimmed: one compiled program per method serves every batch size.
Padding cannot leak into real outputs, since in evaluation mode nothing mixes examples: G and
E normalise with running statistics and D has no batch norm.

`load` restores a workdir's checkpoint; `from_state` wraps an in-memory train state (tests,
notebooks and the trainer's evaluators), sharing compiled programs with every other `Model`
of the same networks and mesh.

Truncation, `sample_z(..., method=...)`:
  "resample": z ~ N(0, 1) conditioned on |z| <= t, the BigGAN paper's truncation trick
    (values outside [-t, t] redrawn until they fall inside). We draw it by inverting the
    truncated CDF, which gives exactly that distribution at a fixed cost for any t.
  "scaled": z = t * truncated_normal[-2, 2], what the TF-Hub BigGAN/BigBiGAN colabs feed the
    modules; |z| <= 2t, and the shape of the marginal does not change with t.
  truncation=None: plain N(0, 1), as in training.
"""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Any, Sequence

import flax.traverse_util
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from bigbigan_jax import checkpoint as checkpoint_lib
from bigbigan_jax import config as config_lib
from bigbigan_jax import input_pipeline
from bigbigan_jax import models
from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax import train
from bigbigan_jax.models import D
from bigbigan_jax.models import E
from bigbigan_jax.models import G

TRUNCATION_METHODS = config_lib.TRUNCATIONS
# TF-Hub's "scaled" truncation multiplies a standard normal truncated to [-2, 2].
SCALED_BOUND = 2.0
DEFAULT_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------
# Latents.
# ---------------------------------------------------------------------------------------------


def check_truncation(truncation, method: str) -> None:
  """Raises ValueError unless `method` is known and `truncation` is None or positive."""
  if method not in TRUNCATION_METHODS:
    raise ValueError(f"truncation method {method!r} is unknown: use one of "
                     + ", ".join(repr(m) for m in TRUNCATION_METHODS))
  if truncation is not None and not (isinstance(truncation, (int, float, np.floating))
                                     and np.isfinite(truncation) and truncation > 0):
    raise ValueError(f"truncation={truncation!r} is invalid: give a positive number (e.g. 0.5),"
                     " or None for untruncated N(0, 1)")


def truncated_latents(key: jax.Array, shape: Sequence[int], truncation=None,
                      method: str = "resample") -> jax.Array:
  """z of `shape` from N(0, 1), optionally truncated; pure, so usable inside `jax.jit`.

  Args:
    key: a PRNG key.
    shape: the output shape, e.g. (batch, z_dim).
    truncation: t > 0 (a Python float or a traced scalar), or None for plain N(0, 1).
    method: "resample" (N(0, 1) restricted to [-t, t]) or "scaled" (t * N(0, 1) restricted to
      [-2, 2]); see the module docstring.

  Returns:
    float32 array of `shape`.
  """
  if truncation is None:
    return jax.random.normal(key, shape, jnp.float32)
  t = jnp.asarray(truncation, jnp.float32)
  if method == "resample":
    return jax.random.truncated_normal(key, -t, t, shape, jnp.float32)
  if method == "scaled":
    return t * jax.random.truncated_normal(key, -SCALED_BOUND, SCALED_BOUND, shape, jnp.float32)
  raise ValueError(f"truncation method {method!r} is unknown: use one of {TRUNCATION_METHODS}")


def _as_key(seed_or_key) -> jax.Array:
  if isinstance(seed_or_key, (int, np.integer)):
    return jax.random.PRNGKey(int(seed_or_key))
  return seed_or_key


def sample_z(seed_or_key, num: int, z_dim: int, truncation: float | None = None,
             method: str = "resample") -> np.ndarray:
  """`num` latent vectors for G, optionally truncated.

  Args:
    seed_or_key: an int seed or a PRNG key.
    num: how many vectors.
    z_dim: their size (`model.z_dim`).
    truncation: None for N(0, 1), as in training; else t > 0. With "resample" every
      |z| <= t; with "scaled" every |z| <= 2t.
    method: "resample" (the BigGAN paper's: N(0, 1) truncated to [-t, t]) or "scaled"
      (TF-Hub's: t * truncated_normal[-2, 2]).

  Returns:
    float32 numpy array (num, z_dim).
  """
  check_truncation(truncation, method)
  z = truncated_latents(_as_key(seed_or_key), (num, z_dim), truncation, method)
  return np.asarray(jax.device_get(z))


# ---------------------------------------------------------------------------------------------
# Jitted programs, shared by every Model of the same networks and mesh.
# ---------------------------------------------------------------------------------------------


def _generate(g_vars, z, labels, *, nets):
  return nets.generator.apply(g_vars, z, labels, train=False)


def _encode(e_vars, images, indices, key, *, nets):
  out = nets.encoder.apply(e_vars, images, train=False, rngs={"noise": key})
  # E's own sample uses noise drawn for the whole padded chunk. Drawing example i's noise from
  # fold_in(key, i) instead (i = its place in the call) makes z_sample independent of how
  # a call is cut into chunks: encode(x[:5]) and encode(x)[:5] agree. Same distribution.
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (nets.z_dim,)))(
      indices)
  out["z_sample"] = out["z_mean"] + out["z_stdev"] * noise
  return out


def _discriminate(d_vars, images, cond, *, nets):
  return nets.discriminator.apply(d_vars, images, cond, train=False)


def _pass_batch_stats(g_vars, key, truncation, *, nets, batch, method, truncate, sharding):
  """G's per-layer batch statistics on one batch of fresh latents (weights untouched)."""
  z_key, y_key = jax.random.split(key)
  z = truncated_latents(z_key, (batch, nets.z_dim), truncation if truncate else None, method)
  z = jax.lax.with_sharding_constraint(z, sharding)
  labels = None
  if nets.num_classes:
    labels = jax.random.randint(y_key, (batch,), 0, nets.num_classes)
    labels = jax.lax.with_sharding_constraint(labels, sharding)
  # With momentum 0 a training-mode pass writes exactly this batch's statistics into
  # batch_stats. Training mode also advances the spectral-norm power iteration; that update
  # is dropped, so every pass (and later `generate`) sees the same normalised weights.
  generator = nets.generator.clone(bn_momentum=0.0)
  _, new = generator.apply(g_vars, z, labels, train=True, mutable=["batch_stats", "spectral"])
  return new["batch_stats"]


@functools.lru_cache(maxsize=16)
def _programs(nets: models.Networks, mesh: Mesh) -> dict:
  out = sharding_lib.replicated(mesh)
  jit = lambda fn, **static: jax.jit(functools.partial(fn, nets=nets, **static),
                                     out_shardings=out)
  programs = {"generate": jit(_generate), "discriminate": jit(_discriminate)}
  if nets.is_bigbigan:
    programs["encode"] = jit(_encode)

  @functools.lru_cache(maxsize=8)
  def standing_pass(batch: int, method: str, truncate: bool):
    return jit(_pass_batch_stats, batch=batch, method=method, truncate=truncate,
               sharding=NamedSharding(mesh, P(sharding_lib.DATA)))

  programs["standing_pass"] = standing_pass
  return programs


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pooled_moments(means: np.ndarray, variances: np.ndarray, counts=None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Mean and variance of the union of groups, from each group's moments.

  Args:
    means: (K, C) per-group means.
    variances: (K, C) per-group (biased) variances.
    counts: (K,) group sizes; None: equal sizes.

  Returns:
    (mean, variance), each (C,): the count-weighted mean of the means, and the weighted mean
    of the variances plus the weighted variance of the means (the law of total variance; no
    E[x^2] - E[x]^2 cancellation).
  """
  means = np.asarray(means, np.float64)
  k = means.shape[0]
  w = np.full((k,), 1.0 / k) if counts is None else np.asarray(counts, np.float64)
  w = w / w.sum()
  mean = np.tensordot(w, means, axes=1)
  var = np.tensordot(w, np.asarray(variances, np.float64) + np.square(means - mean), axes=1)
  return mean.astype(np.float32), var.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------


class Model:
  """A trained G (EMA weights by default), E and D behind TF-Hub-shaped numpy methods.

  Build it with `load(workdir)` or `from_state(nets, state, config)`.
  """

  def __init__(self, nets: models.Networks, config: ml_collections.ConfigDict, *,
               generator_params, generator_state: dict, discriminator_variables: dict,
               encoder_variables: dict | None, step: int, use_ema: bool, mesh: Mesh,
               batch_size: int = DEFAULT_BATCH_SIZE):
    """Wraps arrays that are already on `mesh`'s devices (see `load` and `from_state`).

    Args:
      nets: the networks (`models.build(config.model)`).
      config: the experiment config.
      generator_params: G's weights (the EMA copy or the trained ones).
      generator_state: G's {"spectral", "batch_stats"}.
      discriminator_variables: D's {"params", "spectral"}.
      encoder_variables: E's {"params", "batch_stats"}, or None for BigGAN.
      step: the training step the weights come from.
      use_ema: whether `generator_params` are the EMA weights (reported, not used).
      mesh: a mesh with a "data" axis; batches are split over it.
      batch_size: examples per compiled call; rounded up to a multiple of the data axis.
    """
    if sharding_lib.DATA not in mesh.axis_names:
      raise ValueError(f"the mesh needs a {sharding_lib.DATA!r} axis; it has {mesh.axis_names}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be positive")
    self._nets, self._config, self._mesh = nets, config, mesh
    self._g_params = generator_params
    self._g_state = dict(generator_state)
    self._checkpoint_batch_stats = self._g_state.get("batch_stats")
    self._d_vars = discriminator_variables
    self._e_vars = encoder_variables
    self._step, self._use_ema = int(step), use_ema
    self._chunk = _round_up(batch_size, sharding_lib.data_size(mesh))
    self._programs = _programs(nets, mesh)

  # --- Properties. ---------------------------------------------------------------------------

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self._config

  @property
  def nets(self) -> models.Networks:
    return self._nets

  @property
  def mesh(self) -> Mesh:
    return self._mesh

  @property
  def step(self) -> int:
    return self._step

  @property
  def use_ema(self) -> bool:
    return self._use_ema

  @property
  def is_bigbigan(self) -> bool:
    return self._nets.is_bigbigan

  @property
  def resolution(self) -> int:
    """G's output and D's input side."""
    return self._nets.resolution

  @property
  def encoder_resolution(self) -> int:
    """E's input side (= resolution for BigGAN)."""
    return self._nets.encoder_resolution

  @property
  def z_dim(self) -> int:
    return self._nets.z_dim

  @property
  def num_classes(self) -> int:
    """0 for an unconditional G (BigBiGAN)."""
    return self._nets.num_classes

  @property
  def batch_size(self) -> int:
    """Examples per compiled call (a multiple of the data-axis size)."""
    return self._chunk

  @property
  def generator_variables(self) -> dict:
    return {"params": self._g_params, **self._g_state}

  @property
  def discriminator_variables(self) -> dict:
    return self._d_vars

  @property
  def encoder_variables(self) -> dict | None:
    return self._e_vars

  @property
  def batch_stats(self):
    """G's batch-norm statistics that `generate` uses now."""
    return self._g_state["batch_stats"]

  def set_batch_stats(self, stats=None) -> None:
    """Makes `generate` use `stats` (e.g. kept from `standing_stats`), or with None the
    checkpoint's running statistics again."""
    stats = self._checkpoint_batch_stats if stats is None else stats
    expected = jax.tree_util.tree_structure(self._checkpoint_batch_stats)
    if jax.tree_util.tree_structure(stats) != expected:
      raise ValueError("these statistics do not have the structure of this generator's "
                       "batch_stats")
    self._g_state = {**self._g_state, "batch_stats": jax.device_put(
        stats, sharding_lib.replicated(self._mesh))}

  # --- Batching. -----------------------------------------------------------------------------

  def _put(self, x: np.ndarray) -> jax.Array:
    sharding = sharding_lib.batch_sharding(self._mesh)
    # From the host array per shard, so every host of a multi-host mesh can pass its copy.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def _map(self, fn, inputs: Sequence[np.ndarray | None], row_indices: bool = False):
    """Runs `fn(*chunk_inputs)` over fixed-size chunks of `inputs`, sharded over the mesh.

    Inputs are cut along axis 0 into chunks of `batch_size` rows, the last one zero-padded, so
    `fn`'s programs compile once. Chunk k+1 is dispatched before chunk k is fetched, keeping
    the device busy. A None input stays None. With `row_indices`, `fn` also gets each row's
    int32 index within the call.

    Returns:
      `fn`'s output pytree as numpy, concatenated over chunks and trimmed to the real rows.
    """
    num = next(x.shape[0] for x in inputs if x is not None)
    chunk = self._chunk
    if row_indices:
      inputs = (*inputs, np.arange(_round_up(max(num, 1), chunk), dtype=np.int32))
    pieces, pending = [], None
    for start in range(0, max(num, 1), chunk):  # An empty call still runs one padded chunk.
      args = []
      for x in inputs:
        if x is None:
          args.append(None)
          continue
        part = x[start:start + chunk]
        if part.shape[0] < chunk:
          pad = np.zeros((chunk - part.shape[0], *part.shape[1:]), part.dtype)
          part = np.concatenate([part, pad])
        args.append(self._put(part))
      result = fn(*args)
      if pending is not None:
        pieces.append(jax.device_get(pending))
      pending = result
    pieces.append(jax.device_get(pending))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:num], *pieces)

  # --- Inputs. -------------------------------------------------------------------------------

  def _latents(self, z) -> np.ndarray:
    z = np.asarray(z, np.float32)
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z has shape {z.shape}; this generator takes (batch, {self.z_dim}): "
                       f"draw it with inference.sample_z(seed, num, model.z_dim)")
    return z

  def _labels(self, labels, num: int) -> np.ndarray | None:
    if not self.num_classes:
      if labels is not None:
        raise ValueError("this generator is unconditional (BigBiGAN): call it without labels")
      return None
    if labels is None:
      raise ValueError(f"this BigGAN is class-conditional: pass labels, ints in "
                       f"[0, {self.num_classes}) (one per example, or a single int)")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == self.num_classes:
      # One-hot rows, as TF-Hub's BigGAN takes them.
      if not (np.all((labels == 0) | (labels == 1)) and np.all(labels.sum(axis=1) == 1)):
        raise ValueError("2-D labels must be one-hot rows; pass class ids for anything else")
      labels = labels.argmax(axis=1)
    if labels.ndim == 0:
      labels = np.full((num,), labels)
    if (labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer)
        or labels.min(initial=0) < 0 or labels.max(initial=0) >= self.num_classes):
      raise ValueError(f"labels must be {num} ints in [0, {self.num_classes}) (or one-hot rows);"
                       f" got shape {labels.shape}, dtype {labels.dtype}")
    return labels.astype(np.int32)

  def _images(self, images, resolutions: Sequence[int], what: str) -> np.ndarray:
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"{what} images must be floats in [-1, 1] (got {images.dtype}); for uint8"
                       " pixels use x / 127.5 - 1")
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1:3] not in [
        (r, r) for r in resolutions]:
      sizes = " or ".join(f"(batch, {r}, {r}, 3)" for r in resolutions)
      raise ValueError(f"{what} takes images of shape {sizes}; got {images.shape}. "
                       "inference.load_images(paths, resolution) crops and resizes files.")
    return images.astype(np.float32)

  def _require_encoder(self, what: str):
    if not self.is_bigbigan:
      raise ValueError(f"{what} needs the encoder, and this checkpoint is a BigGAN (no E); use "
                       "a BigBiGAN workdir (config.model.kind='bigbigan')")

  # --- The TF-Hub signatures. ----------------------------------------------------------------

  def generate(self, z, labels=None, upsample: bool = False) -> np.ndarray:
    """G(z[, labels]) in evaluation mode (G's current `batch_stats`).

    Args:
      z: (N, z_dim) latents, e.g. from `sample_z`.
      labels: class-conditional G only: N class ids, one id for all, or one-hot (N, C).
      upsample: nearest-neighbour upsample to E's resolution (TF-Hub's "upsampled" output).

    Returns:
      float32 (N, R, R, 3) in [-1, 1]; R = `resolution`, or `encoder_resolution` if upsample.
    """
    z = self._latents(z)
    labels = self._labels(labels, z.shape[0])
    program, g_vars = self._programs["generate"], self.generator_variables
    images = self._map(lambda *args: program(g_vars, *args), (z, labels))
    if upsample:
      f = self.encoder_resolution // self.resolution
      images = np.repeat(np.repeat(images, f, axis=1), f, axis=2)
    return images

  def sample(self, num: int, seed: int = 0, truncation: float | None = None,
             method: str = "resample", labels=None, upsample: bool = False) -> np.ndarray:
    """`generate(sample_z(seed, num, ...), labels)`; a class-conditional G without labels
    gets classes drawn uniformly from the seed."""
    z = sample_z(seed, num, self.z_dim, truncation, method)
    if self.num_classes and labels is None:
      labels = np.random.default_rng(seed).integers(0, self.num_classes, num)
    return self.generate(z, labels, upsample=upsample)

  def encode(self, images, seed: int = 0) -> dict[str, np.ndarray]:
    """E(x) in evaluation mode: TF-Hub BigBiGAN's `encode` outputs.

    Args:
      images: float (N, R_E, R_E, 3) in [-1, 1], R_E = `encoder_resolution`.
      seed: the noise of z_sample; example i's noise depends on (seed, i) only.

    Returns:
      numpy float32 dict: z_mean, z_stdev, z_sample (N, z_dim); avepool_feat (N, F);
      bn_crelu_feat (N, 2F).
    """
    self._require_encoder("encode")
    images = self._images(images, (self.encoder_resolution,), "encode")
    program, e_vars = self._programs["encode"], self._e_vars
    key = jax.device_put(jax.random.PRNGKey(seed), sharding_lib.replicated(self._mesh))
    return self._map(lambda x, rows: program(e_vars, x, rows, key), (images,),
                     row_indices=True)

  def reconstruct(self, images, use_sample: bool = True, upsample: bool = False,
                  seed: int = 0) -> np.ndarray:
    """G(E(x)): `generate(encode(images, seed)["z_sample" or "z_mean"])`.

    Returns:
      float32 (N, R, R, 3) in [-1, 1] (E's resolution if upsample).
    """
    self._require_encoder("reconstruct")
    enc = self.encode(images, seed)
    return self.generate(enc["z_sample" if use_sample else "z_mean"], upsample=upsample)

  def discriminate(self, images, z_or_labels):
    """D's scores in evaluation mode.

    Args:
      images: float (N, R, R, 3) in [-1, 1] at G/D's resolution; BigBiGAN also takes E's
        resolution and average-pools it as training does for real images.
      z_or_labels: BigBiGAN: the (N, z_dim) latents paired with the images; BigGAN: labels
        as `generate` takes them.

    Returns:
      BigBiGAN: dict of float32 (N,) arrays s_x, s_z, s_xz; BigGAN: float32 (N,) scores.
    """
    if self.is_bigbigan:
      images = self._images(images, (self.resolution, self.encoder_resolution), "discriminate")
      if images.shape[1] != self.resolution:
        images = np.asarray(models.pool_for_discriminator(images, self.resolution))
      cond = self._latents(z_or_labels)
      if cond.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {cond.shape[0]} latents")
    else:
      images = self._images(images, (self.resolution,), "discriminate")
      cond = self._labels(z_or_labels, images.shape[0])
    program, d_vars = self._programs["discriminate"], self._d_vars
    return self._map(lambda x, c: program(d_vars, x, c), (images, cond))

  # --- Standing statistics. ------------------------------------------------------------------

  def standing_stats(self, num_batches: int = 100, batch_size: int | None = None,
                     truncation: float | None = None, method: str = "resample",
                     seed: int = 0):
    """Re-estimates G's batch-norm statistics from many G passes on fresh latents.

    The BigGAN paper evaluates with these "standing statistics" rather than the running
    averages of training, re-estimated for each truncation value; after this call `generate`
    uses them (until `set_batch_stats`). Only batch_stats change: G's weights and its
    spectral-norm state are untouched.

    Each pass runs G in training mode on `batch_size` latents drawn like `sample_z`'s (with
    uniform labels for a class-conditional G) and records every layer's batch mean and
    variance. The estimate pools all passes: the mean of the batch means, and the variance of
    every activation seen, i.e. the mean of the batch variances plus the variance of the
    batch means. Averaging the batch variances alone (BigGAN-PyTorch's choice) misses that
    second term, so its estimate would shrink with the batch size used here; pooling gives
    the same statistics whatever the batch size, and equals the former at large batches.

    Args:
      num_batches: G passes.
      batch_size: latents per pass (default: `self.batch_size`); rounded up to a multiple of
        the data-axis size.
      truncation, method: as for `sample_z`.
      seed: the latents' seed.

    Returns:
      The new batch_stats pytree (also installed for `generate`).
    """
    check_truncation(truncation, method)
    if num_batches < 1:
      raise ValueError(f"num_batches={num_batches} must be positive")
    batch = _round_up(batch_size or self._chunk, sharding_lib.data_size(self._mesh))
    program = self._programs["standing_pass"](batch, method, truncation is not None)
    replicated = sharding_lib.replicated(self._mesh)
    key = jax.device_put(jax.random.PRNGKey(seed), replicated)
    t = jax.device_put(np.float32(truncation or 0.0), replicated)
    g_vars = {"params": self._g_params, **self._g_state}
    passes = [program(g_vars, jax.random.fold_in(key, k), t) for k in range(num_batches)]
    passes = [flax.traverse_util.flatten_dict(p) for p in jax.device_get(passes)]
    pooled = {}
    for path in passes[0]:
      if path[-1] != "mean":
        continue
      var_path = path[:-1] + ("var",)
      pooled[path], pooled[var_path] = pooled_moments([p[path] for p in passes],
                                                      [p[var_path] for p in passes])
    stats = flax.traverse_util.unflatten_dict(pooled)
    self.set_batch_stats(stats)
    return self.batch_stats


# ---------------------------------------------------------------------------------------------
# Construction.
# ---------------------------------------------------------------------------------------------


def _state_mesh(state) -> Mesh | None:
  for leaf in jax.tree_util.tree_leaves(state.params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding_lib.DATA in sharding.mesh.axis_names:
      return sharding.mesh
  return None


def from_state(nets: models.Networks, state: Any, config: ml_collections.ConfigDict, *,
               use_ema: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
               mesh: Mesh | None = None) -> Model:
  """Wraps an in-memory `train.TrainState` (no copy, no checkpoint).

  The Model holds the state's arrays. The trainer donates its state to the next train step,
  which frees them: build a fresh Model from each state you evaluate (cheap: compiled
  programs are shared by Models of the same networks and mesh).

  Args:
    nets: the networks the state belongs to.
    state: a TrainState (params, model_state, ema_params, step).
    config: the experiment config.
    use_ema: G's EMA weights (True, what evaluation uses) or the trained ones.
    batch_size: examples per compiled call.
    mesh: where batches are split; default: the mesh of the state's arrays, else every device.

  Returns:
    A Model.
  """
  mesh = mesh or _state_mesh(state) or sharding_lib.make_mesh(((sharding_lib.DATA, -1),))
  variables = lambda name: {"params": state.params[name], **state.model_state[name]}
  return Model(
      nets, config,
      generator_params=state.ema_params if use_ema else state.params[G],
      generator_state=state.model_state[G], discriminator_variables=variables(D),
      encoder_variables=variables(E) if nets.is_bigbigan else None,
      step=int(jax.device_get(state.step)), use_ema=use_ema, mesh=mesh, batch_size=batch_size)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `workdir`, ascending (orbax writes a step to a
  temporary name and renames it when complete, so only whole ones have numeric names)."""
  directory = checkpoint_lib.checkpoint_dir(workdir)
  if not tf.io.gfile.isdir(directory):
    return []
  names = (name.rstrip("/") for name in tf.io.gfile.listdir(directory))
  return sorted(int(name) for name in names if name.isdigit())


def read_config(workdir: str, step: int | None = None
                ) -> tuple[int, ml_collections.ConfigDict]:
  """(step, experiment config) of a workdir's checkpoint, without restoring any array.

  The config comes from the newest checkpoint's metadata; every checkpoint of a workdir has
  the same model (the trainer refuses to resume with another).

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    ValueError: there is no checkpoint at `step`.
  """
  latest, meta, _ = checkpoint_lib.read_latest(workdir)
  if latest is None:
    raise FileNotFoundError(
        f"no checkpoint in {checkpoint_lib.checkpoint_dir(workdir)}: point --workdir at the "
        "directory of a training run (it holds checkpoints/<step>/), or train one first with "
        f"`python -m bigbigan_jax.main --config=configs/digits.py --workdir={workdir}`")
  if step is not None and step != latest:
    steps = checkpoint_steps(workdir)
    if step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {checkpoint_lib.checkpoint_dir(workdir)}"
                       f"; it has steps {steps}. Pass one of them, or none for the newest.")
  config = config_lib.with_defaults(json.loads(meta["config"]))
  return latest if step is None else step, config


def load(workdir: str, step: int | None = None, *, use_ema: bool = True,
         batch_size: int = DEFAULT_BATCH_SIZE, mesh: Mesh | None = None) -> Model:
  """Restores a training workdir's checkpoint for inference.

  What inference uses (G's EMA or trained weights, G's state, D, E) is replicated over the
  mesh, whatever mesh and device count training used; the rest of the train state is read
  split over the devices and dropped.

  Args:
    workdir: the directory given to `bigbigan_jax.main --workdir` (local or gs://).
    step: the checkpoint's step; None for the newest.
    use_ema: G's EMA weights (default: what the papers evaluate) or the trained ones.
    batch_size: examples per compiled call.
    mesh: default: every device on one "data" axis.

  Returns:
    A Model.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    ValueError: no checkpoint at `step`.
  """
  step, config = read_config(workdir, step)
  nets = models.build(config.model)
  mesh = mesh or sharding_lib.make_mesh(((sharding_lib.DATA, -1),))
  restore_config = ml_collections.ConfigDict(config.to_dict())
  restore_config.shard_params = False  # Replicated: inference wants every weight everywhere.
  abstract = train.abstract_train_state(nets, restore_config, mesh)

  def spread(tree):
    # Orbax's StandardRestore reads every leaf, so what inference does not use (optimiser
    # states, the other copy of G) is restored split over the devices, then dropped.
    shardings = sharding_lib.state_sharding(mesh, tree, shard_params=True)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

  params = dict(abstract.params)
  if use_ema:
    params[G] = spread(params[G])
  abstract = abstract.replace(
      params=params, ema_params=abstract.ema_params if use_ema else spread(abstract.ema_params),
      opt_d=spread(abstract.opt_d), opt_ge=spread(abstract.opt_ge))
  ckpt = checkpoint_lib.Checkpoints(workdir, restore_config)
  try:
    state = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return from_state(nets, state, config, use_ema=use_ema, batch_size=batch_size, mesh=mesh)


# ---------------------------------------------------------------------------------------------
# Image files.
# ---------------------------------------------------------------------------------------------


def image_files(paths: Sequence[str]) -> list[str]:
  """Expands folders (their images, sorted, not recursive) and checks that files exist.

  Raises:
    FileNotFoundError: a path does not exist, or a folder has no images.
  """
  files = []
  for path in paths:
    if tf.io.gfile.isdir(path):
      names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(path))
      found = [os.path.join(path, n) for n in names
               if n.lower().endswith(input_pipeline.IMAGE_EXTENSIONS)]
      if not found:
        raise FileNotFoundError(f"{path} has no images (files ending in "
                                f"{', '.join(input_pipeline.IMAGE_EXTENSIONS)})")
      files += found
    elif tf.io.gfile.exists(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"no such image file or folder: {path}")
  return files


def load_images(paths: Sequence[str], resolution: int) -> np.ndarray:
  """Reads image files (or folders of them) as E's input.

  Each image becomes RGB, is cropped to its largest centred square, and resized to
  resolution x resolution with bicubic (antialiased) interpolation.

  Returns:
    float32 (N, resolution, resolution, 3) in [-1, 1].

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: a file is not an image PIL can decode.
  """
  out = []
  for path in image_files(paths):
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
    try:
      image = Image.open(io.BytesIO(data))
      image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image".
      raise ValueError(f"cannot read {path} as an image ({error}); pass PNG, JPEG, BMP or GIF "
                       "files, or a folder of them") from error
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.BICUBIC)
    out.append(np.asarray(image, np.float32) / 127.5 - 1.0)
  return np.stack(out)
