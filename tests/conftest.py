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

import gc  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

from bigbigan_jax import config as config_lib  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def load_config():
  """load_config("tiny.py:biggan") → the ConfigDict of configs/tiny.py's biggan variant."""
  return lambda name: config_lib.load(str(CONFIGS / name))


# Each XLA:CPU executable holds thousands of memory mappings (about 4,800 for the tiny train
# step and its init together), and a Linux process may hold vm.max_map_count of them (65,530
# by default). Past that, the next compile or persistent-cache write dies of a segmentation
# fault: a test worker that runs half the suite in one process got there (36,762 mappings
# after three of the step-compiling files). Past MAX_MAPPINGS the worker drops jax's compiled
# programs after the test; what a later test needs comes back from the persistent cache.
MAX_MAPPINGS = 30_000


def _mappings() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # Not Linux: no such limit to mind.
    return 0


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
  yield
  if _mappings() > MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()


# The test files that take longest from an empty compile cache (worker seconds, measured on a
# 2-core host), longest first. The two workers take files in the order collected: without
# this the longest ran last (pytest-xdist's default order puts files with many tests first,
# and test_multihost.py has few), leaving one worker idle for minutes at the end.
SLOWEST_FILES = ("test_multihost.py", "test_accumulation.py", "test_train.py",
                 "test_faults.py", "test_scale_options.py", "test_storage.py", "test_aot.py",
                 "test_objectives.py", "test_evaluators.py", "test_readme.py")


def pytest_collection_modifyitems(config, items):
  """Puts SLOWEST_FILES first, longest first; every other file after them, in its order."""
  del config
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.
