r"""Measures the real train step of a config on this machine: compile time, step time,
images/s and peak host memory. Synthetic inputs, so no dataset is read.

  python -m bigbigan_jax.tools.benchmark --config=configs/digits.py
  python -m bigbigan_jax.tools.benchmark --config=configs/tiny.py --steps=20 --json

Step times are the median of `--steps` timed steps after `--warmup` untimed ones; "images/s"
counts the real images D sees (batch_size x d_steps per step).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from bigbigan_jax.training import state as state_lib  # noqa: E402
from bigbigan_jax.training import step as step_lib  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """Registers the command-line flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after the compiling one.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def peak_host_memory_mb() -> float:
  """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run(config, steps: int = 10, warmup: int = 2) -> dict:
  """Compiles and times the train step of `config` on the local devices."""
  nets, mesh, abstract_state = state_lib.setup(config)

  t0 = time.perf_counter()
  state = state_lib.make_init_fn(nets, config, abstract_state)(jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0

  spec = step_lib.batch_spec(config, nets, mesh)
  rng = np.random.default_rng(0)
  local = jax.process_count()
  batch = {
      "image": rng.uniform(-1, 1, (spec["image"].shape[0], spec["image"].shape[1] // local,
                                   *spec["image"].shape[2:])).astype(np.float32),
      "label": rng.integers(0, max(nets.num_classes, 1),
                            (spec["label"].shape[0], spec["label"].shape[1] // local),
                            dtype=np.int32)}
  batch = step_lib.to_global(batch, config, nets, mesh)

  step_fn = step_lib.make_train_step(nets, config, mesh, abstract_state)
  t0 = time.perf_counter()
  compiled = step_fn.lower(abstract_state, spec).compile()
  compile_s = time.perf_counter() - t0

  for _ in range(warmup + 1):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  return {
      "devices": jax.device_count(), "platform": jax.devices()[0].platform,
      "batch_size": config.batch_size, "d_steps": config.optim.d_steps,
      "init_s": init_s, "compile_s": compile_s, "step_s": step_s,
      "step_s_min": min(times), "step_s_max": max(times),
      "images_per_s": config.batch_size * config.optim.d_steps / step_s,
      "peak_host_memory_mb": peak_host_memory_mb(),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/digits.py")
  result = run(FLAGS.config, FLAGS.steps, FLAGS.warmup)
  if FLAGS.json:
    print(json.dumps(result))
    return
  print(f"{result['devices']} {result['platform']} device(s), global batch "
        f"{result['batch_size']} x {result['d_steps']} D steps")
  print(f"init (compile + run):  {result['init_s']:.1f} s")
  print(f"train step compile:    {result['compile_s']:.1f} s")
  print(f"train step:            {result['step_s'] * 1e3:.1f} ms median "
        f"({result['step_s_min'] * 1e3:.1f}-{result['step_s_max'] * 1e3:.1f})")
  print(f"throughput:            {result['images_per_s']:.1f} real images/s")
  print(f"peak host memory:      {result['peak_host_memory_mb']:.0f} MiB")


if __name__ == "__main__":
  define_flags()
  app.run(main)
