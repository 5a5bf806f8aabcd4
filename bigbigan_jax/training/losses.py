"""Hinge losses of BigGAN and BigBiGAN, and BigGAN's orthogonal regularisation.

Sign conventions (the BigBiGAN TF-Hub colab's). BigGAN: D pushes real scores above +1 and fake scores below
-1; G raises the scores of its samples. BigBiGAN: D scores encoder pairs (x, E(x)) high and
generator pairs (G(z), z) low, each of s_x, s_z, s_xz hinged separately; E lowers the scores
of its pairs and G raises the scores of its own, through one shared loss.

BigBiGAN's scale: with `reduction="mean"` (the default) the per-score terms are averaged over
the active scores, which is exactly the TF-Hub colab's loss (it concatenates the three scores
before taking the mean). `reduction="sum"` adds them, 3x larger with all three active.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

SCORES = ("s_x", "s_z", "s_xz")


def d_hinge(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """BigGAN's D loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))."""
  return jnp.mean(jax.nn.relu(1.0 - real_scores)) + jnp.mean(jax.nn.relu(1.0 + fake_scores))


def g_hinge(fake_scores: jax.Array) -> jax.Array:
  """BigGAN's G loss: -mean(D(G(z)))."""
  return -jnp.mean(fake_scores)


def active_scores(unary_x: bool = True, unary_z: bool = True) -> tuple[str, ...]:
  """The scores that enter the BigBiGAN losses; the joint s_xz always does."""
  return tuple(s for s, on in zip(SCORES, (unary_x, unary_z, True)) if on)


def _weight(scores: tuple[str, ...], reduction: str) -> float:
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  return 1.0 / len(scores) if reduction == "mean" else 1.0


def bigbigan_d_loss(enc: Mapping[str, jax.Array], gen: Mapping[str, jax.Array], *,
                    unary_x: bool = True, unary_z: bool = True, reduction: str = "mean"):
  """D's loss on encoder pairs `enc` (y=+1) and generator pairs `gen` (y=-1).

  L_D = w · Σ_s [mean(relu(1 - s_enc)) + mean(relu(1 + s_gen))], w = 1/#scores for "mean".

  Args:
    enc: scores of (x, E(x)) pairs, {"s_x", "s_z", "s_xz"} each of shape (B,).
    gen: scores of (G(z), z) pairs, same keys.
    unary_x, unary_z: include s_x / s_z (the paper's ablation switches).
    reduction: "mean" over the active scores (TF-Hub colab) or "sum".

  Returns:
    (loss, terms) where terms holds each score's hinge term, unweighted.
  """
  scores = active_scores(unary_x, unary_z)
  w = _weight(scores, reduction)
  terms = {f"d_{s}": d_hinge(enc[s], gen[s]) for s in scores}
  return w * sum(terms.values()), terms


def bigbigan_eg_loss(enc: Mapping[str, jax.Array], gen: Mapping[str, jax.Array], *,
                     unary_x: bool = True, unary_z: bool = True, reduction: str = "mean"):
  """The shared E/G loss: L_EG = w · Σ_s [mean(s_enc) - mean(s_gen)].

  E's parameters reach only the encoder-pair scores (it lowers them), G's only the
  generator-pair scores (it raises them).

  Returns:
    (loss, {"e_loss": w · Σ mean(s_enc), "g_loss": -w · Σ mean(s_gen)}).
  """
  scores = active_scores(unary_x, unary_z)
  w = _weight(scores, reduction)
  e_loss = w * sum(jnp.mean(enc[s]) for s in scores)
  g_loss = -w * sum(jnp.mean(gen[s]) for s in scores)
  return e_loss + g_loss, {"e_loss": e_loss, "g_loss": g_loss}


def orthogonal_regularizer(params, beta: float, part=0, parts: int = 1) -> jax.Array:
  """BigGAN's R = β Σ_W ‖WᵀW ⊙ (1 - I)‖²_F over every kernel of ≥ 2 dims.

  W is the kernel reshaped to (fan_in, out), so the penalty decorrelates output filters
  without fixing their norms. Only leaves named "kernel" count: biases, BN affines, the
  attention gate, the learned class constant and the shared class embedding ("embedding",
  BigGAN's choice) are exempt. Apply it to G's raw (pre-spectral-norm) parameters.

  Where fan_in < out (G's first linear layer and its conditional-BN gains and biases, which
  read a z chunk and the class embedding) the out x out Gram is never formed: WᵀW and WWᵀ
  have the same Frobenius norm and diag(WᵀW) holds the columns' squared norms, so
  ‖WᵀW ⊙ (1 - I)‖² = ‖WWᵀ‖² - Σ_j ‖w_j‖⁴, the same value from the fan_in x fan_in Gram
  (G's first layer at 128 px maps 20 to 24,576: 20² entries instead of 24,576²).

  With parts > 1 this is the share of part `part` (an index, traced or not): the columns
  [part·out/parts, (part+1)·out/parts) of each out x out Gram, and 1/parts of the small
  remainder (Grams formed as WWᵀ, or whose out is not a multiple of parts). The shares of
  parts 0..parts-1 add up to R: `sharding.sum_of_shares` gives each device one, where every
  replica would otherwise repeat all of R (6% of a device's FLOPs at the paper's 128 px
  configs on 128 devices).
  """
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = getattr(path[-1], "key", None)
    if name != "kernel" or leaf.ndim < 2:
      continue
    w = leaf.reshape(-1, leaf.shape[-1]).astype(jnp.float32)
    fan_in, out = w.shape
    if fan_in < out:
      column_norms = jnp.sum(jnp.square(w), axis=0)
      whole = jnp.sum(jnp.square(w @ w.T)) - jnp.sum(jnp.square(column_norms))
      total = total + whole / parts
      continue
    split = out % parts == 0  # Else every part computes all of this Gram, and takes 1/parts.
    width = out // parts if split else out
    first = part * width if split else 0
    columns = jax.lax.dynamic_slice_in_dim(w, first, width, axis=1)
    gram = w.T @ columns  # (out, width): columns first.. of WᵀW.
    off_diagonal = jnp.arange(out)[:, None] != first + jnp.arange(width)[None, :]
    share = jnp.sum(jnp.square(jnp.where(off_diagonal, gram, 0.0)))
    total = total + (share if split else share / parts)
  return beta * total
