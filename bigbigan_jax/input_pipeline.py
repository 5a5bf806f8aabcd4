"""Input pipeline: per-process batches of real images in [-1, 1], resumable at any step.

Three sources (`config.data.source`):

* "digits": scikit-learn's `load_digits` (1,797 8x8 grey digits that ship with the package; no
  download). Split "train" is the first 1,500 images, "validation"/"test" the last 297, "all"
  every image. Values 0..16 become 0..255 grey, copied to RGB: bright strokes on black, as MNIST.
* "folder": `config.data.folder` holds one sub-folder per class (label = index of the class
  folder in sorted order) or images directly (label 0). PNG, JPEG, BMP or GIF (first frame).
  Splits: split folders `train/` and `val/`, `validation/` or `test/`, each laid out as
  above, are the splits of those names ("validation" also reads `val/`, and the reverse).
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
point (see `_tfds_train_batches`).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DIGITS_NUM_TRAIN = 1500
DIGITS_SPLITS = ("train", "validation", "test", "all")
# The ResNet evaluation rule: crop the centre min_side * R / (R + CROP_PADDING) square.
CROP_PADDING = 32
STATE_VERSION = 1
# Salts keep the shuffle and augmentation streams independent of each other for one seed.
_SHUFFLE_SALT = 0x5EED
_AUGMENT_SALT = 0xA06
# What tf.data raises for an image that does not decode (and for a damaged TFRecord).
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError)
SKIP_HINT = "set --config.data.skip_corrupt=True to skip such {} with a warning"


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


# Importing the pipeline is the first TF use in the trainer, so hide devices right away.
hide_accelerators_from_tf()


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


# ---------------------------------------------------------------------------------------------
# Image preprocessing (pure TF, one example at a time).


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
      PNG/JPEG/BMP/GIF, "decoded" takes the image as it is.
    mode: the crop, see `crop_window`.
    resolution: R, the output side.
    seed: int [2] stateless seed; the crop and the flip use independent streams of it.
    flip: whether to flip horizontally with probability 1/2.

  Returns:
    float32 [R, R, 3] in [-1, 1].
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if kind == "jpeg":
    window = crop_window(tf.image.extract_jpeg_shape(data), mode, resolution, crop_seed)
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
  else:
    if kind == "encoded":
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
    elif kind == "decoded":
      image = _to_rgb(data)
    else:
      raise ValueError(f"Unknown image kind {kind!r}.")
    window = crop_window(tf.shape(image), mode, resolution, crop_seed)
    image = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])
  image = tf.image.resize(tf.cast(image, tf.float32), [resolution, resolution],
                          method="bicubic")
  # Bicubic overshoots near edges; clip so the output range is exactly [-1, 1].
  image = tf.clip_by_value(image, 0.0, 255.0)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = image / 127.5 - 1.0
  return tf.ensure_shape(image, [resolution, resolution, 3])


def _example_seed(seed: int, *values) -> tf.Tensor:
  """A stateless seed for one example, from the run's seed and the example's coordinates."""
  out = tf.constant([seed, _AUGMENT_SALT], tf.int64)
  for v in values:
    out = tf.random.experimental.stateless_fold_in(out, tf.cast(v, tf.int64))
  return out


# ---------------------------------------------------------------------------------------------
# The iterator the trainer holds.


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
    except DECODE_ERRORS as e:
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


def _finish(ds: tf.data.Dataset, local_batch: int, prefetch: int) -> Iterator[dict]:
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


# ---------------------------------------------------------------------------------------------
# Random-access sources: digits in memory, a folder of image files.


class _IndexedSource:
  """N examples that can be loaded by index inside a tf.data map."""

  def __init__(self, name: str, split: str, kind: str, data: np.ndarray, labels: np.ndarray,
               class_names: Optional[tuple[str, ...]] = None,
               ids: Optional[np.ndarray] = None):
    self.name = name
    self.split = split
    self.kind = kind  # "decoded" (data holds images) or "encoded" (data holds file paths).
    self.data = data
    self.labels = labels.astype(np.int32)
    self.class_names = class_names
    # What identifies each example across splits (file paths, or places in the dataset).
    self.ids = data if ids is None else ids

  def __len__(self) -> int:
    return len(self.labels)

  def loader(self) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    data = tf.constant(self.data)
    labels = tf.constant(self.labels)
    read = self.kind == "encoded"

    def load(index):
      item = tf.gather(data, index)
      return (tf.io.read_file(item) if read else item), tf.gather(labels, index)
    return load


def _digits_source(split: str) -> _IndexedSource:
  """scikit-learn's embedded digits, split into a fixed train/held-out part."""
  if split not in DIGITS_SPLITS:
    raise ValueError(
        f"The digits source has no split {split!r}: its splits are {', '.join(DIGITS_SPLITS)} "
        f"('train' = the first {DIGITS_NUM_TRAIN} images, 'validation' and 'test' = the rest). "
        "Set config.data.train_split / config.data.eval_split accordingly.")
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (only this source)
  digits = datasets.load_digits()
  images, labels = digits.images, digits.target
  part = {"train": slice(0, DIGITS_NUM_TRAIN), "validation": slice(DIGITS_NUM_TRAIN, None),
          "test": slice(DIGITS_NUM_TRAIN, None), "all": slice(None)}[split]
  grey = images[part] * (255.0 / 16.0)
  rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
  return _IndexedSource("digits", split, "decoded", rgb, labels[part],
                        tuple(str(i) for i in range(10)), ids=np.arange(len(labels))[part])


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


# Split folders a folder source recognises, and the split names each one answers to.
SPLIT_FOLDERS = {"train": ("train",), "val": ("validation", "val", "test"),
                 "validation": ("validation", "val", "test"), "test": ("test",)}
_SLICE_SEED = 0x511CE


def parse_split(split: str) -> tuple[str, Optional[str], Optional[str]]:
  """'train[10%:90%]' → ('train', '10%', '90%'); 'train' → ('train', None, None)."""
  split = split.strip()
  if "[" not in split:
    return split, None, None
  base, _, rest = split.partition("[")
  if not rest.endswith("]") or rest.count(":") != 1:
    raise ValueError(f"split {split!r} is not a split name with a slice like "
                     "'train[:90%]', 'train[90%:]' or 'train[:1000]'")
  start, _, stop = rest[:-1].partition(":")
  return base.strip(), start.strip() or None, stop.strip() or None


def _slice_bound(bound: Optional[str], n: int, split: str) -> Optional[int]:
  if bound is None:
    return None
  try:
    value = float(bound[:-1]) * n / 100 if bound.endswith("%") else int(bound)
  except ValueError:
    raise ValueError(f"split {split!r}: slice bound {bound!r} is neither an integer nor a "
                     "percentage like 90%") from None
  return int(round(value))


def _split_folder(folder: str, split: str) -> tuple[str, str]:
  """(the folder to list for `split`'s base name, a description for messages)."""
  base, _, _ = parse_split(split)
  present = {n.rstrip("/") for n in tf.io.gfile.listdir(folder)}
  present = {n for n in present if n in SPLIT_FOLDERS and tf.io.gfile.isdir(
      os.path.join(folder, n))}
  if not present:
    return folder, f"{folder} (one split: any split name reads all of it)"
  matches = [n for n in sorted(present) if base in SPLIT_FOLDERS[n]]
  # An exact name beats an alias: with val/ and test/ both present, "test" reads test/.
  matches.sort(key=lambda n: n != base)
  if not matches:
    raise ValueError(
        f"config.data.folder={folder!r} has the split folders {sorted(present)}, and none of "
        f"them is split {base!r}. Use one of those names (validation also reads val/ and "
        "test/), or a slice of one, e.g. 'train[90%:]'.")
  return os.path.join(folder, matches[0]), os.path.join(folder, matches[0])


def _folder_source(folder: str, split: str, skip_corrupt: bool = False) -> _IndexedSource:
  """Lists a class-per-sub-folder (or flat) image folder's split.

  Reads no image unless `skip_corrupt`: then every file of the split (after slicing, so a
  slice stays the same files less the corrupt ones) is decoded once, see `_without_corrupt`.
  """
  if not folder or not tf.io.gfile.isdir(folder):
    raise ValueError(
        f"config.data.folder={folder!r} does not exist or is not a folder. Point it at a "
        "folder with one sub-folder of images per class, or with the images directly in it.")
  root, where = _split_folder(folder, split or "train")
  source = _class_folder_source(root, split)
  _, start, stop = parse_split(split or "train")
  if start is None and stop is None:
    logging.info("Folder split %r reads %s.", split, where)
    return _without_corrupt(source) if skip_corrupt else source
  n = len(source)
  order = np.random.default_rng(_SLICE_SEED).permutation(n)
  keep = np.sort(order[_slice_bound(start, n, split):_slice_bound(stop, n, split)])
  if not keep.size:
    raise ValueError(f"split {split!r} of config.data.folder={folder!r} is empty: the slice "
                     f"selects none of its {n} images")
  logging.info("Folder split %r: %d of the %d images of %s.", split, keep.size, n, where)
  source = _IndexedSource(source.name, split, source.kind, source.data[keep],
                          source.labels[keep], source.class_names)
  return _without_corrupt(source) if skip_corrupt else source


def _class_folder_source(folder: str, split: str) -> _IndexedSource:
  """A class-per-sub-folder (or flat) folder of images as one source."""

  def images_in(path):
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(path))
    return sorted(os.path.join(path, n) for n in names if _is_image(n))

  entries = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(folder))
  # Only names without an image extension can be class folders; this spares an isdir call per
  # image on remote file systems.
  subdirs = [n for n in entries
             if not _is_image(n) and tf.io.gfile.isdir(os.path.join(folder, n))]
  classes, files, labels = [], [], []
  for name in subdirs:
    found = images_in(os.path.join(folder, name))
    if found:
      files += found
      labels += [len(classes)] * len(found)
      classes.append(name)
  top = images_in(folder)
  if classes and top:
    logging.warning("%s has class sub-folders; the %d images directly in it are ignored.",
                    folder, len(top))
  if not classes:
    files, labels = top, [0] * len(top)
  if not files:
    raise ValueError(
        f"config.data.folder={folder!r} has no images: expected files ending in "
        f"{', '.join(IMAGE_EXTENSIONS)} (any case), either in one sub-folder per class or "
        "directly in the folder.")
  return _IndexedSource(f"folder:{folder}", split, "encoded", np.array(files),
                        np.array(labels), tuple(classes) if classes else None)


def _epoch_permutation(n: int, seed: int, epoch) -> tf.Tensor:
  """int64 [n]: the order of epoch `epoch` of a random-access source (graph or eager)."""
  shuffle_seed = tf.constant([seed, _SHUFFLE_SALT], tf.int64)
  return tf.random.experimental.stateless_shuffle(
      tf.range(n, dtype=tf.int64),
      tf.random.experimental.stateless_fold_in(shuffle_seed, tf.cast(epoch, tf.int64)))


def _indexed_train_stream(source: _IndexedSource, *, seed: int, batch_size: int,
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
    image = preprocess_image(data, source.kind, mode=mode, resolution=resolution,
                             seed=_example_seed(seed, g), flip=flip)
    return {"image": image, "label": label}

  ds = tf.data.Dataset.range(start // n, np.iinfo(np.int64).max).flat_map(epoch)
  return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def _indexed_eval_stream(source: _IndexedSource, *, local: int, process_index: int,
                         process_count: int, start_step: int, num_batches: int, mode: str,
                         resolution: int) -> tf.data.Dataset:
  """This process's contiguous shard in order, padded to num_batches * local examples."""
  first, size = _even_shard(len(source), process_index, process_count)
  load = source.loader()

  def prepare(index):
    data, label = load(index)
    image = preprocess_image(data, source.kind, mode=mode, resolution=resolution,
                             seed=tf.zeros([2], tf.int64), flip=False)
    return {"image": image, "label": label, "mask": tf.constant(True)}

  ds = tf.data.Dataset.range(min(first + start_step * local, first + size), first + size)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(_pad_element(resolution)).repeat())
  return ds.take((num_batches - start_step) * local)


def _train_batch_indices(n: int, *, seed: int, batch_size: int, process_index: int,
                         process_count: int, step: int) -> np.ndarray:
  """The source indices of this process's training batch `step`, as `_indexed_train_stream`
  orders them (eager, one permutation per epoch the batch touches)."""
  local = batch_size // process_count
  g = step * batch_size + process_index * local + np.arange(local)
  indices = np.empty(local, np.int64)
  for e in np.unique(g // n):
    here = g // n == e
    indices[here] = _epoch_permutation(n, seed, int(e)).numpy()[g[here] % n]
  return indices


def _eval_batch_indices(n: int, *, local: int, process_index: int, process_count: int,
                        step: int) -> np.ndarray:
  """The source indices of the real examples of this process's evaluation batch `step`."""
  first, size = _even_shard(n, process_index, process_count)
  return np.arange(first + step * local, min(first + (step + 1) * local, first + size))


# ---------------------------------------------------------------------------------------------
# Images that fail to decode (config.data.skip_corrupt).


def _decode_shape(data: tf.Tensor) -> tf.Tensor:
  """Decodes an image file's bytes as `preprocess_image` does (kind "encoded"); its shape."""
  return tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False))


def _tf_message(error: Exception) -> str:
  """tf's error text on one line, without its function, node, op and iterator decorations."""
  text = re.sub(r"\{\{[^}]*\}\}", "", getattr(error, "message", None) or str(error))
  text = re.split(r"\[\[|\[Op:", text)[0]
  text = re.sub(r"^.*Iterator::\S+: ", "", text, flags=re.DOTALL)
  return " ".join(text.split())


def _decode_error(path: str) -> Optional[str]:
  """tf's message if the file at `path` does not decode, else None (eager, one file)."""
  try:
    _decode_shape(tf.io.read_file(path))
  except tf.errors.OpError as e:
    return _tf_message(e)
  return None


def _corrupt_files(paths: np.ndarray, what: str,
                   log_every_s: float = 30.0) -> list[tuple[str, str]]:
  """(path, tf's message) of each file of `paths` that does not decode, in `paths`' order.

  One parallel tf.data pass decodes every file and keeps the indices that succeed (failures
  are dropped by ignore_errors); each failure is decoded again eagerly for its message, and
  one that decodes the second time (a flaky read) counts as sound.
  """
  n = len(paths)
  if not n:
    return []
  files = tf.constant(paths)

  def check(i):
    return i, _decode_shape(tf.io.read_file(tf.gather(files, i)))

  ds = tf.data.Dataset.range(n).map(check, num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=False)
  decoded = np.zeros(n, bool)
  last = time.monotonic()
  for indices, _ in ds.ignore_errors().batch(256).as_numpy_iterator():
    decoded[indices] = True
    if time.monotonic() - last > log_every_s:
      last = time.monotonic()
      logging.info("Decoded %d of the %d images of %s.", decoded.sum(), n, what)
  found = ((str(paths[i]), _decode_error(paths[i])) for i in np.flatnonzero(~decoded))
  return [(path, message) for path, message in found if message is not None]


def _corrupt_message(bad: list[tuple[str, str]], what: str) -> str:
  """The ValueError text for undecodable files: each one, tf's reason, and the two fixes."""
  hint = SKIP_HINT.format("files")
  if len(bad) == 1:
    (path, message), = bad
    return f"{path} cannot be decoded ({message}): replace or delete it, or {hint}."
  listed = "\n".join(f"  {path} ({message})" for path, message in bad)
  return (f"{len(bad)} images of {what} cannot be decoded:\n{listed}\nReplace or delete "
          f"them, or {hint}.")


def _explain_file_error(source: _IndexedSource, indices: np.ndarray,
                        error: Exception) -> Exception:
  """The ValueError naming the files that broke a batch, or `error` if every file decodes.

  Looks among the failing batch's files (`indices`) first, and when they all decode (the
  batch could not be pinned down) over every file of the split, one parallel decode pass.
  """
  if source.kind != "encoded":
    return error
  what = f"{source.name}[{source.split}]"
  bad = _corrupt_files(source.data[np.unique(indices).astype(np.int64)], what)
  unchecked = (" The other files of the split were not checked: with skip_corrupt=True all "
               "of them are, once, at start-up.")
  if not bad:
    logging.warning("A batch of %s did not decode (%s), yet each of its files does; checking "
                    "all %d files of the split.", what, _tf_message(error), len(source))
    bad, unchecked = _corrupt_files(source.data, what), ""
  if not bad:
    return error
  return ValueError(_corrupt_message(bad, what) + unchecked)


def _without_corrupt(source: _IndexedSource) -> _IndexedSource:
  """`source` less the files that do not decode, listed in one warning.

  Costs one parallel decode pass over the split's files at start-up, in every process (they
  must agree on the file list): 300 ImageNet-sized JPEGs (500x375, 60 kB) took 0.3-0.8 s on
  2 busy CPU cores, 1-2.6 ms an image, so ImageNet's 1.28M would take roughly 3-7 minutes on
  16 cores, plus reading its ~140 GB. Dropping the files before the seeded permutation keeps
  the batches a function of (seed, step), so a resumed run sees exactly the uninterrupted
  run's batches as long as the files stay the same (the state records the number of
  examples, and a resume warns when it changed).
  """
  what = f"{source.name}[{source.split}]"
  start = time.monotonic()
  bad = _corrupt_files(source.data, what)
  logging.info("Decoded the %d images of %s in %.1f s to find corrupt ones "
               "(config.data.skip_corrupt=True).", len(source), what, time.monotonic() - start)
  if not bad:
    return source
  if len(bad) == len(source):
    raise ValueError(f"None of the {len(source)} images of {what} decodes, e.g. "
                     f"{bad[0][0]} ({bad[0][1]}).")
  logging.warning("Skipping %d of the %d images of %s that cannot be decoded "
                  "(config.data.skip_corrupt=True):\n%s", len(bad), len(source), what,
                  "\n".join(f"  {path} ({message})" for path, message in bad))
  keep = ~np.isin(source.data, [path for path, _ in bad])
  return _IndexedSource(source.name, source.split, source.kind, source.data[keep],
                        source.labels[keep], source.class_names)


def _explain_record_error(name: str, split: str, step: int, error: Exception) -> ValueError:
  """The ValueError for a tfds record that does not decode: the split and the two fixes."""
  return ValueError(
      f"tfds {name}[{split}] has a record that cannot be decoded in batch {step} of this "
      f"process ({_tf_message(error)}): rebuild the dataset with `tfds build {name}`, or "
      f"{SKIP_HINT.format('records')}.")


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets.


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder, or a ValueError that says what is missing; never downloads."""
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"tfds has no dataset {name!r} (config.data.name), neither registered nor prepared in "
        f"data_dir={data_dir or 'the tfds default'!r}. Check the name against "
        "tfds.list_builders() (e.g. 'imagenet2012', 'cifar10', 'mnist'), or use "
        "config.data.source='folder' or 'digits'.") from e


def _tfds_features(builder) -> tuple[str, Optional[str], str]:
  """(image key, label key or None, image kind) of a dataset's examples."""
  features = builder.info.features
  keys = builder.info.supervised_keys
  if (isinstance(keys, (tuple, list)) and len(keys) == 2
      and all(isinstance(k, str) for k in keys)):
    image_key, label_key = keys
  else:
    image_key, label_key = "image", "label"
  if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
    raise ValueError(f"tfds dataset {builder.name!r} has no image feature {image_key!r}; its "
                     f"features are {list(features.keys())}.")
  image = features[image_key]
  if image.np_dtype != np.uint8:
    raise ValueError(f"tfds dataset {builder.name!r} stores {image.np_dtype} images; the "
                     "pipeline reads uint8 images only.")
  if label_key not in features:
    label_key = None
  kind = "jpeg" if image.encoding_format == "jpeg" else "encoded"
  return image_key, label_key, kind


def _tfds_as_dataset(builder, split, **kwargs) -> tf.data.Dataset:
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError as e:  # What tfds raises for data that was never prepared.
    root = os.path.dirname(os.path.dirname(builder.data_dir))
    raise ValueError(
        f"tfds dataset {builder.name!r} is not prepared in {root!r}. This pipeline never "
        f"downloads: prepare it once, e.g. `tfds build {builder.name} --data_dir={root}` "
        "(imagenet2012 first needs the ILSVRC-2012 tar files in <data_dir>/downloads/manual), "
        "and set config.data.data_dir to that data_dir.") from e


def _tfds_size(ds: tf.data.Dataset, builder, split) -> int:
  size = int(ds.cardinality())
  if size < 0:  # Unknown cardinality: fall back on the metadata.
    size = builder.info.splits[split].num_examples
  return size


class _TfdsSource:
  """One tfds split, read through `split_for_jax_process` shards with images left encoded."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    name, data_dir = config.data.name, config.data.data_dir
    builder = _tfds_builder(name, data_dir)
    splits = builder.info.splits
    # Without metadata (tfds.testing.mock_data) split names cannot be checked in advance.
    if splits:
      try:
        splits[split]
      except (ValueError, KeyError) as e:
        raise ValueError(
            f"tfds dataset {name!r} has no split {split!r}: {e}. Its splits are "
            f"{sorted(splits.keys())}; set config.data.train_split / config.data.eval_split "
            "to one of them (slices such as 'train[:90%]' work too).") from e
    self.builder = builder
    self.name = name
    self.split = split
    self.image_key, self.label_key, self.kind = _tfds_features(builder)
    self.decoders = {self.image_key: tfds.decode.SkipDecoding()}
    self.num_examples = _tfds_size(_tfds_as_dataset(builder, split, decoders=self.decoders),
                                   builder, split)

  def shard(self, process_index: int, process_count: int, drop_remainder: bool):
    return tfds.split_for_jax_process(self.split, process_index=process_index,
                                      process_count=process_count,
                                      drop_remainder=drop_remainder)

  def read(self, split, **kwargs) -> tf.data.Dataset:
    """Examples as (encoded image, int32 label); other features are dropped early."""
    ds = _tfds_as_dataset(self.builder, split, decoders=self.decoders, **kwargs)
    image_key, label_key = self.image_key, self.label_key

    def select(ex):
      label = ex[label_key] if label_key else tf.constant(0)
      return ex[image_key], tf.cast(label, tf.int32)
    return ds.map(select)


def _epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int]:
  """Python-int seeds (file order, shuffle buffer) for one epoch of one process's shard."""
  words = np.random.SeedSequence(
      [seed % 2**32, _SHUFFLE_SALT, epoch, process_index]).generate_state(2)
  return int(words[0]), int(words[1])


def _tfds_train_batches(source: _TfdsSource, split, *, seed: int, local: int,
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
      image = preprocess_image(data, source.kind, mode=mode, resolution=resolution,
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
    for count, batch in enumerate(_finish(ds, local, prefetch), 1):
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


def _warn_of_skipped(batches: Iterator[dict], *, num_batches: int, expected: int,
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


def _tfds_eval_stream(source: _TfdsSource, split, *, local: int, start_step: int,
                      num_batches: int, mode: str, resolution: int,
                      skip_corrupt: bool = False) -> tf.data.Dataset:
  """This process's shard in order, padded; with `skip_corrupt`, records that fail to
  decode are dropped and the padding makes up for them (see `_warn_of_skipped`)."""
  ds = source.read(split, shuffle_files=False).skip(start_step * local)

  def prepare(data, label):
    image = preprocess_image(data, source.kind, mode=mode, resolution=resolution,
                             seed=tf.zeros([2], tf.int64), flip=False)
    return {"image": image, "label": label, "mask": tf.constant(True)}
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(_pad_element(resolution)).repeat())
  return ds.take((num_batches - start_step) * local)


# ---------------------------------------------------------------------------------------------
# Entry point.


def check_disjoint_splits(config: ml_collections.ConfigDict, train_split: str,
                          test_split: str, what: str) -> None:
  """Raises ValueError when two splits of config.data share examples (a probe trained and
  scored on the same images). Folders and digits are checked example by example; tfds
  splits only by name, since their records have no cheap identity."""
  data = config.data
  if data.source == "tfds":
    shared = (parse_split(train_split) == parse_split(test_split)
              or (train_split == test_split))
    count = "all"
  else:
    make = ((lambda s: _folder_source(data.folder, s)) if data.source == "folder"
            else _digits_source)
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
  resolution = image_resolution(config)
  seed = int(config.seed)
  batch_size = int(config.batch_size)
  if train:
    mode, flip = data.augment, bool(data.random_flip)
  else:
    mode, flip = ("none" if data.augment == "none" else "center"), False

  skip_corrupt = bool(data.skip_corrupt)
  if data.source == "tfds":
    source = _TfdsSource(config, split)
    name, class_names = f"tfds:{data.name}", None
  elif data.source == "folder":
    source = _folder_source(data.folder, split, skip_corrupt=skip_corrupt)
    name, class_names = source.name, source.class_names
  else:
    source = _digits_source(split)
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
    common["explain"] = lambda s, e: _explain_record_error(data.name, split, s, e)

  if not train:
    # Every process yields as many batches as the largest shard needs (shards differ by <= 1).
    per_process = -(-n // process_count)
    if data.source == "tfds":
      shard = source.shard(process_index, process_count, drop_remainder=False)
      own = _tfds_size(source.read(shard), source.builder, shard)
      per_process = max(per_process, own)  # mock_data ignores the shard and yields everything.
      num_batches = -(-per_process // local)
      ds = _tfds_eval_stream(source, shard, local=local, start_step=min(step, num_batches),
                             num_batches=num_batches, mode=mode, resolution=resolution,
                             skip_corrupt=skip_corrupt)
    else:
      num_batches = -(-per_process // local)
      ds = _indexed_eval_stream(source, local=local, process_index=process_index,
                                process_count=process_count,
                                start_step=min(step, num_batches), num_batches=num_batches,
                                mode=mode, resolution=resolution)
      common["explain"] = lambda s, e: _explain_file_error(source, _eval_batch_indices(
          n, local=local, process_index=process_index, process_count=process_count, step=s), e)
    batches = _finish(ds, local, data.prefetch)
    if data.source == "tfds" and skip_corrupt:
      start = min(step, num_batches) * local
      batches = _warn_of_skipped(batches, num_batches=num_batches - min(step, num_batches),
                                 expected=max(own - start, 0), what=f"tfds {data.name}[{split}]")
    logging.info("Eval input %s[%s]: %d examples, %d batches of %d per process, %dx%d.",
                 name, split, n, num_batches, local, resolution, resolution)
    return InputIterator(batches, num_batches=num_batches, steps_per_epoch=num_batches,
                         epoch_of_step=lambda s: 0, **common)

  if data.source == "tfds":
    shard = source.shard(process_index, process_count, drop_remainder=True)
    shard_size = _tfds_size(source.read(shard), source.builder, shard)
    steps_per_epoch = shard_size // local
    if steps_per_epoch < 1:
      raise ValueError(
          f"tfds {data.name}[{split}] gives each of the {process_count} processes "
          f"{shard_size} examples, fewer than one local batch of {local}. Lower "
          "config.batch_size or use a larger split.")
    batches = _tfds_train_batches(
        source, shard, seed=seed, local=local, steps_per_epoch=steps_per_epoch,
        shuffle_buffer=int(data.shuffle_buffer), process_index=process_index,
        start_step=step, mode=mode, flip=flip, resolution=resolution, prefetch=data.prefetch,
        skip_corrupt=skip_corrupt)
    epoch_of_step = lambda s: s // steps_per_epoch
  else:
    ds = _indexed_train_stream(source, seed=seed, batch_size=batch_size,
                               process_index=process_index, process_count=process_count,
                               start_step=step, mode=mode, flip=flip, resolution=resolution)
    batches = _finish(ds, local, data.prefetch)
    common["explain"] = lambda s, e: _explain_file_error(source, _train_batch_indices(
        n, seed=seed, batch_size=batch_size, process_index=process_index,
        process_count=process_count, step=s), e)
    steps_per_epoch = n / batch_size
    epoch_of_step = lambda s: s * batch_size // n
  logging.info("Train input %s[%s]: %d examples, batches of %d per process (%d processes), "
               "%dx%d, crop %s, flip %s, starting at step %d.", name, split, n, local,
               process_count, resolution, resolution, mode, flip, step)
  return InputIterator(batches, num_batches=None, steps_per_epoch=steps_per_epoch,
                       epoch_of_step=epoch_of_step, **common)
