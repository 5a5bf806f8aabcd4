"""Where images come from: the embedded digits, a folder of images, or tensorflow-datasets.

Digits and folders are indexed sources (every example has an id, so splits can be checked for
overlap and shuffled by index); tfds datasets are read record by record. Images that fail to
decode are named in the error, or skipped with `data.skip_corrupt=True`.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Optional

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

DIGITS_NUM_TRAIN = 1500

DIGITS_SPLITS = ("train", "validation", "test", "all")

# What tf.data raises for an image that does not decode (and for a damaged TFRecord).
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError)

SKIP_HINT = "set --config.data.skip_corrupt=True to skip such {} with a warning"


class IndexedSource:
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


def digits_source(split: str) -> IndexedSource:
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
  return IndexedSource("digits", split, "decoded", rgb, labels[part],
                        tuple(str(i) for i in range(10)), ids=np.arange(len(labels))[part])


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


# Split folders a folder source recognises, and the split names each one answers to.
SPLIT_FOLDERS = {"train": ("train",), "val": ("validation", "val", "test"),
                 "validation": ("validation", "val", "test"),
                 "test": ("test", "validation", "val")}

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
  # An exact name beats an alias, and val/ beats test/ as "validation": with val/ and test/
  # both present, "test" reads test/ and "validation" reads val/.
  matches.sort(key=lambda n: (n != base, n == "test"))
  if not matches:
    raise ValueError(
        f"config.data.folder={folder!r} has the split folders {sorted(present)}, and none of "
        f"them is split {base!r}. Use one of those names (validation also reads val/ and "
        "test/), or a slice of one, e.g. 'train[90%:]'.")
  return os.path.join(folder, matches[0]), os.path.join(folder, matches[0])


def folder_source(folder: str, split: str, skip_corrupt: bool = False) -> IndexedSource:
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
  source = IndexedSource(source.name, split, source.kind, source.data[keep],
                          source.labels[keep], source.class_names)
  return _without_corrupt(source) if skip_corrupt else source


def _class_folder_source(folder: str, split: str) -> IndexedSource:
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
  return IndexedSource(f"folder:{folder}", split, "encoded", np.array(files),
                        np.array(labels), tuple(classes) if classes else None)


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


def explain_file_error(source: IndexedSource, indices: np.ndarray,
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


def _without_corrupt(source: IndexedSource) -> IndexedSource:
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
  return IndexedSource(source.name, source.split, source.kind, source.data[keep],
                        source.labels[keep], source.class_names)


def explain_record_error(name: str, split: str, step: int, error: Exception) -> ValueError:
  """The ValueError for a tfds record that does not decode: the split and the two fixes."""
  return ValueError(
      f"tfds {name}[{split}] has a record that cannot be decoded in batch {step} of this "
      f"process ({_tf_message(error)}): rebuild the dataset with `tfds build {name}`, or "
      f"{SKIP_HINT.format('records')}.")


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


def tfds_size(ds: tf.data.Dataset, builder, split) -> int:
  size = int(ds.cardinality())
  if size < 0:  # Unknown cardinality: fall back on the metadata.
    size = builder.info.splits[split].num_examples
  return size


class TfdsSource:
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
    self.num_examples = tfds_size(_tfds_as_dataset(builder, split, decoders=self.decoders),
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
