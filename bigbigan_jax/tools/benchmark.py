r"""Measures, on this machine, the real train step of a config (compile time, step time,
images/s, peak host memory; synthetic inputs, so no dataset is read) or, with
`--input_pipeline`, the real input pipeline of its `config.data`.

  python -m bigbigan_jax.tools.benchmark --config=configs/digits.py
  python -m bigbigan_jax.tools.benchmark --config=configs/tiny.py --steps=20 --json

Step times are the median of `--steps` timed steps after `--warmup` untimed ones; "images/s"
counts the real images D sees (batch_size x d_steps per step).

Against the author's PyTorch trainer: `--biggan_pytorch=DIR` (a checkout of
github.com/ajbrock/BigGAN-PyTorch; `--torch_python` an interpreter with torch, default this
one) also times its own training step at the layout of a BigGAN `--config` (same resolution,
width, batch, z, shared embedding, classes, attention, D steps, learning rates, Adam, orthogonal
regularisation), in this run, and prints both with their ratio: the README's CPU table is

  python -m bigbigan_jax.tools.benchmark --config=configs/digits.py:biggan \
      --config.model.resolution=32 --config.model.ch=64 --config.batch_size=16 \
      --config.model.z_dim=128 --config.model.shared_dim=128 --config.model.g_attention_res=0 \
      --config.model.d_attention_res=0 --config.optim.d_steps=1 \
      --config.loss.wrong_label_ranking=0 --biggan_pytorch=DIR

The input pipeline (decode, crop, bicubic resize, flip, exactly as training reads it) of one
host of `--hosts`, beside what that host must feed when a step takes `--step_ms`:

  python -m bigbigan_jax.tools.benchmark --config=configs/bigbigan_resnet50.py \
      --input_pipeline --synthetic_jpegs=1000 --hosts=16 --step_ms=290

reads 1,000 generated JPEGs of ImageNet's typical size (or `--config.data.source=folder
--config.data.folder=DIR` for real ones) in batches of batch_size / hosts. A host must feed
batch_size x d_steps / hosts images per step; the report says how many of its cores the
pipeline needs for that at the rate measured here per core.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from bigbigan_jax import overrides as overrides_lib
from bigbigan_jax import environment
from bigbigan_jax.models import flops as flops_lib
from bigbigan_jax.training import state as state_lib
from bigbigan_jax.training import step as step_lib

FLAGS = flags.FLAGS


def define_flags():
  """Registers the command-line flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after the compiling one.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
  flags.DEFINE_string("biggan_pytorch", "", "A checkout of BigGAN-PyTorch: also time its own "
                      "train step at the layout of this BigGAN --config, and print the ratio.")
  flags.DEFINE_string("torch_python", sys.executable,
                      "With --biggan_pytorch: a Python interpreter that has torch.")
  flags.DEFINE_bool("input_pipeline", False,
                    "Time the input pipeline of --config (batches of one host's share) "
                    "instead of the train step; --steps batches after --warmup.")
  flags.DEFINE_integer("hosts", 1, "With --input_pipeline: the hosts that share "
                       "config.batch_size; this one reads batch_size / hosts per batch.")
  flags.DEFINE_float("step_ms", 0.0, "With --input_pipeline: a train step time (e.g. the AOT "
                     "report's) to compare the feed rate against; 0 leaves it out.")
  flags.DEFINE_float("peak_tflops", 0.0, "The accelerator's peak TFLOP/s per device (bf16 "
                     "dense, e.g. 989 for an H100 SXM): also print the model-FLOP utilisation "
                     "of the step; 0 leaves it out.")
  flags.DEFINE_integer("synthetic_jpegs", 0, "With --input_pipeline: write this many JPEGs of "
                       "ImageNet's typical size (~500x375, quality 90) to a temporary folder "
                       "and read them (config.data.source='folder').")


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
      # The model's FLOPs of one step, counted once for all devices (as tools.aot counts them).
      "model_flops_per_step": flops_lib.train_step(config)["useful"],
      "peak_host_memory_mb": peak_host_memory_mb(),
      "params": {name: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
                 for name, tree in state.params.items()},
  }


_PYTORCH_FILES = ("BigGAN.py", "train_fns.py", "utils.py", "layers.py")


def biggan_pytorch_spec(config, checkout: str, steps: int, warmup: int) -> dict:
  """The layout of a BigGAN config in BigGAN-PyTorch's terms (for biggan_pytorch_step.py).

  Raises:
    ValueError: for a config BigGAN-PyTorch's networks cannot take (BigBiGAN, no classes, a
      resolution without an architecture there), before anything runs.
  """
  model = config.model
  if model.kind != "biggan" or model.num_classes < 1:
    raise ValueError(
        f"--biggan_pytorch compares class-conditional BigGAN; this config has "
        f"model.kind={model.kind!r}, num_classes={model.num_classes}. Use a biggan config, "
        "e.g. --config=configs/digits.py:biggan.")
  extras = {f"loss.{k}": config.loss[k]
            for k in ("wrong_label_ranking", "translate", "cutout", "lecam", "mode_seeking")
            if config.loss[k]}
  if config.optim.decay_from < 1:
    extras["optim.decay_from"] = config.optim.decay_from
  if extras:
    raise ValueError(
        "BigGAN-PyTorch's step has none of " + ", ".join(f"{k}={v}" for k, v in extras.items())
        + ": add " + " ".join(f"--config.{k}={1 if k.endswith('decay_from') else 0}"
                              for k in extras) + " to compare like with like.")
  if model.resolution not in (32, 64, 128, 256, 512):
    raise ValueError(f"BigGAN-PyTorch has architectures at 32, 64, 128, 256 and 512 px, not "
                     f"model.resolution={model.resolution}.")
  missing = [f for f in _PYTORCH_FILES if not os.path.isfile(os.path.join(checkout, f))]
  if missing:
    raise ValueError(f"--biggan_pytorch={checkout!r} is not a BigGAN-PyTorch checkout (no "
                     f"{', '.join(missing)}). Clone github.com/ajbrock/BigGAN-PyTorch and pass "
                     "its folder.")
  attention = lambda res: str(res) if res else "0"
  return {"dir": os.path.abspath(checkout), "resolution": int(model.resolution),
          "ch": int(model.ch), "batch": int(config.batch_size),
          "num_classes": int(model.num_classes), "z_dim": int(model.z_dim),
          "shared_dim": int(model.shared_dim), "g_attn": attention(model.g_attention_res),
          "d_attn": attention(model.d_attention_res), "d_steps": int(config.optim.d_steps),
          "g_lr": float(config.optim.g_lr), "d_lr": float(config.optim.d_lr),
          "b1": float(config.optim.b1), "b2": float(config.optim.b2),
          "eps": float(config.optim.eps), "ortho": float(config.loss.ortho_beta),
          "ema_decay": float(config.ema.decay), "steps": steps, "warmup": warmup}


def run_biggan_pytorch(spec: dict, python: str = sys.executable) -> dict:
  """Runs biggan_pytorch_step.py in `python`; its JSON result."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "biggan_pytorch_step.py")
  done = subprocess.run([python, script, json.dumps(spec)], capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"BigGAN-PyTorch's step did not run ({python} {script}); its error:\n"
                       + done.stderr[-3000:])
  return json.loads(done.stdout.strip().splitlines()[-1])


# Shapes of typical ImageNet photos (height, width); JPEG decoding cost follows the pixel count.
_PHOTO_SHAPES = ((375, 500), (500, 375), (333, 500), (500, 500))


def write_synthetic_jpegs(folder: str, n: int, seed: int = 0) -> float:
  """Writes n photo-sized JPEGs into 10 class folders; returns their mean size in KB.

  The content is a smooth random colour field plus noise, which JPEG compresses to about the
  size of a photo of that shape (ImageNet's mean is ~110 KB): decoding cost depends on the
  pixel count and the compressed size, not on what the picture shows.
  """
  import tensorflow as tf  # Only this path needs it.
  rng = np.random.default_rng(seed)
  total = 0
  for i in range(n):
    height, width = _PHOTO_SHAPES[i % len(_PHOTO_SHAPES)]
    low = rng.uniform(0, 255, (1, 12, 16, 3)).astype(np.float32)
    image = tf.image.resize(low, [height, width], method="bicubic")[0].numpy()
    image = np.clip(image + rng.normal(0, 18, image.shape), 0, 255).astype(np.uint8)
    data = tf.io.encode_jpeg(image, quality=90).numpy()
    os.makedirs(os.path.join(folder, f"class{i % 10}"), exist_ok=True)
    with open(os.path.join(folder, f"class{i % 10}", f"{i:06d}.jpg"), "wb") as f:
      f.write(data)
    total += len(data)
  return total / n / 1e3


def run_input_pipeline(config, steps: int = 10, warmup: int = 2, hosts: int = 1,
                       step_ms: float = 0.0) -> dict:
  """Times this host's batches of config.data (host 0 of `hosts`) and its feed requirement."""
  from bigbigan_jax.data import pipeline  # TF is imported only when the input is measured.
  t0 = time.perf_counter()
  batches = pipeline.create_input_iter(config, process_index=0, process_count=hosts)
  first = next(batches)
  start_s = time.perf_counter() - t0
  for _ in range(warmup):
    next(batches)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(batches)
  elapsed = time.perf_counter() - t0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  images_per_s = batches.local_batch_size * steps / elapsed
  result = {
      "source": config.data.source, "augment": config.data.augment,
      "resolution": int(first["image"].shape[1]), "hosts": hosts,
      "local_batch_size": batches.local_batch_size, "first_batch_s": start_s,
      "images_per_s": images_per_s, "cores": cores, "images_per_s_per_core": images_per_s / cores,
  }
  if step_ms > 0:
    need = config.batch_size * config.optim.d_steps / hosts / (step_ms / 1e3)
    result.update(step_ms=step_ms, need_images_per_s=need,
                  cores_needed=need / result["images_per_s_per_core"])
  return result


def model_flops_utilisation(result: dict, peak_tflops: float) -> float:
  """The model's FLOPs per second over `peak_tflops` x the devices that ran the step."""
  return result["model_flops_per_step"] / result["step_s"] / (
      peak_tflops * 1e12 * result["devices"])


def _print_input_pipeline(result: dict) -> None:
  print(f"input pipeline: {result['source']} images, crop {result['augment']}, bicubic to "
        f"{result['resolution']}x{result['resolution']}, batches of {result['local_batch_size']}"
        f" (one host of {result['hosts']})")
  print(f"first batch:           {result['first_batch_s']:.1f} s")
  print(f"throughput:            {result['images_per_s']:.1f} images/s on {result['cores']} "
        f"cores = {result['images_per_s_per_core']:.1f} images/s per core")
  if "need_images_per_s" in result:
    print(f"needed at {result['step_ms']:.0f} ms/step: {result['need_images_per_s']:.1f} "
          f"images/s per host = {result['cores_needed']:.1f} cores at this rate per core")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/digits.py")
  if FLAGS.input_pipeline and FLAGS.biggan_pytorch:
    raise app.UsageError("--biggan_pytorch compares train steps; it does not apply to "
                         "--input_pipeline. Drop one of them.")
  if FLAGS.input_pipeline:
    config = FLAGS.config
    with tempfile.TemporaryDirectory() as folder:
      if FLAGS.synthetic_jpegs:
        mean_kb = write_synthetic_jpegs(folder, FLAGS.synthetic_jpegs)
        config.data.source, config.data.folder = "folder", folder
        print(f"wrote {FLAGS.synthetic_jpegs} JPEGs of {mean_kb:.0f} KB on average",
              file=sys.stderr)
      result = run_input_pipeline(config, FLAGS.steps, FLAGS.warmup, FLAGS.hosts,
                                  FLAGS.step_ms)
    if FLAGS.json:
      print(json.dumps(result))
    else:
      _print_input_pipeline(result)
    return
  spec = None
  if FLAGS.biggan_pytorch:
    try:
      spec = biggan_pytorch_spec(FLAGS.config, FLAGS.biggan_pytorch, FLAGS.steps, FLAGS.warmup)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  result = run(FLAGS.config, FLAGS.steps, FLAGS.warmup)
  if spec is not None:
    theirs = run_biggan_pytorch(spec, FLAGS.torch_python)
    result["biggan_pytorch"] = theirs
    result["ratio_to_biggan_pytorch"] = result["step_s"] / theirs["step_s"]
  if FLAGS.peak_tflops > 0:
    result["model_flops_utilisation"] = model_flops_utilisation(result, FLAGS.peak_tflops)
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
  if "model_flops_utilisation" in result:
    print(f"utilisation:           {100 * result['model_flops_utilisation']:.1f}% model FLOPs "
          f"({result['model_flops_per_step'] / 1e12:.3g} TFLOP a step) of {result['devices']}"
          f" x {FLAGS.peak_tflops:g} TFLOP/s")
  print("parameters:            " + ", ".join(f"{name} {count:,}" for name, count in
                                              result["params"].items()))
  print(f"peak host memory:      {result['peak_host_memory_mb']:.0f} MiB")
  if "biggan_pytorch" in result:
    theirs = result["biggan_pytorch"]
    print(f"BigGAN-PyTorch step:   {theirs['step_s'] * 1e3:.1f} ms median "
          f"({theirs['step_s_min'] * 1e3:.1f}-{theirs['step_s_max'] * 1e3:.1f}), torch "
          f"{theirs['torch']} on {theirs['threads']} threads; G {theirs['g_params']:,} and D "
          f"{theirs['d_params']:,} parameters")
    print(f"ours / BigGAN-PyTorch: {result['ratio_to_biggan_pytorch']:.2f}")


if __name__ == "__main__":
  environment.set_entry_point_defaults()
  overrides_lib.exit_on_unknown_override()
  define_flags()
  app.run(main)
