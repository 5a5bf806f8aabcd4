"""Input pipeline: per-process batches of real images in [-1, 1], resumable at any step.

Three sources (`config.data.source`):

* "digits": scikit-learn's `load_digits` (1,797 8x8 grey digits that ship with the package; no
  download). Split "train" is the first 1,500 images, "validation"/"test" the last 297, "all"
  every image. Values 0..16 become 0..255 grey, copied to RGB: bright strokes on black, as MNIST.
* "folder": `config.data.folder` holds one sub-folder per class (label = index of the class
  folder in sorted order) or images directly (label 0). PNG, JPEG, BMP or GIF (first frame).
  Splits: split folders `train/` and `val/`, `validation/` or `test/`, each laid out as
  above, are the splits of those names; the held-out names stand in for each other
  ("validation" reads `test/` when there is no `validation/` or `val/`, and the reverse).
  A folder without split folders is one split that any name reads whole. Either way a
  tfds-style slice picks part of a split: `train[:90%]`, `train[90%:]`, `train[:1000]`;
  slices cut a fixed seeded permutation of the split's files, so every class is spread over
  both parts and two complementary slices never share a file.
* "tfds": any prepared tensorflow-datasets dataset (`config.data.name`, `config.data.data_dir`);
  nothing is ever downloaded or prepared here.

Every image is cropped (`config.data.augment`), resized with bicubic interpolation to R x R,
optionally flipped, and scaled to float32 [-1, 1]. R is E's input resolution for BigBiGAN
(E sees the full image; the trainer average-pools on device for D) and G/D's resolution for
BigGAN.

Order and resumption. The batch at a step is a deterministic function of (seed, step): all
randomness (shuffles, crops, flips) comes from stateless ops seeded by the example's place in
the stream, never from a hidden RNG that would have to be replayed. `get_state()` is
`{"step": n, ...}`; passing it back as `start_state` rebuilds the stream at step n:

* In-memory and folder sources (random access): epoch e is a seeded permutation of all N
  examples, and the epochs form one endless stream of global positions g. Global batch s is
  positions [s*B, (s+1)*B) (it may straddle two epochs, so no example is dropped and N < B
  works); process p takes the p-th slice of b = B/P of it. The P=1 batch is the
  concatenation of the P processes' batches, crops included. Resuming costs one permutation
  of N indices: no file is read.
* tfds (sequential files): each process reads its own `tfds.split_for_jax_process` shard.
  Epoch e reads it with a file order and a shuffle buffer seeded by (seed, e, process), then
  takes exactly `steps_per_epoch` batches, the same count on every process, so the state
  needs no per-process fields. Resuming at step n rebuilds epoch n // steps_per_epoch and
  skips the first (n % steps_per_epoch) * b records before they are decoded: the skipped
  records are still read from disk and pass through the shuffle buffer, so resuming costs at
  most one epoch of this process's shard of serialized bytes (ImageNet on 32 hosts: at most
  ~40k records, ~4.5 GB, and no JPEG decoding), never a replay from the start of training.

Evaluation (`train=False`) reads each process's contiguous shard in order, with the centre
crop and no flip. All processes yield the same number of batches (a collective on device
needs every process); the last batches are padded with zero images labelled 0, and a bool
"mask" key marks the real examples, so no example is dropped or counted twice.

Images that fail to decode (`config.data.skip_corrupt`). By default the batch that holds one
stops the iterator with a ValueError that names the file(s), found by decoding that batch's
files again one by one (tfds records have no file name: the error names the split). With
skip_corrupt=True a folder source decodes every file of its split once at start-up and leaves
out the failures before the seeded permutation, so batches stay a function of (seed, step) and
resumption is exact; tfds drops failing records as it reads them, which keeps every epoch's
batch count but shifts a resumed epoch's batches when a dropped record precedes the resume
point (see `tfds_train_batches`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from bigbigan_jax.data import preprocess
from bigbigan_jax.data import sources
from bigbigan_jax.data import streams

STATE_VERSION = 1


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs/TPUs so that all accelerator memory stays with JAX.

  Must run before TensorFlow executes its first op; later it is a no-op (with a warning if
  TensorFlow already holds a GPU).
  """
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      # TF is already initialised; only worth a word if it actually sees the device.
      if tf.config.get_visible_devices(kind):
        logging.warning("TensorFlow already initialised and sees a %s; it may hold its memory.",
                        kind)


def local_batch_size(batch_size: int, process_count: int) -> int:
  """The per-process share of the global batch.

  Args:
    batch_size: the global batch (`config.batch_size`).
    process_count: the number of processes (hosts).

  Returns:
    batch_size // process_count.

  Raises:
    ValueError: if the global batch does not split evenly.
  """
  if batch_size < 1 or batch_size % process_count:
    lower = max(process_count, batch_size // process_count * process_count)
    raise ValueError(
        f"config.batch_size={batch_size} is not divisible by the process count "
        f"{process_count}: every process must load the same number of examples per step. "
        f"Set config.batch_size to a multiple of {process_count} (e.g. {lower} or "
        f"{lower + process_count}).")
  return batch_size // process_count


class InputIterator:
  """Yields this process's batches as numpy dicts and reports where it is.

  Each batch is {"image": float32 [b, R, R, 3] in [-1, 1], "label": int32 [b]}, plus
  "mask": bool [b] in evaluation (False on padding). b = config.batch_size // process_count.

  Attributes:
    local_batch_size: b.
    resolution: R.
    num_batches: batches per process in evaluation; None for the endless training stream.
    num_examples: examples in the split, over all processes.
    steps_per_epoch: global batches per pass over the data (fractional for the random-access
      sources, whose batches may straddle epochs).
    class_names: class names of a folder source, else None.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], *, step: int,
               num_batches: Optional[int], meta: dict[str, Any],
               epoch_of_step: Callable[[int], int], local_batch_size: int, resolution: int,
               num_examples: int, steps_per_epoch: float,
               class_names: Optional[tuple[str, ...]] = None,
               explain: Optional[Callable[[int, Exception], Exception]] = None):
    self._batches = batches
    self._step = step
    # (step, tf's decode error) -> the error to raise instead (one that names the culprit).
    self._explain = explain
    self._meta = meta
    self._epoch_of_step = epoch_of_step
    self.num_batches = num_batches
    self.local_batch_size = local_batch_size
    self.resolution = resolution
    self.num_examples = num_examples
    self.steps_per_epoch = steps_per_epoch
    self.class_names = class_names

  def __iter__(self) -> "InputIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._step >= self.num_batches:
      raise StopIteration
    try:
      batch = next(self._batches)
    except sources.DECODE_ERRORS as e:
      explained = self._explain(self._step, e) if self._explain else e
      if explained is e:
        raise
      raise explained from None  # Its message carries tf's; tf's traceback names no file.
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position after the last batch returned, as a small JSON-serialisable dict.

    Returns:
      {"step": batches returned so far (counting from the start of the run), "epoch": the
      epoch the next batch comes from, and the settings the order depends on}. Batches held
      in the prefetch buffer are not counted, so nothing is skipped on resume.
    """
    return {"version": STATE_VERSION, "step": self._step,
            "epoch": int(self._epoch_of_step(self._step)), **self._meta}


def _start_step(start_state: Optional[dict[str, Any]], meta: dict[str, Any]) -> int:
  """Reads the step from a saved state, warning where the order it was saved under differs."""
  if start_state is None:
    return 0
  if isinstance(start_state, str):
    start_state = json.loads(start_state)
  step = start_state.get("step") if isinstance(start_state, dict) else None
  if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
    raise ValueError(f"start_state={start_state!r} is not an input pipeline state: it needs an "
                     "integer 'step' >= 0, as returned by InputIterator.get_state().")
  changed = {k: (start_state[k], v) for k, v in meta.items()
             if k in start_state and start_state[k] != v}
  if changed:
    logging.warning("Resuming the input pipeline at step %d with changed settings "
                     "(saved, now): %s. Batches will differ from the uninterrupted run.",
                     step, changed)
  return int(step)


def check_disjoint_splits(config: ml_collections.ConfigDict, train_split: str,
                          test_split: str, what: str) -> None:
  """Raises ValueError when two splits of config.data share examples (a probe trained and
  scored on the same images). Folders and digits are checked example by example; tfds
  splits only by name, since their records have no cheap identity."""
  data = config.data
  if data.source == "tfds":
    shared = (sources.parse_split(train_split) == sources.parse_split(test_split)
              or (train_split == test_split))
    count = "all"
  else:
    make = ((lambda s: sources.folder_source(data.folder, s)) if data.source == "folder"
            else sources.digits_source)
    a, b = make(train_split), make(test_split)
    count = np.intersect1d(a.ids, b.ids).size
    shared = count > 0
  if shared:
    hint = ("give the folder train/ and val/ sub-folders, or split one folder with slices: "
            "train_split='train[:90%]', test_split='train[90%:]'"
            if data.source == "folder" else "use two different splits")
    raise ValueError(
        f"{what}: the train split {train_split!r} and the test split {test_split!r} of "
        f"config.data share {count} examples, so the score would be measured on training "
        f"data. Set them to disjoint splits: {hint}.")


def create_input_iter(config: ml_collections.ConfigDict, *, split: Optional[str] = None,
                      train: bool = True, process_index: Optional[int] = None,
                      process_count: Optional[int] = None,
                      start_state: Optional[dict[str, Any]] = None) -> InputIterator:
  """Builds this process's iterator over batches of `config.data`.

  Args:
    config: the experiment config (uses data.*, batch_size, seed, model.kind,
      model.resolution, model.encoder.resolution).
    split: the split to read; None takes config.data.train_split (train) or
      config.data.eval_split (evaluation).
    train: True: endless stream, reshuffled every epoch, with config.data.augment and
      config.data.random_flip. False: one ordered pass with the centre crop (or resize only
      when config.data.augment is "none", so small images keep their full view) and a "mask".
    process_index: this process; defaults to jax.process_index().
    process_count: the number of processes; defaults to jax.process_count().
    start_state: a dict from `InputIterator.get_state()` (or its JSON string) to resume at;
      None starts at step 0.

  Returns:
    An InputIterator yielding {"image": float32 [b, R, R, 3] in [-1, 1], "label": int32 [b]}
    (and "mask": bool [b] when train=False), b = config.batch_size // process_count, R =
    `image_resolution(config)`.

  Raises:
    ValueError: for a batch size that does not split over the processes, a missing or empty
      folder, an unknown tfds dataset or split, a dataset that is not prepared, or a dataset
      too small for one batch per process. The iterator's `next` raises ValueError for an
      image that does not decode, naming the file (folders) or the split (tfds), unless
      config.data.skip_corrupt.
  """
  hide_accelerators_from_tf()
  data = config.data
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")
  local = local_batch_size(int(config.batch_size), process_count)
  if data.source not in ("digits", "folder", "tfds"):
    raise ValueError(f"config.data.source={data.source!r} is invalid: allowed values are "
                     "'tfds', 'digits', 'folder'.")
  if data.augment not in ("resnet", "center", "none"):
    raise ValueError(f"config.data.augment={data.augment!r} is invalid: allowed values are "
                     "'resnet', 'center', 'none'.")
  if split is None:
    split = data.train_split if train else data.eval_split
  resolution = preprocess.image_resolution(config)
  seed = int(config.seed)
  batch_size = int(config.batch_size)
  if train:
    mode, flip = data.augment, bool(data.random_flip)
  else:
    mode, flip = ("none" if data.augment == "none" else "center"), False

  skip_corrupt = bool(data.skip_corrupt)
  if data.source == "tfds":
    source = sources.TfdsSource(config, split)
    name, class_names = f"tfds:{data.name}", None
  elif data.source == "folder":
    source = sources.folder_source(data.folder, split, skip_corrupt=skip_corrupt)
    name, class_names = source.name, source.class_names
  else:
    source = sources.digits_source(split)
    name, class_names = source.name, source.class_names
  n = source.num_examples if data.source == "tfds" else len(source)

  meta = {"seed": seed, "batch_size": batch_size, "source": name, "split": split,
          "train": train}
  if data.source == "tfds":
    # Shards, hence the order, depend on the process count only for tfds.
    meta["process_count"] = process_count
  else:
    # The permutations depend on N, which skip_corrupt (or a changed folder) alters.
    meta["num_examples"] = n
  step = _start_step(start_state, meta)
  common = dict(step=step, meta=meta, local_batch_size=local, resolution=resolution,
                num_examples=n, class_names=class_names)
  if data.source == "tfds":
    common["explain"] = lambda s, e: sources.explain_record_error(data.name, split, s, e)

  if not train:
    # Every process yields as many batches as the largest shard needs (shards differ by <= 1).
    per_process = -(-n // process_count)
    if data.source == "tfds":
      shard = source.shard(process_index, process_count, drop_remainder=False)
      own = sources.tfds_size(source.read(shard), source.builder, shard)
      per_process = max(per_process, own)  # mock_data ignores the shard and yields everything.
      num_batches = -(-per_process // local)
      ds = streams.tfds_eval_stream(source, shard, local=local, start_step=min(step, num_batches),
                             num_batches=num_batches, mode=mode, resolution=resolution,
                             skip_corrupt=skip_corrupt)
    else:
      num_batches = -(-per_process // local)
      ds = streams.indexed_eval_stream(source, local=local, process_index=process_index,
                                process_count=process_count,
                                start_step=min(step, num_batches), num_batches=num_batches,
                                mode=mode, resolution=resolution)
      common["explain"] = lambda s, e: sources.explain_file_error(source, streams.eval_batch_indices(
          n, local=local, process_index=process_index, process_count=process_count, step=s), e)
    batches = streams.finish(ds, local, data.prefetch)
    if data.source == "tfds" and skip_corrupt:
      start = min(step, num_batches) * local
      batches = streams.warn_of_skipped(batches, num_batches=num_batches - min(step, num_batches),
                                 expected=max(own - start, 0), what=f"tfds {data.name}[{split}]")
    logging.info("Eval input %s[%s]: %d examples, %d batches of %d per process, %dx%d.",
                 name, split, n, num_batches, local, resolution, resolution)
    return InputIterator(batches, num_batches=num_batches, steps_per_epoch=num_batches,
                         epoch_of_step=lambda s: 0, **common)

  if data.source == "tfds":
    shard = source.shard(process_index, process_count, drop_remainder=True)
    shard_size = sources.tfds_size(source.read(shard), source.builder, shard)
    steps_per_epoch = shard_size // local
    if steps_per_epoch < 1:
      raise ValueError(
          f"tfds {data.name}[{split}] gives each of the {process_count} processes "
          f"{shard_size} examples, fewer than one local batch of {local}. Lower "
          "config.batch_size or use a larger split.")
    batches = streams.tfds_train_batches(
        source, shard, seed=seed, local=local, steps_per_epoch=steps_per_epoch,
        shuffle_buffer=int(data.shuffle_buffer), process_index=process_index,
        start_step=step, mode=mode, flip=flip, resolution=resolution, prefetch=data.prefetch,
        skip_corrupt=skip_corrupt)
    epoch_of_step = lambda s: s // steps_per_epoch
  else:
    ds = streams.indexed_train_stream(source, seed=seed, batch_size=batch_size,
                               process_index=process_index, process_count=process_count,
                               start_step=step, mode=mode, flip=flip, resolution=resolution)
    batches = streams.finish(ds, local, data.prefetch)
    common["explain"] = lambda s, e: sources.explain_file_error(source, streams.train_batch_indices(
        n, seed=seed, batch_size=batch_size, process_index=process_index,
        process_count=process_count, step=s), e)
    steps_per_epoch = n / batch_size
    epoch_of_step = lambda s: s * batch_size // n
  logging.info("Train input %s[%s]: %d examples, batches of %d per process (%d processes), "
               "%dx%d, crop %s, flip %s, starting at step %d.", name, split, n, local,
               process_count, resolution, resolution, mode, flip, step)
  return InputIterator(batches, num_batches=None, steps_per_epoch=steps_per_epoch,
                       epoch_of_step=epoch_of_step, **common)
