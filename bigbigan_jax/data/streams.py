"""Per-host streams of batches: which examples each process reads at each step.

Train streams are endless and reshuffled every epoch from (seed, epoch); evaluation streams
read each example once, padded to whole batches. Both start at any step without reading the
steps before it, which is how a resumed run gets the same batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Iterator

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bigbigan_jax.data import preprocess
from bigbigan_jax.data import sources

# Salts keep the shuffle and augmentation streams independent of each other for one seed.
_SHUFFLE_SALT = 0x5EED

_AUGMENT_SALT = 0xA06


def _example_seed(seed: int, *values) -> tf.Tensor:
  """A stateless seed for one example, from the run's seed and the example's coordinates."""
  out = tf.constant([seed, _AUGMENT_SALT], tf.int64)
  for v in values:
    out = tf.random.experimental.stateless_fold_in(out, tf.cast(v, tf.int64))
  return out


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Deterministic order (resumption depends on it) with parallel, autotuned maps."""
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  # Ops inside a map run on one thread; tf.data parallelises across examples instead.
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def finish(ds: tf.data.Dataset, local_batch: int, prefetch: int) -> Iterator[dict]:
  ds = ds.batch(local_batch, drop_remainder=True)
  if prefetch > 0:
    ds = ds.prefetch(prefetch)
  return _options(ds).as_numpy_iterator()


def _pad_element(resolution: int) -> dict[str, tf.Tensor]:
  return {"image": tf.zeros([resolution, resolution, 3], tf.float32),
          "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}


def _even_shard(n: int, index: int, count: int) -> tuple[int, int]:
  """(start, size) of shard `index` of `count`: sizes differ by at most one, larger first."""
  base, extra = divmod(n, count)
  return index * base + min(index, extra), base + (index < extra)


def _epoch_permutation(n: int, seed: int, epoch) -> tf.Tensor:
  """int64 [n]: the order of epoch `epoch` of a random-access source (graph or eager)."""
  shuffle_seed = tf.constant([seed, _SHUFFLE_SALT], tf.int64)
  return tf.random.experimental.stateless_shuffle(
      tf.range(n, dtype=tf.int64),
      tf.random.experimental.stateless_fold_in(shuffle_seed, tf.cast(epoch, tf.int64)))


def indexed_train_stream(source: sources.IndexedSource, *, seed: int, batch_size: int,
                          process_index: int, process_count: int, start_step: int,
                          mode: str, flip: bool, resolution: int) -> tf.data.Dataset:
  """Endless per-example stream of this process's slots of the global batches."""
  n = len(source)
  local = batch_size // process_count
  start = start_step * batch_size  # Global position of the first example still to come.
  load = source.loader()

  def epoch(e):
    g = e * n + tf.range(n, dtype=tf.int64)
    perm = _epoch_permutation(n, seed, e)
    # Global batch s holds positions [s*B, (s+1)*B); process p owns its p-th slice of b.
    keep = tf.logical_and((g // local) % process_count == process_index, g >= start)
    return tf.data.Dataset.from_tensor_slices((tf.boolean_mask(perm, keep),
                                               tf.boolean_mask(g, keep)))

  def prepare(index, g):
    data, label = load(index)
    image = preprocess.preprocess_image(data, source.kind, mode=mode, resolution=resolution,
                             seed=_example_seed(seed, g), flip=flip)
    return {"image": image, "label": label}

  ds = tf.data.Dataset.range(start // n, np.iinfo(np.int64).max).flat_map(epoch)
  return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def indexed_eval_stream(source: sources.IndexedSource, *, local: int, process_index: int,
                         process_count: int, start_step: int, num_batches: int, mode: str,
                         resolution: int) -> tf.data.Dataset:
  """This process's contiguous shard in order, padded to num_batches * local examples."""
  first, size = _even_shard(len(source), process_index, process_count)
  load = source.loader()

  def prepare(index):
    data, label = load(index)
    image = preprocess.preprocess_image(data, source.kind, mode=mode, resolution=resolution,
                             seed=tf.zeros([2], tf.int64), flip=False)
    return {"image": image, "label": label, "mask": tf.constant(True)}

  ds = tf.data.Dataset.range(min(first + start_step * local, first + size), first + size)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(_pad_element(resolution)).repeat())
  return ds.take((num_batches - start_step) * local)


def train_batch_indices(n: int, *, seed: int, batch_size: int, process_index: int,
                         process_count: int, step: int) -> np.ndarray:
  """The source indices of this process's training batch `step`, as `indexed_train_stream`
  orders them (eager, one permutation per epoch the batch touches)."""
  local = batch_size // process_count
  g = step * batch_size + process_index * local + np.arange(local)
  indices = np.empty(local, np.int64)
  for e in np.unique(g // n):
    here = g // n == e
    indices[here] = _epoch_permutation(n, seed, int(e)).numpy()[g[here] % n]
  return indices


def eval_batch_indices(n: int, *, local: int, process_index: int, process_count: int,
                        step: int) -> np.ndarray:
  """The source indices of the real examples of this process's evaluation batch `step`."""
  first, size = _even_shard(n, process_index, process_count)
  return np.arange(first + step * local, min(first + (step + 1) * local, first + size))


def _epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int]:
  """Python-int seeds (file order, shuffle buffer) for one epoch of one process's shard."""
  words = np.random.SeedSequence(
      [seed % 2**32, _SHUFFLE_SALT, epoch, process_index]).generate_state(2)
  return int(words[0]), int(words[1])


def tfds_train_batches(source: sources.TfdsSource, split, *, seed: int, local: int,
                        steps_per_epoch: int, shuffle_buffer: int, process_index: int,
                        start_step: int, mode: str, flip: bool, resolution: int,
                        prefetch: int, skip_corrupt: bool = False) -> Iterator[dict]:
  """Endless batches, one freshly seeded tf.data pipeline per epoch.

  With `skip_corrupt`, records that fail to decode are dropped and the epoch is topped up
  from its own start, so it still yields steps_per_epoch batches and steps stay aligned with
  epochs; one warning per epoch counts them (tf's own per-record warnings are C++ logs, which
  the entry points hide). Resuming is then exact except inside an epoch where a dropped
  record precedes the resume point: the resumed run skips records before decoding them, so
  its batches of that epoch are shifted by the dropped records (later epochs are exact).
  """

  def records(epoch, skip_batches, top_up=False):
    file_seed, buffer_seed = _epoch_seeds(seed, epoch, process_index)
    ds = source.read(split, shuffle_files=True,
                     read_config=tfds.ReadConfig(shuffle_seed=file_seed))
    ds = ds.shuffle(shuffle_buffer, seed=buffer_seed, reshuffle_each_iteration=False)
    # Positions are numbered before the skip, so a resumed epoch reproduces the crops too.
    ds = ds.enumerate().skip(skip_batches * local)
    ds = ds.take((steps_per_epoch - skip_batches) * local)

    def prepare(i, example):
      data, label = example
      image = preprocess.preprocess_image(data, source.kind, mode=mode, resolution=resolution,
                               seed=_example_seed(seed, epoch, process_index, i), flip=flip)
      if not skip_corrupt:
        return {"image": image, "label": label}
      return {"image": image, "label": label, "top_up": tf.constant(top_up)}
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors(log_warning=True) if skip_corrupt else ds

  epoch, skip_batches = divmod(start_step, steps_per_epoch)
  while True:
    ds = records(epoch, skip_batches)
    if skip_corrupt:  # The top-up is only read when records were dropped.
      ds = ds.concatenate(records(epoch, 0, top_up=True))
      ds = ds.take((steps_per_epoch - skip_batches) * local)
    count = topped_up = 0
    for count, batch in enumerate(finish(ds, local, prefetch), 1):
      if skip_corrupt:
        topped_up += int(batch.pop("top_up").sum())
      yield batch
    if not count:
      raise ValueError(f"No record of tfds {source.name}[{source.split}] in epoch {epoch} of "
                       "this process decodes (config.data.skip_corrupt=True dropped them all).")
    if topped_up:
      logging.warning("tfds %s[%s], epoch %d of process %d: %d records did not decode and were "
                      "skipped (config.data.skip_corrupt=True); the epoch was topped up with "
                      "its first records. TF_CPP_MIN_LOG_LEVEL=0 shows tf's message for each.",
                      source.name, source.split, epoch, process_index, topped_up)
    epoch, skip_batches = epoch + 1, 0


def warn_of_skipped(batches: Iterator[dict], *, num_batches: int, expected: int,
                     what: str) -> Iterator[dict]:
  """Passes evaluation batches on and, with the last one, warns if fewer than `expected`
  real examples came (records that skip_corrupt dropped)."""
  seen = 0
  for i, batch in enumerate(batches, 1):
    seen += int(batch["mask"].sum())
    if i == num_batches and seen < expected:
      logging.warning("%s: %d of this process's %d records did not decode and were skipped "
                      "(config.data.skip_corrupt=True).", what, expected - seen, expected)
    yield batch


def tfds_eval_stream(source: sources.TfdsSource, split, *, local: int, start_step: int,
                      num_batches: int, mode: str, resolution: int,
                      skip_corrupt: bool = False) -> tf.data.Dataset:
  """This process's shard in order, padded; with `skip_corrupt`, records that fail to
  decode are dropped and the padding makes up for them (see `warn_of_skipped`)."""
  ds = source.read(split, shuffle_files=False).skip(start_step * local)

  def prepare(data, label):
    image = preprocess.preprocess_image(data, source.kind, mode=mode, resolution=resolution,
                             seed=tf.zeros([2], tf.int64), flip=False)
    return {"image": image, "label": label, "mask": tf.constant(True)}
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(_pad_element(resolution)).repeat())
  return ds.take((num_batches - start_step) * local)
