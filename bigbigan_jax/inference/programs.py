"""The jitted programs behind `Model`'s methods, one set per (networks, mesh).

Each runs one fixed-size chunk in evaluation mode (running BN statistics, frozen spectral
norms), sharded over the mesh's data axis; `Model` pads, chunks and trims around them.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax.inference import latents
from bigbigan_jax.models import networks


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
  z = latents.truncated_latents(z_key, (batch, nets.z_dim), truncation if truncate else None, method)
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
def jitted_programs(nets: networks.Networks, mesh: Mesh) -> dict:
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
