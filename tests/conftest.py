"""Test-wide setup: 8 fake CPU devices and the CPU platform, fixed before jax is imported.

Sharding tests need several devices; every other test runs on the first one. With libtpu
installed (the `tpu` extra, for ahead-of-time compiles) jax would otherwise try to start a
TPU runtime at import.
"""

import os

from bigbigan_jax import environment

# As the entry points: quiet TF start-up, and no Keras import (3-5 s a process, subprocesses too).
environment.set_entry_point_defaults()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Compile time dominates CPU tests of tiny models; optimisation buys nothing there, and many
# tests compile the same programs, which the persistent cache then serves from disk. Set as
# environment variables so the entry points that tests start as subprocesses share them.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "bigbigan_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above)

assert jax.config.values["jax_disable_most_optimizations"], "set from the environment above"

import pathlib  # noqa: E402

import pytest  # noqa: E402

from bigbigan_jax import config as config_lib  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def load_config():
  """load_config("tiny.py:biggan") → the ConfigDict of configs/tiny.py's biggan variant."""
  return lambda name: config_lib.load(str(CONFIGS / name))
