"""BigGAN generator (Brock et al. 2018) with hierarchical z and a shared class embedding.

Unconditional BigBiGAN G keeps BigGAN-128's shapes; the 128-d class slot holds a learned
constant vector (our choice: a 1-class embedding).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bigbigan_jax import config as config_lib
from bigbigan_jax.models import layers

# Channel multipliers of `ch`, input and output of each up-sampling residual block.
G_ARCH = {
    16: ((4, 4), (4, 4)),
    32: ((4, 4, 4), (4, 4, 4)),
    64: ((16, 16, 8, 4), (16, 8, 4, 2)),
    128: ((16, 16, 8, 4, 2), (16, 8, 4, 2, 1)),
    256: ((16, 16, 8, 8, 4, 2), (16, 8, 8, 4, 2, 1)),
}
assert all(len(G_ARCH[r][0]) == config_lib.num_g_blocks(r) for r in G_ARCH)


class GBlock(nn.Module):
  """ReLU(CBN) → up2 → conv3x3 → ReLU(CBN) → conv3x3, plus conv1x1(up2(x))."""

  out_ch: int
  bn_momentum: float
  bn_eps: float
  sn_eps: float
  dtype: layers.Dtype
  weight_grad: str = "xla"
  fused_resample: bool = False  # The up-sampling and conv1 as one convolution (layers.SNConv).

  @nn.compact
  def __call__(self, x, cond, train: bool):
    cbn = lambda name: layers.ConditionalBatchNorm(
        self.bn_momentum, self.bn_eps, self.sn_eps, dtype=self.dtype, name=name)
    conv = lambda k, name, resample="none": layers.SNConv(
        self.out_ch, k, eps=self.sn_eps, dtype=self.dtype, weight_grad=self.weight_grad,
        resample=resample, fused_resample=self.fused_resample, name=name)
    h = nn.relu(cbn("cbn1")(x, cond, train))
    h = conv(3, "conv1", "up")(h, train)
    h = nn.relu(cbn("cbn2")(h, cond, train))
    h = conv(3, "conv2")(h, train)
    return h + conv(1, "shortcut")(layers.upsample2(x), train)


class Generator(nn.Module):
  """z (B, z_dim) [+ labels (B,)] → images (B, R, R, 3) in [-1, 1]."""

  resolution: int = 128
  ch: int = 96
  z_dim: int = 120
  num_classes: int = 0
  shared_dim: int = 128
  class_constant_stddev: float = 1.0  # Init of the unconditional G's learned class slot.
  shared_init_scale: float = 1.0  # Multiplies the orthogonal init of the class embedding.
  attention_res: int = 64
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  sn_eps: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  remat: bool = False
  weight_grad: str = "xla"  # Of the SN convolutions: "xla" or "matmul" (fast on CPU).
  fused_resample: bool = False  # Each block's up-sampling and conv1 as one convolution.

  @property
  def num_chunks(self) -> int:
    return len(G_ARCH[self.resolution][0]) + 1

  def class_embedding(self, labels, batch: int):
    """The shared embedding of the labels, or the learned constant when unconditional."""
    if self.num_classes:
      if labels is None:
        raise ValueError("this generator is class-conditional: pass labels")
      # Orthogonal rows have norm ~min(1, sqrt(shared_dim / classes)); a z chunk's norm is
      # ~sqrt(chunk size). The scale sets how loud the class is against z in every CBN.
      embed = nn.Embed(self.num_classes, self.shared_dim,
                       embedding_init=layers.orthogonal(self.shared_init_scale), name="shared")
      return embed(labels)
    # Each of its entries feeds every conditional BN's gain (1 + W_γ c) and bias, the same for
    # all samples: N(0, 1) at shared_dim 32 makes ~19% of the gains negative at init; 0 starts
    # every CBN as plain BN, conditioned by the z chunks alone.
    init = (nn.initializers.normal(self.class_constant_stddev) if self.class_constant_stddev
            else nn.initializers.zeros)
    const = self.param("class_constant", init, (self.shared_dim,))
    return jnp.broadcast_to(const, (batch, self.shared_dim))

  @nn.compact
  def __call__(self, z, labels=None, *, train: bool):
    ins, outs = G_ARCH[self.resolution]
    b = z.shape[0]
    if z.shape[-1] != self.z_dim:
      raise ValueError(f"z has {z.shape[-1]} dims, the generator expects {self.z_dim}")
    chunks = jnp.split(z, self.num_chunks, axis=-1)
    e = self.class_embedding(labels, b)

    h = layers.SNDense(4 * 4 * ins[0] * self.ch, eps=self.sn_eps, dtype=self.dtype,
                       name="linear")(chunks[0], train)
    h = h.reshape(b, 4, 4, ins[0] * self.ch)
    block_cls = nn.remat(GBlock, static_argnums=(3,)) if self.remat else GBlock
    for i, out_mult in enumerate(outs):
      cond = jnp.concatenate([chunks[i + 1], e], axis=-1).astype(self.dtype)
      h = block_cls(out_mult * self.ch, self.bn_momentum, self.bn_eps, self.sn_eps,
                    self.dtype, self.weight_grad, self.fused_resample,
                    name=f"block_{i}")(h, cond, train)
      if h.shape[1] == self.attention_res:
        h = layers.SelfAttention(self.sn_eps, self.dtype, self.weight_grad,
                                 name=f"attention_{i}")(h, train)
    h = layers.BatchNorm(momentum=self.bn_momentum, eps=self.bn_eps, dtype=self.dtype,
                         name="out_bn")(h, train)
    h = layers.SNConv(3, 3, eps=self.sn_eps, dtype=self.dtype, weight_grad=self.weight_grad,
                      name="out_conv")(
        nn.relu(h), train)
    return jnp.tanh(h.astype(jnp.float32))
