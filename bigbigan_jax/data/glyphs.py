"""Rendered letters: a second small labelled dataset, made on the spot, nothing downloaded.

The embedded digits are one kind of image. To see whether what works on them carries over,
this module renders another: ten capital letters (`LETTERS`) in the 21 text fonts that
matplotlib ships (DejaVu Sans, Sans Mono and Serif, STIX and Computer Modern, each in its
regular, bold and italic cuts where it has them), each image with its own font, size,
aspect, slant, rotation, stroke weight, shift and brightness, drawn bright on black at 64 px
and box-filtered down to 16 px (G's resolution in `configs/digits.py`). Letters such as E
and F, or B and R, differ by one stroke, so a class-conditional G has to draw the class
asked for, not only something letter-like.

`write_folder` lays the images out as a folder source reads them (`train/` and `test/`, one
sub-folder per letter), so `--config.data.source=folder --config.data.folder=DIR` trains on
them: `python -m bigbigan_jax.tools.glyphs --out=DIR` writes one. The images are a function
of (seed, split, index) and the font files: the same on every machine with the same
matplotlib and Pillow.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LETTERS = "ABCDEFGHKM"

# matplotlib's mpl-data/fonts/ttf files that hold the Latin capitals as text glyphs (not the
# symbol, math-extension and size-variant fonts beside them).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf")

SPLITS = {"train": (300, 0), "test": (60, 1)}  # Images per class, and the split's seed offset.

SIDE = 16  # The images' side.
_CANVAS = 64  # Drawn at 4x, then box-filtered down: anti-aliased strokes at every weight.


def font_paths() -> list[str]:
  """The fonts' files in matplotlib's data folder (ValueError if one is missing)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only to find its fonts)
  folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
  paths = [os.path.join(folder, name) for name in FONT_FILES]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise ValueError(f"the glyphs need matplotlib's bundled fonts; missing: {missing}. "
                     "Reinstall matplotlib (pip install --force-reinstall matplotlib).")
  return paths


def render(letter: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> np.ndarray:
  """One letter as a (SIDE, SIDE) uint8 image, with the variations drawn from `rng`."""
  stroke = int(rng.integers(0, 3))  # Extra stroke width at 64 px: 0, 1 or 2 (of a 4x canvas).
  big = Image.new("L", (2 * _CANVAS, 2 * _CANVAS), 0)
  ImageDraw.Draw(big).text((_CANVAS // 2, _CANVAS // 2), letter, fill=255, font=font,
                           stroke_width=stroke, stroke_fill=255)
  glyph = big.crop(big.getbbox())
  # Aspect, slant and rotation: each letter's shape stays, its proportions vary.
  width = max(1, int(round(glyph.width * rng.uniform(0.8, 1.2))))
  glyph = glyph.resize((width, glyph.height), Image.BICUBIC)
  shear = rng.uniform(-0.2, 0.2)
  pad = int(abs(shear) * glyph.height) + 1
  glyph = glyph.transform((glyph.width + 2 * pad, glyph.height), Image.AFFINE,
                          (1, shear, -pad - shear * glyph.height / 2, 0, 1, 0),
                          resample=Image.BICUBIC)
  glyph = glyph.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC, expand=True)
  glyph = glyph.crop(glyph.getbbox())
  # Fit the letter's height to 55-85% of the image (its width to at most 90%).
  height = rng.uniform(0.55, 0.85) * _CANVAS
  scale = min(height / glyph.height, 0.9 * _CANVAS / glyph.width)
  glyph = glyph.resize((max(1, int(round(glyph.width * scale))),
                        max(1, int(round(glyph.height * scale)))), Image.BICUBIC)
  room_x, room_y = _CANVAS - glyph.width, _CANVAS - glyph.height
  x = int(round(room_x / 2 + rng.uniform(-0.5, 0.5) * min(room_x, _CANVAS // 4)))
  y = int(round(room_y / 2 + rng.uniform(-0.5, 0.5) * min(room_y, _CANVAS // 4)))
  canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
  canvas.paste(glyph, (x, y))
  small = canvas.resize((SIDE, SIDE), Image.BOX)
  return (np.asarray(small, np.float32) * rng.uniform(0.75, 1.0)).round().astype(np.uint8)


def make(split: str, seed: int = 0, per_class: int | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, SIDE, SIDE) uint8, labels (N,) int32) of a split, class by class."""
  if split not in SPLITS:
    raise ValueError(f"the glyphs have no split {split!r}: use one of {sorted(SPLITS)}")
  count, offset = SPLITS[split]
  count = count if per_class is None else per_class
  fonts = [ImageFont.truetype(p, 2 * _CANVAS // 3) for p in font_paths()]
  images, labels = [], []
  for label, letter in enumerate(LETTERS):
    for i in range(count):
      rng = np.random.default_rng([seed, offset, label, i])
      images.append(render(letter, fonts[int(rng.integers(len(fonts)))], rng))
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32)


def write_folder(folder: str, seed: int = 0, per_class: int | None = None) -> dict[str, int]:
  """Writes every split as FOLDER/SPLIT/LETTER/NNNN.png; returns the image count per split."""
  counts = {}
  for split in SPLITS:
    images, labels = make(split, seed, per_class)
    for letter in LETTERS:
      os.makedirs(os.path.join(folder, split, letter), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image).save(os.path.join(folder, split, LETTERS[label], f"{i:04d}.png"))
    counts[split] = len(labels)
  return counts
