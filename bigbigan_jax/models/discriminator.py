"""BigGAN's discriminator, and BigBiGAN's joint discriminator D = (F, H, J).

D has no batch norm; every weight is spectrally normalised. Callers pass real and fake
examples through D in one concatenated call, as BigGAN does.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bigbigan_jax.models import layers

# Output channel multipliers of `ch` and whether each block ends with a 2x2 average pool.
D_ARCH = {
    16: ((4, 4, 4), (True, False, False)),
    32: ((4, 4, 4, 4), (True, True, False, False)),
    64: ((1, 2, 4, 8, 16), (True,) * 5),
    128: ((1, 2, 4, 8, 16, 16), (True,) * 5 + (False,)),
    256: ((1, 2, 4, 8, 8, 16, 16), (True,) * 6 + (False,)),
}


class DBlock(nn.Module):
  """[ReLU] → conv3x3 → ReLU → conv3x3 → [avgpool], plus a shortcut.

  The first block sees raw pixels, so it has no pre-activation and pools before its 1x1
  shortcut conv; later blocks convolve then pool. The shortcut is the identity when
  neither the width nor the size changes.
  """

  out_ch: int
  downsample: bool
  preactivation: bool
  sn_eps: float
  dtype: layers.Dtype
  weight_grad: str = "xla"
  fused_resample: bool = False  # conv2 and the average pool as one convolution (layers.SNConv).

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda k, name, resample="none": layers.SNConv(
        self.out_ch, k, eps=self.sn_eps, dtype=self.dtype, weight_grad=self.weight_grad,
        resample=resample, fused_resample=self.fused_resample, name=name)
    h = nn.relu(x) if self.preactivation else x
    h = conv(3, "conv1")(h, train)
    h = conv(3, "conv2", "down" if self.downsample else "none")(nn.relu(h), train)

    shortcut = x
    if self.downsample or x.shape[-1] != self.out_ch:
      if self.preactivation:
        shortcut = conv(1, "shortcut")(shortcut, train)
        shortcut = layers.avg_pool2(shortcut) if self.downsample else shortcut
      else:
        shortcut = layers.avg_pool2(shortcut) if self.downsample else shortcut
        shortcut = conv(1, "shortcut")(shortcut, train)
    return h + shortcut


class DiscriminatorTrunk(nn.Module):
  """Images (B, R, R, 3) → the sum-pooled ReLU feature (B, 16·ch at 128): BigGAN D without
  its head, and F(x) of the joint discriminator."""

  resolution: int = 128
  ch: int = 96
  attention_res: int = 64
  sn_eps: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  remat: bool = False
  weight_grad: str = "xla"
  fused_resample: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    outs, downs = D_ARCH[self.resolution]
    if x.shape[1:] != (self.resolution, self.resolution, 3):
      raise ValueError(f"D expects images of shape (B, {self.resolution}, {self.resolution}, 3),"
                       f" got {x.shape}")
    block_cls = nn.remat(DBlock, static_argnums=(2,)) if self.remat else DBlock
    attention_after = _first_block_at(self.resolution, self.attention_res)
    h = x.astype(self.dtype)
    for i, (out_mult, down) in enumerate(zip(outs, downs)):
      h = block_cls(out_mult * self.ch, down, i > 0, self.sn_eps, self.dtype,
                    self.weight_grad, self.fused_resample, name=f"block_{i}")(h, train)
      if i == attention_after:
        h = layers.SelfAttention(self.sn_eps, self.dtype, self.weight_grad,
                                 name=f"attention_{i}")(h, train)
    return jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))


def _first_block_at(resolution: int, size: int) -> int:
  """Index of the first D block whose output is `size` (BigGAN attends once); -1: none."""
  res = resolution
  for i, down in enumerate(D_ARCH[resolution][1]):
    res = res // 2 if down else res
    if res == size:
      return i
  return -1


class Discriminator(nn.Module):
  """BigGAN D: (images, labels) → scores (B,), with the projection head when conditional."""

  resolution: int = 128
  ch: int = 96
  num_classes: int = 1000
  attention_res: int = 64
  sn_eps: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  remat: bool = False
  weight_grad: str = "xla"
  fused_resample: bool = False

  @nn.compact
  def __call__(self, x, labels=None, *, train: bool):
    h = DiscriminatorTrunk(self.resolution, self.ch, self.attention_res, self.sn_eps,
                           self.dtype, self.remat, self.weight_grad, self.fused_resample,
                           name="trunk")(x, train)
    out = layers.SNDense(1, eps=self.sn_eps, name="linear")(h, train)[:, 0]
    if self.num_classes:
      if labels is None:
        raise ValueError("this discriminator is class-conditional: pass labels")
      embed = layers.SNEmbed(self.num_classes, h.shape[-1], eps=self.sn_eps, name="embed")
      out = out + jnp.sum(embed(labels, train) * h, axis=-1)
    return out


class JointDiscriminator(nn.Module):
  """BigBiGAN D on (x, z) pairs → dict(s_x, s_z, s_xz), each (B,).

  s_x = linear(F(x)), s_z = linear(H(z)), s_xz = linear(J(concat(F(x), H(z)))).

  F(x) is BigGAN's sum-pooled feature. `j_fx_pool="mean"` divides it by the number of
  positions before J (s_x keeps the sum): at 32 px the sum's norm is ~20x H(z)'s at init, so
  J's input is all x and s_xz hardly depends on z, which is E's only way to learn.
  """

  resolution: int = 128
  ch: int = 96
  attention_res: int = 64
  h_width: int = 2048
  h_layers: int = 8
  j_width: int = 2048
  j_layers: int = 8
  j_fx_pool: str = "sum"  # "sum" (F(x) as s_x sees it) or "mean" over positions, for J.
  sn_eps: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  remat: bool = False
  weight_grad: str = "xla"
  fused_resample: bool = False

  @nn.compact
  def __call__(self, x, z, *, train: bool):
    fx = DiscriminatorTrunk(self.resolution, self.ch, self.attention_res, self.sn_eps,
                            self.dtype, self.remat, self.weight_grad, self.fused_resample,
                            name="F")(x, train)
    hz = layers.SkipMLP(self.h_width, self.h_layers, sn_eps=self.sn_eps, dtype=self.dtype,
                        name="H")(z.astype(self.dtype), train)
    fx_j = fx
    if self.j_fx_pool == "mean":
      side = self.resolution // 2**sum(D_ARCH[self.resolution][1])
      fx_j = fx / (side * side)
    j = layers.SkipMLP(self.j_width, self.j_layers, sn_eps=self.sn_eps, dtype=self.dtype,
                       name="J")(jnp.concatenate([fx_j.astype(self.dtype), hz], -1), train)
    score = lambda name, h: layers.SNDense(1, eps=self.sn_eps, name=name)(
        h.astype(jnp.float32), train)[:, 0]
    return {"s_x": score("score_x", fx), "s_z": score("score_z", hz),
            "s_xz": score("score_xz", j)}
