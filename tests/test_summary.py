"""The summary CLI reproduces the reference parameter counts, from shapes alone."""

import json
import os
import pathlib
import subprocess
import sys

from bigbigan_jax import config as config_lib
from bigbigan_jax.tools import summary

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_biggan_128_counts_match_reference_exactly():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-m", "bigbigan_jax.tools.summary", "--config=configs/biggan_128.py", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
  counts = json.loads(out.stdout.strip().splitlines()[-1])
  # BigGAN-PyTorch and compare_gan agree on these (and the BigGAN paper: 70.4M / 88.0M).
  assert counts == {"generator": 70_433_988, "encoder": None, "discriminator": 87_982_370}


def test_bigbigan_resnet50_shapes():
  info = summary.summarize(config_lib.load(str(ROOT / "configs/bigbigan_resnet50.py")).model)
  enc = info["encoder"]
  assert enc["inputs"] == [(2, 256, 256, 3)]
  assert enc["outputs"]["avepool_feat"] == (2, 2048)
  assert enc["outputs"]["bn_crelu_feat"] == (2, 4096)
  for key in ("z_mean", "z_stdev", "z_sample"):
    assert enc["outputs"][key] == (2, 120)
  assert info["generator"]["outputs"] == (2, 128, 128, 3)
  assert info["discriminator"]["inputs"] == [(2, 128, 128, 3), (2, 120)]
  # BigBiGAN's G is BigGAN-128's with the 1000x128 embedding replaced by a 128-d constant.
  assert info["generator"]["params"] == 70_433_988 - 1000 * 128 + 128
  # Spectral-norm vectors and BN statistics are state, reported apart from parameters.
  assert info["generator"]["state"]["spectral"] > 0
  assert info["generator"]["state"]["batch_stats"] > 0
