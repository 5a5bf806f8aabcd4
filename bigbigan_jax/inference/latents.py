"""Latent vectors for G: plain, or truncated by resampling (the paper) or by scaling (TF-Hub).

  "resample": z ~ N(0, 1) conditioned on |z| <= t, the BigGAN paper's truncation trick
    (values outside [-t, t] redrawn until they fall inside). We draw it by inverting the
    truncated CDF, which gives exactly that distribution at a fixed cost for any t.
  "scaled": z = t * truncated_normal[-2, 2], what the TF-Hub BigGAN/BigBiGAN colabs feed the
    modules; |z| <= 2t, and the shape of the marginal does not change with t.
  truncation=None: plain N(0, 1), as in training.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bigbigan_jax import config as config_lib

TRUNCATION_METHODS = config_lib.TRUNCATIONS

# TF-Hub's "scaled" truncation multiplies a standard normal truncated to [-2, 2].
SCALED_BOUND = 2.0


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


def as_key(seed_or_key) -> jax.Array:
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
  z = truncated_latents(as_key(seed_or_key), (num, z_dim), truncation, method)
  return np.asarray(jax.device_get(z))
