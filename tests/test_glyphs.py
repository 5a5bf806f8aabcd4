"""The rendered letters (bigbigan_jax/data/glyphs.py): the same images every time, laid out as
a folder source reads them, and learnable: a judge tells the letters apart on held-out ones."""

import pathlib
import subprocess
import sys

import numpy as np

from bigbigan_jax import config as config_lib
from bigbigan_jax.data import glyphs
from bigbigan_jax.data import pipeline
from bigbigan_jax.evaluation import judge as judge_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_glyphs_are_fixed_by_seed_and_vary_within_a_class():
  images, labels = glyphs.make("train", per_class=6)
  again, _ = glyphs.make("train", per_class=6)
  other, _ = glyphs.make("train", seed=1, per_class=6)
  test, _ = glyphs.make("test", per_class=6)
  assert images.shape == (60, 16, 16) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 6))
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other) and not np.array_equal(images, test)
  # Bright strokes on black, and no two images of a class alike (fonts, sizes, shifts).
  assert images.reshape(60, -1).max(axis=1).min() > 100
  assert np.mean(images == 0) > 0.4
  first = images.reshape(10, 6, -1)
  for c in range(10):
    assert len({row.tobytes() for row in first[c]}) == 6


def test_glyph_folder_is_a_folder_source_and_a_judge_learns_it(tmp_path):
  out = subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.glyphs",
                        f"--out={tmp_path / 'g'}", "--per_class=40"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "400 train images, 400 test images" in out.stdout
  again = subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.glyphs",
                          f"--out={tmp_path / 'g'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
  assert again.returncode != 0 and "already holds train, test/" in again.stderr

  c = config_lib.base_config()
  c.model.kind, c.model.num_classes, c.model.resolution = "biggan", 10, 16
  c.data.source, c.data.folder, c.data.augment = "folder", str(tmp_path / "g"), "none"
  c.data.random_flip = False
  c.batch_size = 50
  # The default eval_split, "validation", reads test/.
  batches = list(pipeline.create_input_iter(c, train=False, process_index=0, process_count=1))
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert sorted(np.bincount(labels)) == [40] * 10
  image = batches[0]["image"][0]
  assert image.shape == (16, 16, 3) and -1 <= image.min() < image.max() <= 1

  # Learnable and distinct: a judge trained on 1,000 letters labels 400 others.
  train_x, train_y = glyphs.make("train", per_class=100)
  test_x, test_y = glyphs.make("test", per_class=40)
  to_rgb = lambda x: np.repeat(x[..., None], 3, -1).astype(np.float32) / 127.5 - 1
  judge = judge_lib.train_judge(to_rgb(train_x), train_y, 10)
  assert judge.accuracy(to_rgb(test_x), test_y) > 0.85
