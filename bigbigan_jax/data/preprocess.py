"""Image preprocessing in tf.data: decoding, crops, resizing, flips, scaling to [-1, 1].

Training: ResNet's random resized crop (`augment="resnet"`), bicubic resize to E's resolution,
random flip. Evaluation: the centre crop with ResNet's 32-pixel padding rule. Every random
choice is seeded per example from (seed, epoch, index), so a batch is a function of the step.
"""

from __future__ import annotations

from typing import Optional

import ml_collections
import tensorflow as tf

# The ResNet evaluation rule: crop the centre min_side * R / (R + CROP_PADDING) square.
CROP_PADDING = 32


def image_resolution(config: ml_collections.ConfigDict) -> int:
  """The side R of the images the pipeline yields.

  Args:
    config: the experiment config.

  Returns:
    `model.encoder.resolution` for BigBiGAN (E sees the full image, D an average-pooled
    copy), else `model.resolution`.
  """
  if config.model.kind == "bigbigan":
    return int(config.model.encoder.resolution)
  return int(config.model.resolution)


def _center_window(height, width, resolution: int):
  """The ResNet evaluation crop: a centred square of min_side * R / (R + 32)."""
  min_side = tf.cast(tf.minimum(height, width), tf.float32)
  size = tf.cast(min_side * (resolution / (resolution + CROP_PADDING)), tf.int32)
  size = tf.maximum(size, 1)
  return tf.stack([(height - size + 1) // 2, (width - size + 1) // 2, size, size])


def crop_window(shape: tf.Tensor, mode: str, resolution: int,
                seed: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Where to crop an image before it is resized to R x R.

  Args:
    shape: int32 [3], the image's (height, width, channels).
    mode: "resnet" (random area/aspect crop), "center" (padded centre crop) or "none".
    resolution: R, the output side; the centre crop's size depends on it.
    seed: int [2], the stateless seed of the "resnet" crop.

  Returns:
    int32 [4]: offset_y, offset_x, height, width, always inside the image.
  """
  shape = tf.cast(shape, tf.int32)
  height, width = shape[0], shape[1]
  if mode == "none":
    return tf.stack([0, 0, height, width])
  center = _center_window(height, width, resolution)
  if mode == "center":
    return center
  if mode != "resnet":
    raise ValueError(f"Unknown crop mode {mode!r}; expected 'resnet', 'center' or 'none'.")
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  # After 10 failed attempts the op returns the whole image; ResNet falls back to the centre.
  failed = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
  sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
  return tf.where(failed, center, sampled)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Grey gets copied into three channels and alpha dropped (static channel count)."""
  channels = image.shape[-1]
  if channels == 1:
    return tf.tile(image, [1, 1, 3])
  if channels == 4:
    return image[..., :3]
  return image


def preprocess_image(data: tf.Tensor, kind: str, *, mode: str, resolution: int,
                     seed: tf.Tensor, flip: bool) -> tf.Tensor:
  """Decodes, crops, resizes (bicubic), maybe flips and scales one image to [-1, 1].

  Args:
    data: the encoded bytes (kind "jpeg" or "encoded") or a decoded [H, W, C] image with
      values in [0, 255] (kind "decoded").
    kind: "jpeg" decodes only the crop window (fast for large JPEGs), "encoded" decodes any
      PNG/JPEG/BMP/GIF (JPEGs, found by their header, take the "jpeg" path), "decoded" takes
      the image as it is.
    mode: the crop, see `crop_window`.
    resolution: R, the output side.
    seed: int [2] stateless seed; the crop and the flip use independent streams of it.
    flip: whether to flip horizontally with probability 1/2.

  Returns:
    float32 [R, R, 3] in [-1, 1].
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def decode_crop_jpeg():
    window = crop_window(tf.image.extract_jpeg_shape(data), mode, resolution, crop_seed)
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def crop(image):
    window = crop_window(tf.shape(image), mode, resolution, crop_seed)
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

  if kind == "jpeg":
    image = decode_crop_jpeg()
  elif kind == "encoded":
    # Decoding only the window is faster on photos (1.15x at 256 px, `benchmark
    # --input_pipeline`), and gives the same pixels except along
    # a window edge at an odd offset, where chroma upsampling differs by a few levels.
    image = tf.cond(tf.io.is_jpeg(data), decode_crop_jpeg, lambda: crop(
        tf.io.decode_image(data, channels=3, expand_animations=False)))
  elif kind == "decoded":
    image = crop(_to_rgb(data))
  else:
    raise ValueError(f"Unknown image kind {kind!r}.")
  image = tf.image.resize(tf.cast(image, tf.float32), [resolution, resolution],
                          method="bicubic")
  # Bicubic overshoots near edges; clip so the output range is exactly [-1, 1].
  image = tf.clip_by_value(image, 0.0, 255.0)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = image / 127.5 - 1.0
  return tf.ensure_shape(image, [resolution, resolution, 3])

