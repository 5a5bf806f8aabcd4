"""Image grids: [-1, 1] float batches to uint8 mosaics and PNG files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bigbigan_jax import storage


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats → [0, 255] uint8, clipping what G overshoots."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images, cols: int | None = None, pad: int = 1, pad_value: int = 255) -> np.ndarray:
  """Lays (N, H, W, C) images out row-major on a (rows, cols) grid with `pad` pixel gutters.

  Returns:
    uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, C).
  """
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, image in enumerate(images):
    r, k = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + k * (w + pad)
    out[top:top + h, left:left + w] = image
  return out


def interleave(a, b) -> np.ndarray:
  """[a0, b0, a1, b1, ...]: with an even column count, pairs sit side by side."""
  a, b = np.asarray(a), np.asarray(b)
  return np.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def save_png(path: str, image: np.ndarray) -> str:
  """Writes an (H, W, 3) uint8 image (or (H, W, 1) grey), creating parent folders.

  Goes through `storage`, so a workdir on gs:// works as a local one does.
  """
  image = image[..., 0] if image.shape[-1] == 1 else image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return storage.write_bytes(path, buffer.getvalue())
