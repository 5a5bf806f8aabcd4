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
import numpy as np

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


# A 3x3 SAME convolution of a 2x nearest-up-sampled map reads, for output rows of parity a, the
# low-resolution rows {i - 1, i} (a = 0) or {i, i + 1} (a = 1): two taps, each the sum of one or
# two of the kernel's rows. _UP_TAPS[a, u, k] = 1 where kernel row k lands on tap u (of a window
# that starts at row i + a - 1 of the input padded by 1); the same holds for columns.
_UP_TAPS = np.zeros((2, 2, 3), np.float32)
_UP_TAPS[0, 0, 0] = _UP_TAPS[0, 1, 1] = _UP_TAPS[0, 1, 2] = 1
_UP_TAPS[1, 0, 0] = _UP_TAPS[1, 0, 1] = _UP_TAPS[1, 1, 2] = 1
# A 3x3 SAME convolution followed by a 2x2 average pool is a 4x4 stride-2 convolution of the input
# padded by 1: _POOL_TAPS[r, k, p] = 1/2 where kernel row k, at pooled row parity p, lands on row r
# of the 4-row window; the same holds for columns.
_POOL_TAPS = np.zeros((4, 3, 2), np.float32)
for _p in range(2):
  for _k in range(3):
    _POOL_TAPS[_p + _k, _k, _p] = 0.5


def _check_3x3(kernel):
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"a fused resampling convolution needs a 3x3 kernel, got {kernel.shape}")


def upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3_same(upsample2(x), kernel)` as one 2x2 convolution of the low-resolution x.

  Each of the four output parities (a, b) is a 2x2 convolution of x padded by 1, with taps that
  sum the kernel's rows and columns (_UP_TAPS); the four share one convolution with 4·out output
  channels, interleaved afterwards. 16 multiply-adds per low-resolution pixel and channel pair
  instead of 36: 2.25x fewer FLOPs, and no up-sampled copy of x. The same values to float
  rounding (the taps' sums regroup the products).
  """
  _check_3x3(kernel)
  n, h, w, c = x.shape
  out = kernel.shape[-1]
  taps = jnp.asarray(_UP_TAPS, kernel.dtype)
  k = jnp.einsum("aui,bvj,ijco->uvcabo", taps, taps, kernel).reshape(2, 2, c, 4 * out)
  z = jax.lax.conv_general_dilated(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), k, (1, 1),
                                   "VALID", dimension_numbers=_NHWC)
  z = z.reshape(n, h + 1, w + 1, 2, 2, out)
  rows = [jnp.stack([z[:, a:a + h, b:b + w, a, b] for b in range(2)], axis=3) for a in range(2)]
  return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, out)


def conv3x3_avg_pool(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`avg_pool2(conv3x3_same(x, kernel))` as one 2x2 convolution of x's space-to-depth.

  The pooled convolution is a 4x4 stride-2 convolution of x padded by 1 (_POOL_TAPS); on the
  2x2-space-to-depth of the padded x it is a stride-1 2x2 convolution with 4·in input channels.
  16 multiply-adds per output pixel and channel pair instead of 36 (2.25x fewer FLOPs), and its
  gradients are stride-1 convolutions too. The same values to float rounding.
  """
  _check_3x3(kernel)
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"2x2 average pooling needs an even map, got {h}x{w}")
  out = kernel.shape[-1]
  taps = jnp.asarray(_POOL_TAPS, kernel.dtype)
  k4 = jnp.einsum("rip,sjq,ijco->rsco", taps, taps, kernel)  # (4, 4, c, out)
  k = k4.reshape(2, 2, 2, 2, c, out).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, out)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  hp, wp = (h + 2) // 2, (w + 2) // 2
  s2d = xp.reshape(n, hp, 2, wp, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, 4 * c)
  return jax.lax.conv_general_dilated(s2d, k, (1, 1), "VALID", dimension_numbers=_NHWC)


class ResampleConv(nn.Module):
  """A 3x3 convolution (same parameters as `nn.Conv`) of the 2x up-sampled input ("up") or
  followed by a 2x2 average pool ("down"), computed as one smaller convolution
  (`upsample_conv3x3`, `conv3x3_avg_pool`)."""

  features: int
  mode: str
  use_bias: bool = True
  kernel_init: Any = orthogonal()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    fused = {"up": upsample_conv3x3, "down": conv3x3_avg_pool}[self.mode]
    y = fused(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


CONV_WEIGHT_GRADS = ("xla", "matmul")


class SNConv(nn.Module):
  """Convolution (SAME padding, stride 1) with a spectrally normalised kernel.

  The kernel (kh, kw, in, out) is normalised as the (kh*kw*in, out) matrix, as in BigGAN.
  `weight_grad="matmul"` computes the kernel's gradient as matmuls (`MatmulGradConv`, fast on
  CPU); "xla" is XLA's own convolution gradient. `resample="up"` convolves the 2x
  nearest-up-sampled input (G's first conv of a block), "down" 2x2-average-pools the output
  (D's last conv of a down-sampling block); with `fused_resample` (3x3 only) each is one
  convolution with 2.25x fewer FLOPs (`ResampleConv`), otherwise the resampling is separate.
  The parameters are the same either way.
  """

  features: int
  kernel_size: int = 3
  use_bias: bool = True
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  weight_grad: str = "xla"
  resample: str = "none"
  fused_resample: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.kernel_size
    if self.resample not in ("none", "up", "down"):
      raise ValueError(f"resample must be 'none', 'up' or 'down', got {self.resample!r}")
    fused = self.fused_resample and self.resample != "none"
    if fused:
      conv = ResampleConv(self.features, self.resample, use_bias=self.use_bias,
                          kernel_init=orthogonal(), dtype=self.dtype, name="conv")
    else:
      conv_cls = MatmulGradConv if self.weight_grad == "matmul" else functools.partial(
          nn.Conv, padding="SAME")
      conv = conv_cls(self.features, (k, k), use_bias=self.use_bias,
                      kernel_init=orthogonal(), dtype=self.dtype, name="conv")
    if self.resample == "up" and not fused:
      x = upsample2(x)
    y = nn.SpectralNorm(conv, epsilon=self.eps, collection_name=SPECTRAL,
                        name="sn")(x, update_stats=train)
    return avg_pool2(y) if self.resample == "down" and not fused else y


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
