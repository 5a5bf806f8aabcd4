"""The sampling CLI: PNG grids of samples, interpolations and reconstructions of the right
size, and bad input refused with the fix named before anything is restored or compiled."""

import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from train_steps import save_initial_state

from bigbigan_jax import config as config_lib
from bigbigan_jax import inference
from bigbigan_jax.tools import sample

pytestmark = pytest.mark.slow  # trains a tiny model, then the sampling tool.

ROOT = pathlib.Path(__file__).resolve().parent.parent
TILE = 32 + 1  # A 32x32 image and its 1-pixel gutter in images.grid.


def _grid_size(rows, cols):
  """(width, height) of a PNG grid, as PIL reports it."""
  return cols * TILE + 1, rows * TILE + 1


def _untrained_checkpoint(variant, path):
  """The tiny config's initial train state: the CLI needs weights, not good ones."""
  return save_initial_state(config_lib.load(str(ROOT / f"configs/tiny.py:{variant}")), path)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  return {variant: _untrained_checkpoint(variant, tmp_path_factory.mktemp(variant))
          for variant in ("bigbigan", "biggan")}


@pytest.fixture
def no_restore(monkeypatch):
  """Makes restoring a model fail: errors must come before it."""
  def fail(*args, **kwargs):
    raise AssertionError("the model was restored before the input was checked")
  monkeypatch.setattr(inference, "load", fail)


def _size(path):
  with Image.open(path) as image:
    return image.size


def test_samples_with_truncation_and_standing_stats(workdirs, tmp_path):
  out = sample.run(workdirs["bigbigan"], out=str(tmp_path / "grid.png"), num=5, truncation=0.5,
                   truncation_method="scaled", standing_stats=2, batch_size=8)
  assert out == str(tmp_path / "grid.png")
  assert _size(out) == _grid_size(rows=2, cols=3)


def test_interpolation_rows_go_from_one_latent_to_another(workdirs):
  workdir = workdirs["bigbigan"]
  out = sample.run(workdir, num=3, interpolate=4, truncation=1.0, seed=3, batch_size=8)
  assert out == os.path.join(workdir, "inference", "interpolation_step1.png")
  assert _size(out) == _grid_size(rows=3, cols=4)
  # Each row starts and ends at a draw of the latents: compare with G on those draws.
  ends = inference.sample_z(3, 6, 8, truncation=1.0, method="resample")
  model = inference.load(workdir, batch_size=8)
  first = np.asarray(Image.open(out))[1:33, 1:33]
  last = np.asarray(Image.open(out))[1:33, 3 * TILE + 1:3 * TILE + 33]
  expected = [np.clip(np.round((model.generate(ends[i:i + 1])[0] + 1) * 127.5), 0, 255)
              for i in (0, 3)]
  np.testing.assert_allclose(first, expected[0], atol=1)
  np.testing.assert_allclose(last, expected[1], atol=1)


def test_reconstructions_of_files_and_folders(workdirs, tmp_path):
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)).save(
      tmp_path / "wide.jpg")
  (tmp_path / "more").mkdir()
  for name in ("a.png", "b.bmp"):
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "more" / name)
  out = sample.run(workdirs["bigbigan"], out=str(tmp_path / "recon.png"),
                   reconstruct=f"{tmp_path / 'wide.jpg'},{tmp_path / 'more'}", batch_size=8)
  # 3 real | reconstruction pairs, 2 pairs a row.
  assert _size(out) == _grid_size(rows=2, cols=4)


def test_biggan_samples_with_labels(workdirs, tmp_path):
  out = sample.run(workdirs["biggan"], out=str(tmp_path / "g.png"), num=4, labels="3,7",
                   batch_size=8)
  assert _size(out) == _grid_size(rows=2, cols=2)
  np.testing.assert_array_equal(sample.parse_labels("3,7", 5, 10, 0), [3, 7, 3, 7, 3])
  np.testing.assert_array_equal(sample.parse_labels(None, 12, 10, 0), np.arange(12) % 10)


@pytest.mark.parametrize("variant,kwargs,error,message", [
    ("biggan", {"reconstruct": "x.png"}, ValueError, "holds a BigGAN .*drop --reconstruct"),
    ("biggan", {"labels": "3,10"}, ValueError, r"class ids in \[0, 10\)"),
    ("bigbigan", {"labels": "3"}, ValueError, "unconditional: drop --labels"),
    ("bigbigan", {"reconstruct": "MISSING.png"}, FileNotFoundError, "no such image file"),
    ("bigbigan", {"reconstruct": "BAD.png"}, ValueError, "cannot read .*BAD.png as an image"),
    ("bigbigan", {"reconstruct": "x.png", "interpolate": 3}, ValueError, "give one of them"),
    ("bigbigan", {"truncation": -0.5}, ValueError, "positive number"),
    ("bigbigan", {"interpolate": 1}, ValueError, "at least 2 steps"),
    ("bigbigan", {"step": 5}, ValueError, r"no checkpoint at step 5 .* steps \[1\]"),
])
def test_bad_input_fails_before_restoring(workdirs, tmp_path, no_restore, variant, kwargs, error,
                                          message):
  (tmp_path / "BAD.png").write_text("not an image")
  if "reconstruct" in kwargs:
    kwargs = {**kwargs, "reconstruct": str(tmp_path / kwargs["reconstruct"])}
  with pytest.raises(error, match=message):
    sample.run(workdirs[variant], out=str(tmp_path / "out.png"), **kwargs)
  assert not (tmp_path / "out.png").exists()


def _run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.sample", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_a_grid_and_refuses_a_workdir_without_checkpoints(workdirs, tmp_path):
  out = _run_cli(f"--workdir={workdirs['biggan']}", "--num=3", "--truncation=0.4",
                 "--batch_size=8", f"--out={tmp_path / 'cli.png'}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == str(tmp_path / "cli.png")
  assert _size(tmp_path / "cli.png") == _grid_size(rows=2, cols=2)

  out = _run_cli(f"--workdir={tmp_path / 'empty'}")
  assert out.returncode != 0
  assert "error: no checkpoint in" in out.stderr and "bigbigan_jax.main" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "empty").exists()
