"""What each model kind trains for: the pairs D tells apart, D's loss and the E/G loss.

The train step is the same for BigBiGAN and BigGAN (`d_steps` D updates, one E/G update, the
EMA of G); everything in which they differ is an objective, built once with the networks:

  BigBiGAN  real pairs (x, E(x)) against fake pairs (G(z), z), three hinged scores
            s_x, s_z, s_xz (`losses.bigbigan_d_loss`); E and G learn together from one
            signed sum of the scores (`losses.bigbigan_eg_loss`).
  BigGAN    real pairs (x, y) against fake pairs (G(z, y'), y') through D's projection head,
            BigGAN's hinge (`losses.d_hinge`), optionally D's ranking of real images' own
            labels over wrong ones; G alone learns, from its samples' scores and optionally
            from how far apart its samples of one class lie (mode seeking).

Signs, scales and the ablation switches are in docs/design.md ("Losses").
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from bigbigan_jax.models import networks
from bigbigan_jax.models.networks import D
from bigbigan_jax.models.networks import E
from bigbigan_jax.models.networks import G
from bigbigan_jax.training import losses

# LeCam's anchors (BigGAN.extra_d_state) move this much slower than D's scores (the paper's).
LECAM_DECAY = 0.99
# (x, c) → D's scores in eval mode, with D's weights bound: what the E/G loss sees.
Score = Callable[[jax.Array, jax.Array], object]


class RealPairs(NamedTuple):
  """D's real inputs, and what forming them produced besides."""

  x: jax.Array  # Images at D's resolution.
  c: jax.Array  # The second element of the pair: E(x)'s sample, or the label.
  new_state: dict  # {network: its updated non-trained state} (E's BN statistics).
  metrics: dict  # Scalars for the E/G update's metrics.


def split_scores(scores, batch: int):
  """D's scores on concat([real, fake]) → (real, fake), for an array or a dict of arrays."""
  return (jax.tree_util.tree_map(lambda s: s[:batch], scores),
          jax.tree_util.tree_map(lambda s: s[batch:], scores))


def _accuracy(real: jax.Array, fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(real > 0) + jnp.mean(fake < 0))


@dataclasses.dataclass(frozen=True)
class BigBiGAN:
  """The BiGAN game on (x, z) pairs, with BigBiGAN's unary scores."""

  nets: networks.Networks
  unary_x: bool = True
  unary_z: bool = True
  reduction: str = "mean"
  latent_regression: float = 0.0
  latent_regression_trains_g: bool = False
  image_reconstruction: float = 0.0
  image_reconstruction_trains_g: bool = False

  eg_networks = (G, E)  # What the E/G update trains.
  console_keys = ("d_loss", "eg_loss", "d_accuracy", "e_loss", "g_loss")
  # σ0 of D's first and last layers (paths into D's "spectral" collection).
  d_sigma_layers = {"d_first": ("F", "block_0", "conv1", "conv"),
                    "d_last": ("score_xz", "dense")}

  def real_pairs(self, params, model_state, images, labels, key) -> RealPairs:
    """(pooled x, a sample of E(x)), E in training mode (the global batch's statistics)."""
    del labels  # Unconditional: the labels are for the evaluators only.
    x = networks.pool_for_discriminator(images, self.nets.resolution)
    enc, e_state = self.nets.encoder.apply(
        {"params": params[E], **model_state[E]}, images, train=True, rngs={"noise": key},
        mutable=["batch_stats"])
    return RealPairs(x, enc["z_sample"], {E: e_state},
                     {"z_stdev_mean": jnp.mean(enc["z_stdev"])})

  def fake_condition(self, z, labels):
    del labels
    return z

  def g_labels(self, labels, step):
    del step
    return labels

  def g_regulariser(self, fake_x, z, step):
    del fake_x, z, step
    return 0.0, {}

  def d_inputs(self, real: RealPairs, fake_x, fake_c, key):
    """What D scores in its update: the real pairs, then the fake ones."""
    del key
    return jnp.concatenate([real.x, fake_x]), jnp.concatenate([real.c, fake_c])

  def extra_d_state(self) -> dict:
    return {}

  def next_d_state(self, scores, batch: int, d_state: dict) -> dict:
    del scores, batch, d_state
    return {}

  def d_loss(self, scores, batch: int, d_state: dict | None = None):
    del d_state
    real_scores, fake_scores = split_scores(scores, batch)
    loss, terms = losses.bigbigan_d_loss(real_scores, fake_scores, unary_x=self.unary_x,
                                         unary_z=self.unary_z, reduction=self.reduction)
    scores = {f"score/{kind}_{name}": jnp.mean(s[name])
              for kind, s in (("real", real_scores), ("fake", fake_scores)) for name in s}
    accuracy = _accuracy(real_scores["s_xz"], fake_scores["s_xz"])
    return loss, {"d_loss": loss, "d_accuracy": accuracy, **terms, **scores}

  def eg_loss(self, score: Score, real: RealPairs, fake_x, fake_c, params, model_state, key):
    """E lowers its pairs' scores, G raises its own: both pairs go through D at once.

    With `latent_regression` > 0, E also learns to recover z from G's samples:
    + λ · mean((E(G(z))_mean - z)²), through E alone (G's samples are held fixed) unless
    `latent_regression_trains_g`.
    """
    scores = score(jnp.concatenate([real.x, fake_x]), jnp.concatenate([real.c, fake_c]))
    loss, terms = losses.bigbigan_eg_loss(
        *split_scores(scores, fake_x.shape[0]), unary_x=self.unary_x, unary_z=self.unary_z,
        reduction=self.reduction)
    if self.latent_regression:
      regression = self._latent_regression(params, model_state, fake_x, fake_c, key)
      loss = loss + self.latent_regression * regression
      terms["latent_regression"] = regression
    if self.image_reconstruction:
      reconstruction = self._image_reconstruction(params, model_state, real)
      loss = loss + self.image_reconstruction * reconstruction
      terms["image_reconstruction"] = reconstruction
    return loss, {**terms, **real.metrics}

  def _image_reconstruction(self, params, model_state, real: RealPairs):
    """mean((G(E(x)) - x)²) at D's resolution, on the real pairs' E(x) sample, with G's
    weights held fixed unless `image_reconstruction_trains_g` (G's statistics and
    power-iteration updates are dropped)."""
    g_params = params[G]
    if not self.image_reconstruction_trains_g:
      g_params = jax.lax.stop_gradient(g_params)
    g_vars = {"params": g_params, **model_state[G]}
    recon, _ = self.nets.generator.apply(g_vars, real.c, None, train=True,
                                         mutable=["spectral", "batch_stats"])
    return jnp.mean(jnp.square(recon - jax.lax.stop_gradient(real.x)))

  def _latent_regression(self, params, model_state, fake_x, z, key):
    """mean((E(G(z))_mean - z)²), E in training mode on the samples (its statistics update is
    dropped: the real pairs make it). Samples are resized bicubically to E's resolution, as
    the input pipeline resizes real images."""
    x = fake_x if self.latent_regression_trains_g else jax.lax.stop_gradient(fake_x)
    r = self.nets.encoder_resolution
    if x.shape[1] != r:
      x = jax.image.resize(x, (x.shape[0], r, r, x.shape[3]), "cubic")
    enc, _ = self.nets.encoder.apply({"params": params[E], **model_state[E]}, x, train=True,
                                     rngs={"noise": key}, mutable=["batch_stats"])
    return jnp.mean(jnp.square(enc["z_mean"] - z))


@dataclasses.dataclass(frozen=True)
class BigGAN:
  """Class-conditional BigGAN: the hinge on (image, label) pairs."""

  nets: networks.Networks
  wrong_label_ranking: float = 0.0
  translate: int = 0
  cutout: float = 0.0
  lecam: float = 0.0
  mode_seeking: float = 0.0
  mode_seeking_from: int = 0

  eg_networks = (G,)
  console_keys = ("d_loss", "eg_loss", "d_accuracy", "g_loss")
  d_sigma_layers = {"d_first": ("trunk", "block_0", "conv1", "conv"),
                    "d_last": ("linear", "dense")}

  def real_pairs(self, params, model_state, images, labels, key) -> RealPairs:
    del params, model_state, key
    return RealPairs(networks.pool_for_discriminator(images, self.nets.resolution), labels, {},
                     {})

  def fake_condition(self, z, labels):
    del z
    return labels

  def _seeking(self, step):
    """Whether the update from train step `step` (a traced scalar) has mode seeking on."""
    return step >= self.mode_seeking_from

  def g_labels(self, labels, step):
    """The labels G draws for in its own update: with `mode_seeking` on, sample 2q + 1
    takes sample 2q's label, so that each pair differs in z alone."""
    if not self.mode_seeking or labels is None:
      return labels
    paired = jnp.repeat(labels[::2], 2)[:labels.shape[0]]
    return jnp.where(self._seeking(step), paired, labels)

  def g_regulariser(self, fake_x, z, step):
    """With `mode_seeking` = ν > 0, from step `mode_seeking_from` on, ν over the mean
    absolute difference of the images of `g_labels`' pairs divided by that of their latents
    (Mao et al. 2019): G may not map two latents of one class to nearly one image."""
    if not self.mode_seeking:
      return 0.0, {}
    n = fake_x.shape[0] // 2 * 2
    x, z = fake_x[:n], z[:n]
    ratio = jnp.mean(jnp.abs(x[0::2] - x[1::2])) / jnp.mean(jnp.abs(z[0::2] - z[1::2]))
    loss = jnp.where(self._seeking(step), self.mode_seeking / (ratio + 1e-5), 0.0)
    return loss, {"g_diversity": ratio, "g_mode_seeking": loss}

  def d_inputs(self, real: RealPairs, fake_x, fake_c, key):
    """The real pairs, the fake ones and, with `wrong_label_ranking`, each real image again
    with a label drawn uniformly from the other classes."""
    x, c = [real.x, fake_x], [real.c, fake_c]
    if self.wrong_label_ranking:
      classes = self.nets.num_classes
      offset = jax.random.randint(jax.random.fold_in(key, 1), real.c.shape, 1, classes)
      x.append(real.x)
      c.append((real.c + offset) % classes)
    return self._augment(jnp.concatenate(x), key), jnp.concatenate(c)

  def _augment(self, images, key):
    """DiffAugment (Zhao et al. 2020) of every image D sees; differentiable, so G learns
    through it. With `translate` = t > 0, each image shifted by its own offset in [-t, t] on
    both axes, the vacated border zero; then with `cutout` = f > 0, a square of side
    round(f · H) at a position of its own (clipped at the border) set to zero. Otherwise the
    images unchanged."""
    n, h, w, c = images.shape
    if self.translate:
      t = self.translate
      offsets = jax.random.randint(jax.random.fold_in(key, 2), (n, 2), 0, 2 * t + 1)
      padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)))
      images = jax.vmap(lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, c)))(
          padded, offsets)
    if self.cutout:
      size = max(1, round(self.cutout * h))
      # The square's first row and column; it may hang over any edge by up to half its side.
      start = jax.random.randint(jax.random.fold_in(key, 3), (n, 2), -(size // 2),
                                 jnp.array([h, w]) - size // 2)
      rows = jnp.arange(h)[None, :] - start[:, :1]  # (n, h): row index within the square.
      cols = jnp.arange(w)[None, :] - start[:, 1:]
      inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None]
      images = images * (1.0 - inside[..., None].astype(images.dtype))
    return images

  def extra_d_state(self) -> dict:
    """D's state besides its spectral norms: with `lecam`, LeCam's anchors, the moving
    averages of D's mean score on real and on fake images (from 0)."""
    if not self.lecam:
      return {}
    return {"lecam": {"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)}}

  def next_d_state(self, scores, batch: int, d_state: dict) -> dict:
    """The anchors after a D update: each moves 1 - LECAM_DECAY of the way to this batch's
    mean score."""
    if not self.lecam:
      return {}
    real, fake = jax.lax.stop_gradient((scores[:batch], scores[batch:2 * batch]))
    old = d_state["lecam"]
    move = lambda anchor, s: LECAM_DECAY * anchor + (1 - LECAM_DECAY) * jnp.mean(s)
    return {"lecam": {"real": move(old["real"], real), "fake": move(old["fake"], fake)}}

  def d_loss(self, scores, batch: int, d_state: dict | None = None):
    """BigGAN's hinge; with `wrong_label_ranking` = λ > 0, plus
    λ · mean(relu(1 - (D(x, y) - D(x, y')))) over real images x, their labels y and wrong
    labels y' (not in the papers). D's unconditional term is the same for both pairs, so
    this trains the projection alone to tell the classes of real images apart: a signal
    that does not wait for G's images to become hard to tell from real ones.

    With `lecam` = μ > 0 (Tseng et al. 2021, for GANs trained on little data), plus
    μ · (mean(relu(D(x) - a_fake)²) + mean(relu(a_real - D(G(z)))²)), a_real and a_fake the
    anchors of `d_state` (`extra_d_state`), as the authors' code has it: a real image's score
    is pulled down towards where fake ones have been scoring, a fake one's up towards the
    real ones', so D is held back from pushing the two apart without bound, which on a small
    training set it can do by memorising it."""
    real_scores, fake_scores = scores[:batch], scores[batch:2 * batch]
    loss = losses.d_hinge(real_scores, fake_scores)
    metrics = {"d_accuracy": _accuracy(real_scores, fake_scores),
               "score/real": jnp.mean(real_scores), "score/fake": jnp.mean(fake_scores)}
    if self.wrong_label_ranking:
      margin = real_scores - scores[2 * batch:]
      ranking = jnp.mean(jax.nn.relu(1.0 - margin))
      loss = loss + self.wrong_label_ranking * ranking
      metrics.update({"d_wrong_label_ranking": ranking,
                      "d_label_accuracy": jnp.mean(margin > 0)})
    if self.lecam:
      anchors = d_state["lecam"]
      lecam = (jnp.mean(jnp.square(jax.nn.relu(real_scores - anchors["fake"])))
               + jnp.mean(jnp.square(jax.nn.relu(anchors["real"] - fake_scores))))
      loss = loss + self.lecam * lecam
      metrics["d_lecam"] = lecam
    return loss, {"d_loss": loss, **metrics}

  def eg_loss(self, score: Score, real: RealPairs, fake_x, fake_c, params, model_state, key):
    """G raises its samples' scores (shifted as D's inputs are); D need not see the real
    pairs."""
    del real, params, model_state
    loss = losses.g_hinge(score(self._augment(fake_x, key), fake_c))
    return loss, {"g_loss": loss}


Objective = BigBiGAN | BigGAN


def build(nets: networks.Networks, loss: ml_collections.ConfigDict) -> Objective:
  """The objective of the networks' model kind, with `config.loss`'s switches."""
  if nets.encoder is not None:
    return BigBiGAN(nets, unary_x=loss.unary_x, unary_z=loss.unary_z,
                    reduction=loss.score_reduction,
                    latent_regression=float(loss.latent_regression),
                    latent_regression_trains_g=loss.latent_regression_trains_g,
                    image_reconstruction=float(loss.image_reconstruction),
                    image_reconstruction_trains_g=loss.image_reconstruction_trains_g)
  return BigGAN(nets, wrong_label_ranking=float(loss.wrong_label_ranking),
                translate=int(loss.translate), cutout=float(loss.cutout),
                lecam=float(loss.lecam), mode_seeking=float(loss.mode_seeking),
                mode_seeking_from=int(loss.mode_seeking_from))


def sigma_metrics(objective: Objective, model_state: dict) -> dict:
  """σ0 of G's and D's first and last layers: BigGAN's early warning of collapse."""
  def sigma(spectral, *path):
    # The last power-iteration estimate of a raw kernel's top singular value.
    for key in path[:-1]:
      spectral = spectral[key]
    return spectral["sn"][path[-1] + "/kernel/sigma"]

  g, d = model_state[G]["spectral"], model_state[D]["spectral"]
  return {"sigma0/g_first": sigma(g, "linear", "dense"),
          "sigma0/g_last": sigma(g, "out_conv", "conv"),
          **{f"sigma0/{k}": sigma(d, *path) for k, path in objective.d_sigma_layers.items()}}
