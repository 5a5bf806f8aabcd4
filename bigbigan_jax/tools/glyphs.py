r"""Writes the rendered-letters dataset (bigbigan_jax/data/glyphs.py) as an image folder.

  python -m bigbigan_jax.tools.glyphs --out=/tmp/glyphs
  python -m bigbigan_jax.main --config=configs/digits.py:biggan --workdir=/tmp/biggan_glyphs \
      --config.data.source=folder --config.data.folder=/tmp/glyphs

Ten letters, 300 training and 60 test images each, 16x16 grey PNGs in OUT/train/LETTER/ and
OUT/test/LETTER/ (a few seconds). The same images on every machine for the same --seed.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("out", None, "The folder to write (must not hold a train/ or test/).")
  flags.DEFINE_integer("seed", 0, "Which draw of fonts, sizes, slants and shifts.")
  flags.DEFINE_integer("per_class", None, "Images per letter and split; default 300 train, "
                       "60 test.")
  flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigbigan_jax.data import glyphs  # pylint: disable=g-import-not-at-top
  taken = [s for s in glyphs.SPLITS if os.path.exists(os.path.join(FLAGS.out, s))]
  if taken:
    sys.exit(f"error: {FLAGS.out} already holds {', '.join(taken)}/: choose an empty --out.")
  if FLAGS.per_class is not None and FLAGS.per_class < 1:
    sys.exit(f"error: --per_class={FLAGS.per_class}: it must be at least 1.")
  counts = glyphs.write_folder(FLAGS.out, FLAGS.seed, FLAGS.per_class)
  print(f"{len(glyphs.LETTERS)} letters ({glyphs.LETTERS}): "
        + ", ".join(f"{n} {s} images" for s, n in counts.items()) + f" in {FLAGS.out}.")
  print(f"Train on them with --config.data.source=folder --config.data.folder={FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
