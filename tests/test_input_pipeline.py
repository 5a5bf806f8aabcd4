"""Tests of the input pipeline on data the tests make themselves (nothing is downloaded)."""

import io
import json
import logging
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest
from sklearn import datasets
import tensorflow as tf
import tensorflow_datasets as tfds

from bigbigan_jax import config as config_lib
from bigbigan_jax.data import pipeline
from bigbigan_jax.data import preprocess
from bigbigan_jax.data import sources
from bigbigan_jax.data import streams
from bigbigan_jax.tools import benchmark

TINY_TRAIN, TINY_TEST = 41, 11


class BigbiganTestTiny(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset written to a temporary data_dir; label = example index, to trace examples."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(24, 20, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=64),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples(TINY_TRAIN, 0),
            "test": self._generate_examples(TINY_TEST, 1)}

  def _generate_examples(self, n, salt):
    rng = np.random.default_rng(salt)
    for i in range(n):
      yield i, {"image": rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), "label": i}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  BigbiganTestTiny(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """12 PNGs in two class folders, in several sizes and modes (RGB, grey, RGBA)."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for c, name in enumerate(["cat", "dog"]):
    (root / name).mkdir()
    for i in range(6):
      h, w = 20 + 4 * i, 28 - 2 * i
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      image = Image.fromarray(pixels)
      image = image.convert(["RGB", "L", "RGBA"][(i + c) % 3])
      image.save(root / name / f"{i}.png")
  return str(root)


def make_config(**data):
  c = config_lib.base_config()
  c.model.kind = "bigbigan"
  c.model.resolution = 32
  c.model.encoder.resolution = 32
  c.batch_size = 8
  c.data.source = "digits"
  c.data.prefetch = 1
  c.data.shuffle_buffer = 64
  for k, v in data.items():
    c.data[k] = v
  return c


def take(config, n, **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  it = pipeline.create_input_iter(config, **kwargs)
  return it, [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def check_batch(batch, local, res, mask=False):
  assert set(batch) == ({"image", "label", "mask"} if mask else {"image", "label"})
  assert batch["image"].shape == (local, res, res, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (local,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  if mask:
    assert batch["mask"].shape == (local,) and batch["mask"].dtype == bool


def test_digits_look_like_the_sklearn_digits():
  # BigBiGAN: E's resolution (64), not G's (32).
  c = make_config(augment="none", random_flip=False)
  c.model.encoder.resolution = 64
  it, [batch] = take(c, 1, train=False, split="train")
  check_batch(batch, 8, 64, mask=True)
  assert batch["mask"].all()
  digits = datasets.load_digits()
  np.testing.assert_array_equal(batch["label"], digits.target[:8])
  # Back to 8x8 by block averages, the bicubic upscale must match the originals closely.
  small = batch["image"].reshape(8, 8, 8, 8, 8, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(small[..., 0], small[..., 2])  # Grey copied to RGB.
  for got, want in zip(small[..., 0], digits.images[:8]):
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
  assert it.num_examples == 1500 and it.class_names == tuple("0123456789")


def test_digits_train_stream_and_biggan_resolution():
  c = make_config(augment="resnet", random_flip=True)
  c.model.kind = "biggan"
  c.model.encoder.resolution = 64  # Ignored by BigGAN.
  it, batches = take(c, 2)
  for b in batches:
    check_batch(b, 8, 32)
    assert set(b["label"]) <= set(range(10))
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state and state["step"] == 2


def test_digits_eval_pads_with_mask():
  c = make_config(augment="center")
  c.batch_size = 16
  got = {}
  for p in range(2):
    it = pipeline.create_input_iter(c, train=False, split="test", process_index=p,
                                          process_count=2)
    batches = list(it)
    assert len(batches) == it.num_batches == 19  # ceil(ceil(297 / 2) / 8)
    check_batch(batches[-1], 8, 32, mask=True)
    got[p] = sum(int(b["mask"].sum()) for b in batches)
    assert not batches[-1]["image"][~batches[-1]["mask"]].any()  # Padding is zeros.
  assert got == {0: 149, 1: 148}


def test_seed_determinism():
  c = make_config(augment="resnet", random_flip=True)
  _, a = take(c, 2)
  _, b = take(c, 2)
  assert_batches_equal(a, b)
  c.seed = 1
  _, d = take(c, 2)
  assert not np.array_equal(a[0]["image"], d[0]["image"])


def test_folder_source(image_folder):
  c = make_config(source="folder", folder=image_folder, augment="resnet")
  it, batches = take(c, 3)
  for b in batches:
    check_batch(b, 8, 32)
  assert it.class_names == ("cat", "dog") and it.num_examples == 12
  # 3 batches of 8 = two full passes over the 12 images: each label 12 times in all.
  labels = np.concatenate([b["label"] for b in batches])
  assert np.bincount(labels).tolist() == [12, 12]


def test_folder_without_class_folders_is_label_zero(tmp_path):
  for i in range(3):
    Image.fromarray(np.full((9, 7, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.JPG")
  c = make_config(source="folder", folder=str(tmp_path), augment="none", random_flip=False)
  it, [b] = take(c, 1, train=False)
  check_batch(b, 8, 32, mask=True)
  assert it.class_names is None and b["label"].tolist() == [0] * 8
  assert b["mask"].tolist() == [True] * 3 + [False] * 5


def test_folder_resume_across_epochs(image_folder):
  # 12 images, batch 8: step 2 starts 4 images into the second epoch.
  c = make_config(source="folder", folder=image_folder, augment="resnet", random_flip=True)
  _, straight = take(c, 5)
  it, first = take(c, 2)
  state = json.loads(json.dumps(it.get_state()))
  assert state["epoch"] == 1
  _, rest = take(c, 3, start_state=state)
  assert_batches_equal(straight, first + rest)


def test_process_split_matches_the_single_process_batch(image_folder):
  c = make_config(source="folder", folder=image_folder, augment="resnet", random_flip=True)
  _, whole = take(c, 3)
  _, p0 = take(c, 3, process_index=0, process_count=2)
  _, p1 = take(c, 3, process_index=1, process_count=2)
  for w, a, b in zip(whole, p0, p1):
    check_batch(a, 4, 32)
    for k in w:
      np.testing.assert_array_equal(w[k], np.concatenate([a[k], b[k]]))


def test_tfds_source_with_mock_data():
  c = make_config(source="tfds", name="mnist", train_split="train", eval_split="test")
  c.model.kind = "biggan"
  with tfds.testing.mock_data(num_examples=20):
    _, batches = take(c, 3)
    for b in batches:
      check_batch(b, 8, 32)
      assert b["label"].max() < 10
      np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 1])  # Grey to RGB.
    it = pipeline.create_input_iter(c, train=False, process_index=0, process_count=1)
    evals = list(it)
  assert len(evals) == 3 and sum(int(b["mask"].sum()) for b in evals) == 20


def test_tfds_resume_mid_epoch(tiny_tfds_dir):
  # 41 examples, batch 16: 2 steps per epoch; stopping after 3 resumes inside epoch 1.
  c = make_config(source="tfds", name="bigbigan_test_tiny", data_dir=tiny_tfds_dir,
                  train_split="train", augment="resnet", random_flip=True)
  c.batch_size = 16
  it, straight = take(c, 5)
  assert it.steps_per_epoch == 2
  for b in straight:
    check_batch(b, 16, 32)
  # An epoch never repeats an example, and the next epoch has another order.
  epoch0 = np.concatenate([b["label"] for b in straight[:2]])
  epoch1 = np.concatenate([b["label"] for b in straight[2:4]])
  assert len(set(epoch0)) == 32 and len(set(epoch1)) == 32
  assert not np.array_equal(epoch0, epoch1)
  it, first = take(c, 3)
  _, rest = take(c, 2, start_state=it.get_state())
  assert_batches_equal(straight, first + rest)


def test_tfds_processes_read_disjoint_shards(tiny_tfds_dir):
  c = make_config(source="tfds", name="bigbigan_test_tiny", data_dir=tiny_tfds_dir,
                  train_split="train", eval_split="test", augment="none")
  labels = []
  for p in range(2):
    it, batches = take(c, 5, process_index=p, process_count=2)  # One epoch: 20 // 4 steps.
    labels.append(np.concatenate([b["label"] for b in batches]))
    check_batch(batches[0], 4, 32)
  assert len(set(labels[0]) | set(labels[1])) == 40  # Disjoint, no repeats, 1 dropped.
  # Evaluation covers every example exactly once over both processes, padded to equal length.
  seen = []
  for p in range(2):
    batches = list(pipeline.create_input_iter(c, train=False, process_index=p,
                                                    process_count=2))
    assert len(batches) == 2  # ceil(ceil(11 / 2) / 4)
    seen += [int(l) for b in batches for l, m in zip(b["label"], b["mask"]) if m]
  assert sorted(seen) == list(range(TINY_TEST))


def test_crop_window_stays_inside_the_image():
  for shape in [(100, 60, 3), (24, 20, 3), (8, 8, 3), (500, 375, 3)]:
    for s in range(25):
      y, x, h, w = preprocess.crop_window(tf.constant(shape), "resnet", 32,
                                              tf.constant([s, 7], tf.int64)).numpy()
      assert 0 <= y and 0 <= x and h >= 1 and w >= 1
      assert y + h <= shape[0] and x + w <= shape[1]
  center = preprocess.crop_window(tf.constant([500, 375, 3]), "center", 256).numpy()
  assert center.tolist() == [84, 21, 333, 333]  # 375 * 256 / 288, centred.
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (50, 70, 3)), tf.uint8)
  out = preprocess.preprocess_image(image, "decoded", mode="resnet", resolution=32,
                                        seed=tf.constant([1, 2], tf.int64), flip=True)
  assert out.shape == (32, 32, 3) and -1 <= out.numpy().min() <= out.numpy().max() <= 1


@pytest.mark.parametrize("mode", ["resnet", "center", "none"])
def test_jpeg_files_decode_only_the_window_and_match_a_full_decode(mode):
  # A folder's JPEG takes decode_and_crop_jpeg; the crop of a full decode is the reference.
  # They differ only where a window starts at an odd pixel: chroma, stored at half
  # resolution, is then upsampled from one neighbour fewer along that edge.
  rng = np.random.default_rng(3)
  smooth = tf.image.resize(rng.uniform(0, 255, (1, 12, 16, 3)), [375, 500], method="bicubic")
  image = np.clip(smooth[0].numpy() + rng.normal(0, 18, (375, 500, 3)), 0, 255)
  data = tf.io.encode_jpeg(image.astype(np.uint8), quality=90)
  for s in range(6):
    seed = tf.constant([s, 11], tf.int64)
    fast = preprocess.preprocess_image(data, "encoded", mode=mode, resolution=64, seed=seed,
                                       flip=False).numpy()
    full = preprocess.preprocess_image(tf.io.decode_jpeg(data, channels=3), "decoded",
                                       mode=mode, resolution=64, seed=seed, flip=False).numpy()
    np.testing.assert_array_equal(fast[3:-3, 3:-3], full[3:-3, 3:-3])
    np.testing.assert_allclose(fast, full, atol=0.05)


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=9), "not divisible by the process count 2"),
    (dict(source="folder", folder="/nonexistent/images"), "does not exist"),
    (dict(source="folder", folder="EMPTY"), "has no images: expected files ending in .png"),
    (dict(source="tfds", name="no_such_dataset_xyz"), "tfds has no dataset 'no_such_dataset_xyz'"),
    (dict(source="tfds", name="bigbigan_test_tiny", train_split="validation"),
     "has no split 'validation'"),
    (dict(source="tfds", name="mnist", data_dir="EMPTY"), "is not prepared"),
    (dict(source="digits", train_split="dev"), "digits source has no split 'dev'"),
])
def test_errors(change, message, tmp_path, tiny_tfds_dir):
  (tmp_path / "notes.txt").write_text("not an image")
  c = make_config(data_dir=tiny_tfds_dir)
  for k, v in change.items():
    v = str(tmp_path) if v == "EMPTY" else v
    if k == "batch_size":
      c.batch_size = v
    else:
      c.data[k] = v
  with pytest.raises(ValueError, match=message):
    pipeline.create_input_iter(c, process_index=0, process_count=2)


def _class_tree(root, counts):
  """root/<class>/<i>.png with counts[class] grey images whose value is 10*class + i."""
  for c, count in enumerate(counts):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(count):
      Image.fromarray(np.full((8, 8), 10 * c + i, np.uint8)).save(root / f"class{c}" / f"{i}.png")


def _split_values(c, split):
  """(labels, first-pixel values) of one ordered pass over a split."""
  labels, values = [], []
  for batch in pipeline.create_input_iter(c, split=split, train=False, process_index=0,
                                                process_count=1):
    labels += list(batch["label"][batch["mask"]])
    values += list(np.round((batch["image"][batch["mask"]][:, 0, 0, 0] + 1) * 127.5))
  return labels, values


def test_split_folders_are_splits(tmp_path):
  _class_tree(tmp_path / "data" / "train", (3, 2))
  _class_tree(tmp_path / "data" / "val", (1, 1))
  c = make_config(source="folder", folder=str(tmp_path / "data"), augment="none",
                  random_flip=False)
  c.batch_size = 2
  assert _split_values(c, "train")[0] == [0, 0, 0, 1, 1]
  for name in ("validation", "val", "test"):
    assert _split_values(c, name) == ([0, 1], [0.0, 10.0])
  with pytest.raises(ValueError, match=r"has the split folders \['train', 'val'\], and none "
                     "of them is split 'extra'"):
    pipeline.create_input_iter(c, split="extra", train=False)
  # val/ and test/ both: each name reads its own folder, "validation" val/.
  _class_tree(tmp_path / "data" / "test", (2, 1))
  assert _split_values(c, "test")[0] == [0, 0, 1]
  assert _split_values(c, "validation")[0] == _split_values(c, "val")[0] == [0, 1]
  # train/ and test/ only (a common layout): the default eval_split "validation" reads test/.
  shutil.rmtree(tmp_path / "data" / "val")
  for name in ("validation", "val", "test"):
    assert _split_values(c, name)[0] == [0, 0, 1]


def test_folder_slices_partition_a_split_over_every_class(tmp_path):
  _class_tree(tmp_path / "data", (10, 10))
  c = make_config(source="folder", folder=str(tmp_path / "data"), augment="none",
                  random_flip=False)
  c.batch_size = 4
  whole = _split_values(c, "train")
  head, tail = _split_values(c, "train[:70%]"), _split_values(c, "train[70%:]")
  assert len(head[0]) == 14 and len(tail[0]) == 6
  assert sorted(head[1] + tail[1]) == sorted(whole[1])  # Disjoint, and together all of it.
  assert set(head[0]) == set(tail[0]) == {0, 1}  # A seeded permutation, not the first class.
  assert _split_values(c, "train[:3]")[1] == _split_values(c, "train[:3]")[1]
  assert len(_split_values(c, "train[-5:]")[0]) == 5
  with pytest.raises(ValueError, match="slice bound 'x' is neither an integer"):
    pipeline.create_input_iter(c, split="train[:x]", train=False)
  with pytest.raises(ValueError, match="selects none of its 20 images"):
    pipeline.create_input_iter(c, split="train[50%:50%]", train=False)


def _truncated_jpeg(path):
  """A valid 16x16 JPEG cut to its first third: tf's decoder rejects it ("jpeg::Uncompress
  failed"), even cut to 90%, since decode_image never recovers truncated files."""
  pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 3])
  return str(path)


@pytest.fixture
def corrupt_folder(tmp_path):
  """class0/ and class1/ with 4 grey PNGs each (values 0..3, 10..13) and one truncated JPEG."""
  _class_tree(tmp_path / "data", (4, 4))
  return str(tmp_path / "data"), _truncated_jpeg(tmp_path / "data" / "class1" / "bad.jpg")


def test_corrupt_image_is_named(corrupt_folder):
  folder, bad = corrupt_folder
  c = make_config(source="folder", folder=folder, augment="resnet")
  c.batch_size = 4
  # 9 files, batches of 4: the bad file is in one of the first 3 batches.
  with pytest.raises(ValueError, match=re.escape(bad) + ".*skip_corrupt=True"):
    take(c, 3)
  with pytest.raises(ValueError, match=re.escape(bad) + " cannot be decoded"):
    list(pipeline.create_input_iter(c, train=False, process_index=0, process_count=1))
  # A failing batch whose files all decode (not pinned down): the whole split is searched.
  source = sources.folder_source(folder, "train")
  error = sources.explain_file_error(source, np.arange(2), RuntimeError("tf's"))
  assert isinstance(error, ValueError) and bad in str(error) and "not checked" not in str(error)


def test_skip_corrupt_leaves_the_file_out_and_resumes_exactly(corrupt_folder, caplog):
  folder, bad = corrupt_folder
  c = make_config(source="folder", folder=folder, augment="resnet", random_flip=True,
                  skip_corrupt=True)
  c.batch_size = 4
  with caplog.at_level(logging.WARNING):
    it, straight = take(c, 6)  # 3 epochs of the 8 sound files.
  assert any(bad in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert it.num_examples == 8
  # Grey images stay flat through crop and flip: the first pixel says which image it is.
  values = np.concatenate([np.round((b["image"][:, 0, 0, 0] + 1) * 127.5) for b in straight])
  assert np.bincount(values.astype(int)).nonzero()[0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
  it, first = take(c, 3)
  _, rest = take(c, 3, start_state=json.loads(json.dumps(it.get_state())))
  assert_batches_equal(straight, first + rest)


def test_failing_batch_indices_are_the_streams():
  # Labels 0..12 name the examples, so the stream's labels are the source indices.
  n = 13
  source = sources.IndexedSource("t", "train", "decoded", np.zeros((n, 4, 4, 3)),
                                         np.arange(n))
  for process_index in range(2):
    ds = streams.indexed_train_stream(
        source, seed=3, batch_size=8, process_index=process_index, process_count=2,
        start_step=0, mode="none", flip=False, resolution=4)
    labels = [b["label"] for b in ds.batch(4).take(5).as_numpy_iterator()]
    for step, got in enumerate(labels):
      want = streams.train_batch_indices(n, seed=3, batch_size=8, step=step,
                                                 process_index=process_index, process_count=2)
      np.testing.assert_array_equal(got, want)


class BigbiganTestCorrupt(tfds.core.GeneratorBasedBuilder):
  """20 JPEG records labelled by index; record 7 is a truncated JPEG."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=20),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(20):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, "JPEG")
      data = buf.getvalue()
      yield i, {"image": io.BytesIO(data[:len(data) // 3] if i == 7 else data), "label": i}


def test_tfds_corrupt_record(tmp_path, caplog):
  BigbiganTestCorrupt(data_dir=str(tmp_path)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  c = make_config(source="tfds", name="bigbigan_test_corrupt", data_dir=str(tmp_path),
                  train_split="train", eval_split="train")
  c.batch_size = 4
  with pytest.raises(ValueError, match=r"tfds bigbigan_test_corrupt\[train\] has a record "
                     "that cannot be decoded.*skip_corrupt=True"):
    take(c, 5)
  c.data.skip_corrupt = True
  # Epoch 0 is topped up with its own first record, so epochs keep 5 batches and resuming
  # at an epoch's start is exact.
  with caplog.at_level(logging.WARNING):
    it, straight = take(c, 7)
  assert "epoch 0 of process 0: 1 records did not decode and were skipped" in caplog.text
  labels = np.concatenate([b["label"] for b in straight])
  assert 7 not in labels and len(set(labels[:20])) == 19 and labels[19] == labels[0]
  assert set(straight[0]) == {"image", "label"}
  _, rest = take(c, 2, start_state=dict(it.get_state(), step=5))
  assert_batches_equal(straight[5:], rest)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.create_input_iter(c, train=False, process_index=0,
                                                    process_count=1))
  assert "1 of this process's 20 records did not decode" in caplog.text
  assert len(batches) == 5 and set(batches[0]) == {"image", "label", "mask"}
  seen = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert sorted(seen) == sorted(set(range(20)) - {7})


def test_input_benchmark_reads_photo_sized_jpegs_and_states_the_feed_need(tmp_path):
  mean_kb = benchmark.write_synthetic_jpegs(str(tmp_path), 12)
  assert 40 < mean_kb < 200  # About a photo's size at ~500x375, quality 90.
  names = sorted(os.listdir(tmp_path))
  assert names == [f"class{i}" for i in range(10)]
  assert Image.open(tmp_path / "class0" / "000000.jpg").size == (500, 375)
  c = make_config(source="folder", folder=str(tmp_path), augment="resnet")
  c.batch_size, c.optim.d_steps = 16, 2
  result = benchmark.run_input_pipeline(c, steps=2, warmup=0, hosts=4, step_ms=250.0)
  assert result["local_batch_size"] == 4 and result["resolution"] == 32
  assert result["images_per_s"] > 0
  assert result["images_per_s_per_core"] * result["cores"] == pytest.approx(
      result["images_per_s"])
  # Each of 4 hosts feeds 16 x 2 / 4 = 8 images per 0.25 s step.
  assert result["need_images_per_s"] == pytest.approx(32.0)
  assert result["cores_needed"] == pytest.approx(32.0 / result["images_per_s_per_core"])
