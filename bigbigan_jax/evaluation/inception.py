"""The FID Inception-v3 network in flax.linen.

This is the network behind the standard FID: TensorFlow's `inception-2015-12-05` graph
(the one TTUR's `fid.py` and OpenAI's Inception Score code load), as ported to PyTorch by
pytorch-fid. That graph is not torchvision's Inception-v3. pytorch-fid patches torchvision's
blocks to reproduce it, and so does this module:

- The 3x3 average pools inside the A, C and first E blocks (`Mixed_5b..5d`, `Mixed_6b..6e`,
  `Mixed_7b`) divide by the number of real pixels under the window, not by 9
  (TF's SAME pooling; torch's `count_include_pad=False`).
- The pool branch of the last E block (`Mixed_7c`) is a 3x3 stride-1 MAX pool, a quirk of the
  TF graph.
- The classifier has 1008 outputs (the TF graph's label space), not 1000, and no aux head.
- Every conv is followed by batch norm with eps 0.001, in inference mode.

Input: NHWC float images in [-1, 1] of any size. They are resized to 299x299 bilinearly with
half-pixel centres and no anti-aliasing (torch's `F.interpolate(..., mode="bilinear",
align_corners=False)`, which pytorch-fid uses). pytorch-fid takes images in [0, 1] and maps
them with 2x - 1 to [-1, 1], the range the TF graph sees after its own (x - 128) / 128; our
images are already in [-1, 1], so they enter unchanged.

Outputs: `(pool3, logits)`.
- `pool3`: (N, 2048), the global average pool of `Mixed_7c` (TF tensor `pool_3:0`): the FID
  feature.
- `logits`: (N, 1008), the TF graph's `softmax/logits` layer applied to pool3. By default
  WITHOUT its bias (`logits_bias=False`): OpenAI's Inception Score code (improved-gan
  `inception_score/model.py`), which produced the published IS numbers, multiplies pool3 by
  the weight of `softmax/logits/MatMul` and never adds the bias (openai/improved-gan#39
  reports that adding it raises IS on CIFAR-10 test images from 10.95 to 11.23). `metrics.inception_score` takes the softmax of these
  over all 1008 classes, as that code does. Set `logits_bias=True` for the graph's own
  `softmax/logits` tensor (TF-GAN style).

Weights: `inception_weights.load_inception` (and how to get them, there).

Numerics: convs and the classifier run at `Precision.HIGHEST` by default, because TPUs would
otherwise evaluate float32 convolutions in one bfloat16 pass and move the features away from
the reference network's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigbigan_jax import sharding as sharding_lib

INPUT_SIZE = 299

NUM_CLASSES = 1008

POOL3_DIM = 2048

BN_EPS = 1e-3

PrecisionLike = Any


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """Torch-style symmetric padding (all, or (height, width)) as flax explicit padding."""
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of torch's bilinear sampling along one axis.

  Half-pixel centres, source positions clamped at 0, two taps whatever the scale (no
  anti-aliasing when shrinking), as `F.interpolate(mode="bilinear", align_corners=False)`.
  The positions are rounded the way torch's kernel rounds them: a float32 scale and one
  fused multiply-add, src = fma(scale, dst + 0.5, -0.5) in float32. Exact arithmetic would
  differ from torch's output by up to ~5e-5 (at 512→299); this way by ~1e-7.
  """
  scale = np.float32(size_in) / np.float32(size_out)
  centres = np.arange(size_out, dtype=np.float32) + np.float32(0.5)
  # A product of two float32s is exact in float64, so one rounding to float32 after the
  # subtraction is the fused multiply-add's single rounding.
  src = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  lo = np.minimum(src.astype(np.int64), size_in - 1)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo.astype(np.float32)
  weights = np.zeros((size_out, size_in), np.float64)
  rows = np.arange(size_out)
  np.add.at(weights, (rows, lo), np.float32(1.0) - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Resizes NHWC images to size x size like torch's bilinear `align_corners=False`.

  The sampling weights are computed on the host (see `_interpolation_matrix`) and applied
  as two matmuls at full float32 precision. (`jax.image.resize` rounds its sample positions
  differently and differs from torch by up to ~4e-5 at 75→299.)

  Args:
    images: (N, H, W, C) float images.
    size: the output height and width.

  Returns:
    (N, size, size, C) float32 images.
  """
  _, h, w, _ = images.shape
  x = jnp.asarray(images, jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", _interpolation_matrix(h, size), x, precision=hp)
  return jnp.einsum("pw,nowc->nopc", _interpolation_matrix(w, size), x, precision=hp)


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool that averages only the pixels inside the image (TF SAME)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1), count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool; padding, where any, never wins (flax pads with -inf)."""
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=_pad(padding))


class BasicConv(nn.Module):
  """Conv (no bias) → batch norm (inference, eps 0.001) → ReLU.

  Named `conv` and `bn` inside, like pytorch-fid's `BasicConv2d`, so that state-dict keys
  map onto variable paths one to one.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: int | tuple[int, int] = 0
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(
        self.features,
        self.kernel_size,
        strides=(self.strides, self.strides),
        padding=_pad(self.padding),
        use_bias=False,
        precision=self.precision,
        name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and average-pool branches (256/288 channels)."""

  pool_features: int
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_3x3_same(x))
    # Channel order is the state dict's: the next block's kernels expect it.
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35→17 (768 channels)."""

  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    bp = max_pool_3x3(x, stride=2)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches and an average-pool branch (768 channels)."""

  channels_7x7: int
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17→8 (1280 channels)."""

  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    bp = max_pool_3x3(x, stride=2)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c: expanded 3x3 branches (2048 channels).

  Attributes:
    max_pool: the pool branch max-pools (Mixed_7c of the FID graph) instead of averaging
      over the in-image pixels (Mixed_7b).
  """

  max_pool: bool = False
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    pooled = max_pool_3x3(x, stride=1, padding=1) if self.max_pool else avg_pool_3x3_same(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The 1008-way classifier on pool3, named `fc` like pytorch-fid's.

  It always owns its bias, so that every weight file loads the same way; whether the bias
  is added is the IS convention (see the module docstring).
  """

  use_bias: bool = False
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    y = jnp.dot(x, kernel, precision=self.precision)
    return y + bias if self.use_bias else y


class FIDInceptionV3(nn.Module):
  """Inception-v3 as in TF's FID graph; see the module docstring.

  Attributes:
    logits_bias: add the classifier bias to the logits. False (default) reproduces OpenAI's
      Inception Score code; True gives the graph's `softmax/logits` tensor.
    resize_input: resize inputs to 299x299 first (as pytorch-fid always does). Turn off
      only for inputs that are already 299x299.
    precision: matmul/conv precision of every layer.
  """

  logits_bias: bool = False
  resize_input: bool = True
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Computes the FID features and the IS logits.

    Args:
      images: (N, H, W, 3) float images in [-1, 1].

    Returns:
      pool3: (N, 2048) float32 features.
      logits: (N, 1008) float32 logits (see `logits_bias`).
    """
    p = self.precision
    x = jnp.asarray(images, jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x)
    x = BasicConv(32, (3, 3), strides=2, precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=1, precision=p, name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3(x, stride=2)
    x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3(x, stride=2)
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = Logits(use_bias=self.logits_bias, precision=p, name="fc")(pool3)
    return pool3, logits


# Separator of the flattened variable names in the .npz file ("params/Mixed_5b/...").
NAME_SEP = "/"


def flatten_variables(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{NAME_SEP}{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten_variables(value, name))
    else:
      out[name] = value
  return out


def variable_shapes(module: FIDInceptionV3 | None = None) -> dict[str, tuple[int, ...]]:
  """The flat name → shape table of the module's variables, without computing any.

  Args:
    module: the network; a default `FIDInceptionV3()` when None.

  Returns:
    {"params/Mixed_5b/branch1x1/conv/kernel": (1, 1, 192, 64), ...}.
  """
  module = module or FIDInceptionV3()
  abstract = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return {name: tuple(leaf.shape) for name, leaf in flatten_variables(abstract).items()}


def make_inception_fn(module: FIDInceptionV3, variables: Mapping[str, Any],
                      mesh: jax.sharding.Mesh | None = None,
                      ) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """A jitted images → (pool3, logits) function with the weights bound.

  The weights are an argument of the jitted function rather than constants folded into it,
  so that the compiled program stays small; it compiles once per input shape.

  Args:
    module: from `load_inception`.
    variables: from `load_inception`.
    mesh: optional device mesh with an axis "data": the weights are replicated over it and
      each batch is split along it (zero-padded to a multiple of its size; the padding is
      cut from the outputs). Single-controller use: the images are one host array. None:
      the default device.

  Returns:
    fn(images) with images (N, H, W, 3) in [-1, 1], returning float32 (N, 2048), (N, 1008).
  """
  if mesh is None:
    device_variables = jax.device_put(variables)
    apply = jax.jit(module.apply)
    return lambda images: apply(device_variables, images)

  shards = sharding_lib.data_size(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  device_variables = jax.device_put(variables, replicated)
  apply = jax.jit(module.apply, out_shardings=batch_sharding)

  def sharded_inception_fn(images: Any) -> tuple[jax.Array, jax.Array]:
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    pad = -n % shards
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    pool3, logits = apply(device_variables, jax.device_put(images, batch_sharding))
    return (pool3[:n], logits[:n]) if pad else (pool3, logits)

  return sharded_inception_fn
