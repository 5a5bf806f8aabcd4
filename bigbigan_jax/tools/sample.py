r"""Writes PNG grids from a training workdir's checkpoint: samples, interpolations, reconstructions.

  python -m bigbigan_jax.tools.sample --workdir=/tmp/digits --num=64 --truncation=0.5 --out=grid.png
  python -m bigbigan_jax.tools.sample --workdir=/tmp/digits --interpolate=8 --num=6
  python -m bigbigan_jax.tools.sample --workdir=/tmp/digits --reconstruct=a.png,photos/
  python -m bigbigan_jax.tools.sample --workdir=/tmp/biggan --labels=3,7 --standing_stats=100

Samples use G's EMA weights (--use_ema=false: the trained ones) and the checkpoint's running
batch-norm statistics, or with --standing_stats=N statistics re-estimated from N batches of
G passes at the same truncation (the papers' evaluation). --interpolate=K draws --num pairs
of latents and writes one row of K images per pair, linear in z from one to the other.
--reconstruct=FILES (BigBiGAN) crops each image file to a centred square, resizes it to E's
input and writes real | G(E(x)) pairs (reals average-pooled to G's resolution, as D sees
them). Without --out the grid goes to WORKDIR/inference/. All logic lives in `run`, which
tests and notebooks can call; this file's `main` parses flags.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from bigbigan_jax import environment

FLAGS = flags.FLAGS


def define_flags():
  """Registers the command-line flags; called only when this module runs as a program."""
  flags.DEFINE_string(
      "workdir", None, "A training run's directory (local or gs://): it holds checkpoints/.")
  flags.DEFINE_integer("step", None, "The checkpoint's step; default: the newest.")
  flags.DEFINE_string(
      "out", None, "The PNG to write; default: WORKDIR/inference/<mode>_step<step>.png.")
  flags.DEFINE_integer(
      "num", 64, "Samples to draw, or with --interpolate the number of interpolation rows.")
  flags.DEFINE_float(
      "truncation", None, "Truncate z at this value t > 0; default: plain N(0, 1).")
  flags.DEFINE_enum(
      "truncation_method", None, ["resample", "scaled"],
      "'resample': N(0, 1) truncated to [-t, t] (BigGAN paper); 'scaled': t * "
      "truncated_normal[-2, 2] (TF-Hub colab). Default: the config's sample.truncation.")
  flags.DEFINE_integer("seed", 0, "Seed of the latents (and of random labels).")
  flags.DEFINE_string(
      "labels", None, "Class-conditional BigGAN: comma-separated class ids, repeated over the "
      "samples (or rows), or 'random'. Default: classes in order, 0, 1, 2, ...")
  flags.DEFINE_integer(
      "standing_stats", 0, "Re-estimate G's batch-norm statistics from this many batches of G "
      "passes (at --truncation) before sampling; 0 keeps the checkpoint's running statistics.")
  flags.DEFINE_integer(
      "interpolate", 0, "Write --num rows of this many images, linear in z between two draws.")
  flags.DEFINE_string(
      "reconstruct", None, "BigBiGAN: comma-separated image files and/or folders of images to "
      "encode and regenerate, written as real | reconstruction pairs.")
  flags.DEFINE_bool(
      "use_mean", False, "Reconstruct from E's z_mean instead of a z_sample.")
  flags.DEFINE_bool("use_ema", True, "Use G's EMA weights (what the papers evaluate).")
  flags.DEFINE_integer(
      "batch_size", 64, "Examples per device call, and latents per standing-statistics pass.")


def _grid_cols(num: int) -> int:
  return int(math.ceil(math.sqrt(num)))


def parse_labels(spec: str | None, num: int, num_classes: int, seed: int) -> np.ndarray | None:
  """--labels → `num` class ids, or None for an unconditional G.

  Raises:
    ValueError: labels given for an unconditional G, or ids that are not classes.
  """
  if not num_classes:
    if spec:
      raise ValueError("--labels is for class-conditional BigGAN; this checkpoint's G is "
                       "unconditional: drop --labels")
    return None
  if not spec:
    return np.arange(num) % num_classes
  if spec == "random":
    return np.random.default_rng(seed).integers(0, num_classes, num)
  try:
    ids = [int(part) for part in spec.split(",") if part.strip()]
  except ValueError:
    ids = []
  if not ids or min(ids) < 0 or max(ids) >= num_classes:
    raise ValueError(f"--labels={spec!r} is invalid: give comma-separated class ids in "
                     f"[0, {num_classes}), or 'random'")
  return np.resize(np.asarray(ids), num)


def run(workdir: str, *, out: str | None = None, step: int | None = None, num: int = 64,
        truncation: float | None = None, truncation_method: str | None = None, seed: int = 0,
        labels: str | None = None, standing_stats: int = 0, interpolate: int = 0,
        reconstruct: str | None = None, use_mean: bool = False, use_ema: bool = True,
        batch_size: int = 64) -> str:
  """Writes one PNG grid (samples, an interpolation or reconstructions); see the flags.

  Every check on the arguments, the workdir and the image files runs before anything is
  restored or compiled.

  Returns:
    The path of the PNG written.

  Raises:
    FileNotFoundError: no checkpoint in the workdir, or a missing image file.
    ValueError: any other bad argument; the message names the fix.
  """
  from bigbigan_jax import inference  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.models import networks  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.reporting import images as images_lib  # pylint: disable=g-import-not-at-top

  if interpolate and reconstruct:
    raise ValueError("--interpolate and --reconstruct write different grids: give one of them")
  if num < 1:
    raise ValueError(f"--num={num} must be at least 1")
  if interpolate < 0 or interpolate == 1:
    raise ValueError(f"--interpolate={interpolate} needs at least 2 steps (both ends)")
  if standing_stats < 0 or batch_size < 1:
    raise ValueError("--standing_stats and --batch_size must not be negative")
  step, config = inference.read_config(workdir, step)
  method = truncation_method or config.sample.truncation
  inference.check_truncation(truncation, method)
  num_classes = config.model.num_classes if config.model.kind == "biggan" else 0
  reals = None
  if reconstruct:
    if config.model.kind != "bigbigan":
      raise ValueError(f"--reconstruct needs an encoder, and {workdir} holds a BigGAN (no E): "
                       "use a BigBiGAN workdir, or drop --reconstruct to sample")
    paths = [p.strip() for p in reconstruct.split(",") if p.strip()]
    reals = inference.load_images(paths, config.model.encoder.resolution)
  rows = num
  class_ids = parse_labels(labels, rows, num_classes, seed)
  mode = "reconstructions" if reconstruct else "interpolation" if interpolate else "samples"
  out = out or os.path.join(workdir, "inference", f"{mode}_step{step}.png")

  model = inference.load(workdir, step, use_ema=use_ema, batch_size=batch_size)
  if standing_stats:
    logging.info("Standing statistics from %d batches of %d.", standing_stats, batch_size)
    model.standing_stats(standing_stats, batch_size, truncation, method, seed)

  if reconstruct:
    recon = model.reconstruct(reals, use_sample=not use_mean, seed=seed)
    pooled = np.asarray(networks.pool_for_discriminator(reals, model.resolution))
    cols = 2 * _grid_cols(len(reals) / 2)
    grid = images_lib.grid(images_lib.interleave(pooled, recon), cols)
  elif interpolate:
    ends = inference.sample_z(seed, 2 * rows, model.z_dim, truncation, method)
    alphas = np.linspace(0.0, 1.0, interpolate, dtype=np.float32)[None, :, None]
    z = (1 - alphas) * ends[:rows, None] + alphas * ends[rows:, None]  # (rows, K, z_dim)
    row_labels = None if class_ids is None else np.repeat(class_ids, interpolate)
    images = model.generate(z.reshape(rows * interpolate, -1), row_labels)
    grid = images_lib.grid(images, interpolate)
  else:
    z = inference.sample_z(seed, rows, model.z_dim, truncation, method)
    grid = images_lib.grid(model.generate(z, class_ids), _grid_cols(rows))
  return images_lib.save_png(out, grid)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Deferred so that TensorFlow (used for file access) sees no accelerator.
  from bigbigan_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.reporting import metric_writer  # pylint: disable=g-import-not-at-top
  pipeline.hide_accelerators_from_tf()
  metric_writer.quiet_library_logs()
  try:
    path = run(FLAGS.workdir, out=FLAGS.out, step=FLAGS.step, num=FLAGS.num,
               truncation=FLAGS.truncation, truncation_method=FLAGS.truncation_method, seed=FLAGS.seed,
               labels=FLAGS.labels, standing_stats=FLAGS.standing_stats,
               interpolate=FLAGS.interpolate, reconstruct=FLAGS.reconstruct,
               use_mean=FLAGS.use_mean, use_ema=FLAGS.use_ema, batch_size=FLAGS.batch_size)
  except (ValueError, FileNotFoundError) as error:
    # Bad input ends with the message alone: it names the problem and the fix.
    logging.error("%s", error)
    sys.exit(f"error: {error}")
  print(path)


if __name__ == "__main__":
  environment.set_entry_point_defaults()
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
