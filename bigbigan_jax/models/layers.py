"""Building blocks shared by G, D and E: spectrally normalised layers, batch norm with
cross-replica statistics, conditional batch norm, self-attention and the skip-connection MLP.

Variable collections:
  params       trainable weights (raw, un-normalised kernels: orthogonal regularisation and
               the optimisers see these).
  spectral     spectral-norm power-iteration state (`u`) and the last estimate of the raw
               kernel's top singular value (`sigma`, logged as the collapse signal).
  batch_stats  running batch-norm statistics, used when `train=False`.

Every `__call__` takes `train`: True uses batch statistics and advances the power iteration,
writing both to the mutable collections; False uses the running statistics and leaves all
state untouched.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

orthogonal = nn.initializers.orthogonal
SPECTRAL = "spectral"


class SNDense(nn.Module):
  """Dense layer whose kernel is divided by its top singular value (power iteration).

  flax's `nn.SpectralNorm` matches BigGAN's spectral norm: one power-iteration step per call, `u`
  initialised N(0, 1) and persistent, no gradient through `u`/`v`, `u` written back only
  when `update_stats` is True. We keep its state in the `spectral` collection.
  """

  features: int
  use_bias: bool = True
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dense = nn.Dense(self.features, use_bias=self.use_bias, kernel_init=orthogonal(),
                     dtype=self.dtype, name="dense")
    return nn.SpectralNorm(dense, epsilon=self.eps, collection_name=SPECTRAL,
                           name="sn")(x, update_stats=train)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_same(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_same_matmul_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1 SAME convolution (odd kernel) whose kernel gradient is kh matmuls.

  Same value and gradients as `lax.conv_general_dilated`. XLA:CPU lowers the kernel
  gradient of a convolution (a contraction over batch and space) ~15x slower than the
  forward pass: 447 ms against 24 ms for a 3x3, 32→32-channel conv on 64 32x32 maps. As
  matmuls it takes a fraction of that (see `_conv_bwd`). The input gradient stays XLA's (a
  convolution, as fast as the forward). For CPU runs only: on TPU and GPU the native
  gradient is the fast one.
  """
  return _conv_same(x, kernel)


def _conv_fwd(x, kernel):
  return _conv_same(x, kernel), (x, kernel)


def _conv_bwd(residuals, g):
  """dk[i, j] = sum over (n, h, w) of x_padded[n, h+i, w+j]ᵀ g[n, h, w], as kh matmuls.

  The kw column offsets move onto g: with w' = w + j - pw the column of x itself,
  dk[i, j] = sum x_hpad[n, h+i, w']ᵀ g[n, h, w' - j + pw] (g zero outside the image). So g's kw
  column shifts are stacked along its channels once, (N, H, W, kw·out), and each of the kh row
  offsets is one (N·H·W, in)ᵀ x (N·H·W, kw·out) matmul against a row slice of x padded in H
  only. Against one matmul per tap (kh·kw slices of x, each a copy, and kh·kw thin matmuls)
  this copies and reads the activations a third as often and gives each matmul a 3x wider
  output; the kernel gradient takes 14-48% less time (3x3 convs of 128 and 256 channels on
  8x8 to 32x32 maps, this project's 2-core CPU) with the same values (each output element sums
  the same products in the same order).
  """
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv_same(x, kernel), x)
  dx, = input_vjp(g)
  kh, kw, cin, cout = kernel.shape
  ph, pw = kh // 2, kw // 2
  h, w = x.shape[1], x.shape[2]
  xh = jnp.pad(x, ((0, 0), (ph, ph), (0, 0), (0, 0)))
  gp = jnp.pad(g, ((0, 0), (0, 0), (pw, pw), (0, 0)))
  g_shifts = jnp.concatenate([gp[:, :, 2 * pw - j:2 * pw - j + w, :] for j in range(kw)],
                             axis=-1).reshape(-1, kw * cout)
  rows = [jax.lax.dot_general(xh[:, i:i + h].reshape(-1, cin), g_shifts,
                              (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
          for i in range(kh)]
  dk = jnp.stack(rows).reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)
  return dx, dk.astype(kernel.dtype)


conv_same_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


class MatmulGradConv(nn.Module):
  """`nn.Conv` (stride 1, SAME, odd kernel) with the same parameters and values, whose kernel
  gradient is computed as matmuls (`conv_same_matmul_grad`)."""

  features: int
  kernel_size: tuple[int, int]
  use_bias: bool = True
  kernel_init: Any = orthogonal()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
      raise ValueError(f"MatmulGradConv needs an odd kernel, got {self.kernel_size}")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    y = conv_same_matmul_grad(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


CONV_WEIGHT_GRADS = ("xla", "matmul")


class SNConv(nn.Module):
  """Convolution (SAME padding, stride 1) with a spectrally normalised kernel.

  The kernel (kh, kw, in, out) is normalised as the (kh*kw*in, out) matrix, as in BigGAN.
  `weight_grad="matmul"` computes the kernel's gradient as matmuls (`MatmulGradConv`, fast on
  CPU); "xla" is XLA's own convolution gradient.
  """

  features: int
  kernel_size: int = 3
  use_bias: bool = True
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  weight_grad: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.kernel_size
    conv_cls = MatmulGradConv if self.weight_grad == "matmul" else functools.partial(
        nn.Conv, padding="SAME")
    conv = conv_cls(self.features, (k, k), use_bias=self.use_bias,
                    kernel_init=orthogonal(), dtype=self.dtype, name="conv")
    return nn.SpectralNorm(conv, epsilon=self.eps, collection_name=SPECTRAL,
                           name="sn")(x, update_stats=train)


class SNEmbed(nn.Module):
  """Embedding table (num_embeddings, features) with spectral norm: D's class projection."""

  num_embeddings: int
  features: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids, train: bool):
    embed = nn.Embed(self.num_embeddings, self.features, embedding_init=orthogonal(),
                     dtype=self.dtype, name="embed")
    return nn.SpectralNorm(embed, epsilon=self.eps, collection_name=SPECTRAL,
                           name="sn")(ids, update_stats=train)


def batch_moments(x: jax.Array, axis_name: str | None = None, shift=None):
  """Per-channel mean and (biased) variance over every axis but the last, in float32.

  Under `jax.jit` with the batch sharded over a mesh, reducing the global array already gives
  global-batch statistics (XLA inserts the all-reduce). Inside `shard_map`/`pmap`, where each
  device sees only its shard, pass the mapped `axis_name` to average over it.

  Both moments come from one pass over x around a per-channel `shift` s (no gradient; 0 if
  None): E[x - s] and E[(x - s)²], reduced together, and var = E[(x - s)²] - E[x - s]². The
  variance around the batch mean would need a second pass and a second cross-device
  reduction after the first. The difference loses float32 precision only when |mean - s| is
  large against the standard deviation; batch norm passes its running mean as s
  (`Standardize`), which tracks the batch mean.
  """
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  s = 0.0 if shift is None else jax.lax.stop_gradient(jnp.asarray(shift, jnp.float32))
  centred = x - s
  m1, m2 = jnp.mean(centred, axes), jnp.mean(jnp.square(centred), axes)
  if axis_name is not None:
    m1, m2 = jax.lax.pmean((m1, m2), axis_name)
  return s + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


class Standardize(nn.Module):
  """Batch-norm normalisation without an affine transform, with running statistics.

  train=True: normalise with the (global) batch's statistics and update the running ones;
  train=False: normalise with the running statistics.
  """

  momentum: float = 0.9
  eps: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    if train:
      mean, var = batch_moments(x, self.axis_name, shift=ra_mean.value)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    scale = jax.lax.rsqrt(var + self.eps)
    y = (x.astype(jnp.float32) - mean) * scale
    return y.astype(self.dtype)


class BatchNorm(nn.Module):
  """Plain batch norm with a learned per-channel scale and offset (or none)."""

  use_affine: bool = True
  momentum: float = 0.9
  eps: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = Standardize(self.momentum, self.eps, self.axis_name, self.dtype, name="norm")(x, train)
    if not self.use_affine:
      return y
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return (y * scale.astype(self.dtype) + bias.astype(self.dtype)).astype(self.dtype)


class ConditionalBatchNorm(nn.Module):
  """BigGAN's conditional BN: out = x_hat * (1 + W_gamma c) + W_beta c.

  x_hat is standardised with batch statistics and has no affine of its own; W_gamma and
  W_beta are spectrally normalised linear maps without bias. The "1 +" keeps the layer the
  identity map on x_hat at zero projections (compare_gan dropped it, compare_gan#54).
  """

  momentum: float = 0.9
  eps: float = 1e-5
  sn_eps: float = 1e-6
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond, train: bool):
    channels = x.shape[-1]
    y = Standardize(self.momentum, self.eps, self.axis_name, self.dtype, name="norm")(x, train)
    gain = SNDense(channels, use_bias=False, eps=self.sn_eps, dtype=self.dtype, name="gain")(
        cond, train)
    bias = SNDense(channels, use_bias=False, eps=self.sn_eps, dtype=self.dtype, name="bias")(
        cond, train)
    return y * (1 + gain[:, None, None, :]) + bias[:, None, None, :]


def avg_pool2(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def max_pool2(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def upsample2(x):
  """Nearest-neighbour x2 upsampling (BigGAN's, not zero insertion)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class SelfAttention(nn.Module):
  """SAGAN non-local block as BigGAN uses it: keys and values max-pooled 2x, channels
  reduced to C/8 (query, key) and C/2 (value), no 1/sqrt(d) scaling, and a residual gate
  gamma that starts at 0 so the block is the identity at initialisation."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  weight_grad: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    b, h, w, c = x.shape
    if c < 8 or c % 8:
      raise ValueError(f"self-attention needs a channel count divisible by 8, got {c}")
    conv = lambda f, name: SNConv(f, 1, use_bias=False, eps=self.eps, dtype=self.dtype,
                                  weight_grad=self.weight_grad, name=name)
    theta = conv(c // 8, "theta")(x, train).reshape(b, h * w, c // 8)
    phi = max_pool2(conv(c // 8, "phi")(x, train)).reshape(b, h * w // 4, c // 8)
    g = max_pool2(conv(c // 2, "g")(x, train)).reshape(b, h * w // 4, c // 2)
    logits = jnp.einsum("bqd,bkd->bqk", theta, phi).astype(jnp.float32)
    beta = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    o = jnp.einsum("bqk,bkd->bqd", beta, g).reshape(b, h, w, c // 2)
    o = conv(c, "o")(o, train)
    gamma = self.param("gamma", nn.initializers.zeros, (), jnp.float32)
    return x + gamma.astype(self.dtype) * o


class SkipMLP(nn.Module):
  """MLP with skip connections (BigBiGAN's H, J and E's head; the layout is our choice).

  Layer 1 projects the input to `width`; each further layer adds ReLU-Dense of the running
  sum to it (a residual MLP), so `num_layers` counts dense layers. Returns ReLU of the sum,
  a non-negative feature like D's pooled F(x).
  """

  width: int
  num_layers: int
  spectral_norm: bool = True
  sn_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  def _dense(self, name):
    if self.spectral_norm:
      return SNDense(self.width, eps=self.sn_eps, dtype=self.dtype, name=name)
    plain = nn.Dense(self.width, dtype=self.dtype, name=name)
    return lambda x, train: plain(x)

  @nn.compact
  def __call__(self, x, train: bool):
    h = self._dense("dense_0")(x, train)
    for i in range(1, self.num_layers):
      h = h + self._dense(f"dense_{i}")(nn.relu(h), train)
    return nn.relu(h)
