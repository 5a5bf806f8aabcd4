"""BigBiGAN's encoder E: a ResNet-v2 or RevNet trunk and a Gaussian head over z.

Outputs are the TF-Hub `encode` signature's: z_mean, z_stdev, z_sample (what D sees),
avepool_feat (the trunk's global average pool) and bn_crelu_feat
(concat(ReLU(BN(a)), ReLU(-BN(a))) of that feature, the paper's best linear-probe feature).
E uses batch norm (cross-replica, like G's) and no spectral norm.

RevNet: as in Kolesnikov et al. 2019, the ResNet-v2 layout with every unit that keeps shape
replaced by a reversible unit (y1 = x1 + F(x2), y2 = x2 + G(y1) on the two channel halves).
We train it with ordinary backprop; `remat` trades compute for activation memory instead of
inverting the units.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigbigan_jax.models import layers

STAGE_UNITS = {50: (3, 4, 6, 3), 26: (2, 2, 2, 2), 14: (1, 1, 1, 1)}
STAGE_STRIDES = (1, 2, 2, 2)

_he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nn.Module):
  """Pre-activation bottleneck branch: BN-ReLU-1x1 → BN-ReLU-3x3(stride) → BN-ReLU-1x1.

  Returns (branch output, the first pre-activation) so a projection shortcut can share it.
  """

  width: int
  out_ch: int | None  # None: as many channels as the input.
  stride: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out_ch = x.shape[-1] if self.out_ch is None else self.out_ch
    bn = lambda name: layers.BatchNorm(momentum=self.bn_momentum, eps=self.bn_eps,
                                       dtype=self.dtype, name=name)
    conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), padding="SAME", use_bias=False,
                                         kernel_init=_he_init, dtype=self.dtype, name=name)
    preact = nn.relu(bn("bn1")(x, train))
    h = conv(self.width, 1, 1, "conv1")(preact)
    h = conv(self.width, 3, self.stride, "conv2")(nn.relu(bn("bn2")(h, train)))
    h = conv(out_ch, 1, 1, "conv3")(nn.relu(bn("bn3")(h, train)))
    return h, preact


class ResidualUnit(nn.Module):
  """ResNet-v2 unit; the shortcut is a strided 1x1 projection of the pre-activation when the
  shape changes, else the identity."""

  width: int
  out_ch: int
  stride: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    h, preact = Bottleneck(self.width, self.out_ch, self.stride, self.bn_momentum, self.bn_eps,
                           self.dtype, name="branch")(x, train)
    if self.stride != 1 or x.shape[-1] != self.out_ch:
      s = self.stride
      x = nn.Conv(self.out_ch, (1, 1), (s, s), use_bias=False, kernel_init=_he_init,
                  dtype=self.dtype, name="shortcut")(preact)
    return x + h


class ReversibleUnit(nn.Module):
  """RevNet unit on channel halves: y1 = x1 + F(x2); y2 = x2 + G(y1). Shape-preserving."""

  width: int
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    branch = lambda: Bottleneck(self.width // 2, None, 1, self.bn_momentum, self.bn_eps,
                                self.dtype)
    self.f = branch()
    self.g = branch()

  def __call__(self, x, train: bool):
    x1, x2 = jnp.split(x, 2, axis=-1)
    y1 = x1 + self.f(x2, train)[0]
    y2 = x2 + self.g(y1, train)[0]
    return jnp.concatenate([y1, y2], axis=-1)

  def inverse(self, y):
    """Recovers the input from the output (evaluation mode: running BN statistics)."""
    y1, y2 = jnp.split(y, 2, axis=-1)
    x2 = y2 - self.g(y1, False)[0]
    x1 = y1 - self.f(x2, False)[0]
    return jnp.concatenate([x1, x2], axis=-1)


class Trunk(nn.Module):
  """Images (B, R, R, 3) → avepool feature (B, 32 · base_width · width_multiplier).

  stem "imagenet": 7x7 stride-2 conv and a 3x3 stride-2 max pool (R/4 into stage 0; at 32 px
  the last stage is 1x1). "small": one 3x3 stride-1 conv, as ResNets for 32 px images do
  (R into stage 0, R/8 at the last stage), at ~16x the trunk's compute.
  """

  arch: str = "resnet_v2"
  stem: str = "imagenet"
  depth: int = 50
  width_multiplier: int = 1
  base_width: int = 64
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    width = self.base_width * self.width_multiplier
    bn_kw = dict(bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, dtype=self.dtype)
    unit_cls = nn.remat(ResidualUnit, static_argnums=(2,)) if self.remat else ResidualUnit
    rev_cls = nn.remat(ReversibleUnit, static_argnums=(2,)) if self.remat else ReversibleUnit

    if self.stem == "imagenet":
      h = nn.Conv(width, (7, 7), (2, 2), padding="SAME", use_bias=False, kernel_init=_he_init,
                  dtype=self.dtype, name="stem")(x.astype(self.dtype))
      h = nn.max_pool(h, (3, 3), (2, 2), padding="SAME")
    else:
      h = nn.Conv(width, (3, 3), (1, 1), padding="SAME", use_bias=False, kernel_init=_he_init,
                  dtype=self.dtype, name="stem")(x.astype(self.dtype))
    for stage, (units, stride) in enumerate(zip(STAGE_UNITS[self.depth], STAGE_STRIDES)):
      w = width * 2**stage
      for u in range(units):
        name = f"stage{stage}_unit{u}"
        if u > 0 and self.arch == "revnet":
          h = rev_cls(w, name=name, **bn_kw)(h, train)
        else:
          h = unit_cls(w, 4 * w, stride if u == 0 else 1, name=name, **bn_kw)(h, train)
    h = nn.relu(layers.BatchNorm(momentum=self.bn_momentum, eps=self.bn_eps, dtype=self.dtype,
                                 name="final_bn")(h, train))
    return jnp.mean(h.astype(jnp.float32), axis=(1, 2))


class Encoder(nn.Module):
  """E: images at E's resolution → dict of z_mean, z_stdev, z_sample, avepool_feat,
  bn_crelu_feat. Draws z_sample's noise from the 'noise' RNG stream; with
  `stochastic=False`, z_stdev is 0 and z_sample = z_mean."""

  z_dim: int = 120
  arch: str = "resnet_v2"
  stem: str = "imagenet"
  depth: int = 50
  width_multiplier: int = 1
  base_width: int = 64
  head_width: int = 4096
  head_layers: int = 4
  min_stdev: float = 1e-4
  stochastic: bool = True
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    feat = Trunk(self.arch, self.stem, self.depth, self.width_multiplier, self.base_width,
                 self.bn_momentum, self.bn_eps, self.dtype, self.remat, name="trunk")(x, train)
    normed = layers.BatchNorm(use_affine=False, momentum=self.bn_momentum, eps=self.bn_eps,
                              name="feat_bn")(feat, train)
    bn_crelu = jnp.concatenate([nn.relu(normed), nn.relu(-normed)], axis=-1)

    h = layers.SkipMLP(self.head_width, self.head_layers, spectral_norm=False,
                       dtype=self.dtype, name="head")(feat.astype(self.dtype), train)
    out = nn.Dense(2 * self.z_dim, name="z_params")(h.astype(jnp.float32))
    mean, pre_stdev = jnp.split(out, 2, axis=-1)
    if self.stochastic:
      stdev = jax.nn.softplus(pre_stdev) + self.min_stdev
    else:
      # BiGAN's deterministic E: z_sample = z_mean. (The σ half of the head stays, unused,
      # so both kinds of E have the same parameters.) A Gaussian E can satisfy s_z by
      # matching the prior with σ → 1 and z_mean → 0, ignoring x; a deterministic one can
      # only spread its codes over the prior by telling images apart.
      stdev = jnp.zeros_like(mean)
    eps = jax.random.normal(self.make_rng("noise"), mean.shape, mean.dtype)
    return {"z_mean": mean, "z_stdev": stdev, "z_sample": mean + stdev * eps,
            "avepool_feat": feat, "bn_crelu_feat": bn_crelu}
