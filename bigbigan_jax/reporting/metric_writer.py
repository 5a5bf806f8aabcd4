"""Where training reports go: the console (progress, rate, ETA) and TensorBoard event files
in the workdir (scalars and image grids). Only process 0 writes.

Why not clu's metric writers, which the flax examples use: `clu.metric_writers` imports
tensorboard's hparams plugin, which subclasses `tf.keras.callbacks.Callback` at import. That
needs TensorFlow's Keras, which the entry points skip (`environment.py`: 3-5 s of every
process's start-up); with the skip in place the import fails outright ("Keras cannot be
imported"). The writer below is the same `tf.summary` calls clu's `SummaryWriter` makes.
clu's `ReportProgress` logs on a wall-clock period with the rate and ETA but no losses; the
console line here has both, once per `log_every_steps`, and leaves compiles and evaluations
out of the rate.
"""

from __future__ import annotations

import os
import time

from absl import logging
import numpy as np
import tensorflow as tf


class _LibraryInfoFilter:
  """Drops INFO records that libraries (orbax, jax, tfds) log through absl, keeping theirs
  at WARNING and above and all of ours: an orbax save alone logs ~40 INFO lines."""

  _OURS = os.sep + "bigbigan_jax" + os.sep

  def filter(self, record) -> bool:
    return record.levelno >= 30 or self._OURS in record.pathname  # 30: WARNING.


def quiet_library_logs():
  """Installs the filter on absl's console handler (entry points call this once)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def tensorboard_dir(config, workdir: str) -> str:
  """config.tensorboard_dir, or WORKDIR/tensorboard when that is empty."""
  return config.get("tensorboard_dir") or os.path.join(workdir, "tensorboard")


class MetricWriter:
  """TensorBoard scalars, images and text in `logdir` (through TensorFlow's filesystem, the
  one client that makes a flushed event file visible on GCS at once), and a console line."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled
    self._writer = None
    if enabled:
      self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: dict):
    if not self._writer:
      return
    with self._writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(name, float(value))

  def images(self, step: int, images: dict):
    """images: {name: uint8 (H, W, C) grid}."""
    if not self._writer:
      return
    with self._writer.as_default(step=step):
      for name, image in images.items():
        tf.summary.image(name, np.asarray(image)[None], max_outputs=1)

  def text(self, step: int, name: str, text: str):
    if not self._writer:
      return
    with self._writer.as_default(step=step):
      tf.summary.text(name, text)

  def flush(self):
    if self._writer:
      self._writer.flush()


class Progress:
  """Rate and ETA over the steps since the last report (compile time is left out)."""

  def __init__(self, first_step: int, last_step: int, examples_per_step: int):
    self.last_step = last_step
    self.examples_per_step = examples_per_step
    self._mark = (first_step, None)

  def start(self, step: int):
    """Call after the first (compiling) step finishes, to time from there."""
    self._mark = (step, time.perf_counter())

  def report(self, step: int, metrics: dict, keys=None) -> dict:
    """Logs one line and returns {"steps_per_sec", "examples_per_sec"} since the last call."""
    then_step, then = self._mark
    now = time.perf_counter()
    rates = {}
    if then is not None and step > then_step:
      steps_per_sec = (step - then_step) / (now - then)
      rates = {"steps_per_sec": steps_per_sec,
               "examples_per_sec": steps_per_sec * self.examples_per_step}
    self._mark = (step, now)
    shown = " ".join(f"{k} {float(metrics[k]):.4g}" for k in (keys or sorted(metrics)))
    line = f"step {step}/{self.last_step} | {shown}"
    if rates:
      eta = (self.last_step - step) / rates["steps_per_sec"]
      line += (f" | {rates['examples_per_sec']:.1f} img/s, "
               f"{1 / rates['steps_per_sec']:.3f} s/step | ETA {_duration(eta)}")
    logging.info(line)
    return rates
