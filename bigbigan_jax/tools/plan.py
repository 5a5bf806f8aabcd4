"""Finds how to run a config's global batch on a TPU slice, and what it would cost.

  python -m bigbigan_jax.tools.plan --config=configs/bigbigan_resnet50.py --topology=v5litepod-8
  python -m bigbigan_jax.tools.plan --config=configs/biggan_128.py --topology=v4-8 --json

The global batch is kept (it is part of the recipe). What changes is how a device holds its
share of it, in the order that costs least:

  1. gradient accumulation, `optim.microbatches` = k: the smallest k whose step fits HBM
     (each update averages k micro-batches; a few percent of step time, see docs/design.md);
  2. then, only if no k fits: bfloat16 activations, then `model.remat` (about one more
     forward of compute), then `shard_params`, each added to the one before.

Each candidate is the trainer's real step, compiled for the slice's compile-only devices by
`tools.aot` (minutes for a paper config on a small host). The search is cheap because a
step's per-device memory grows about linearly with its micro-batch: the config as it is
(k = 1) is compiled first; its memory (or, when it does not fit, the size XLA says it needed)
and the train state's bytes predict the largest micro-batch that fits, which is compiled; a
line through the compiled points then predicts the next, until the chosen k fits and the
next smaller k is known (compiled, or predicted by the line) not to. Every compile is listed.

For the chosen setting the table gives the per-device memory, the compiled FLOPs against the
analytic count, the cost-model step time (or, where XLA's cost model gives none, the FLOP
bound: compiled FLOPs at the chips' peak, a floor), the days to `num_train_steps`, and the
images per second each host must decode and crop to keep up, beside the per-core rate of the
input pipeline measured by `tools.benchmark --input_pipeline` (`--decode_images_per_core`).
Exits with status 1 when nothing fits, saying by how much.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from bigbigan_jax import config as config_lib
from bigbigan_jax import overrides as overrides_lib
from bigbigan_jax.tools import aot
from bigbigan_jax.tools import tpu_slices

GiB = tpu_slices.GiB
# Images/s one core decodes, crops and resizes to 256 px with the trainer's pipeline
# (`tools.benchmark --input_pipeline --synthetic_jpegs=1000`, ImageNet-sized JPEGs, on a
# 2-core Intel Xeon host: 265-283 per core; the lower figure).
DECODE_IMAGES_PER_CORE = 265.0
# Chips per host of Cloud TPU VMs: v2-v5p hosts hold 4 chips; a v5e or v6e slice of up to 8
# chips is one host (ct5lp-hightpu-8t, ...), larger ones 4 chips a host.
HOST_CHIPS = {"v2": 4, "v3": 4, "v4": 4, "v5p": 4}


def hosts_of(tpu: tpu_slices.TpuSlice) -> int:
  if tpu.generation in HOST_CHIPS:
    return max(1, tpu.chips // HOST_CHIPS[tpu.generation])
  return 1 if tpu.chips <= 8 else tpu.chips // 4


@dataclasses.dataclass
class Compiled:
  """One compile of the search: its micro-batch and what it needed."""

  options: str
  microbatches: int
  microbatch_per_device: int
  fits: bool
  bytes: float | None  # Total per-device bytes, or what XLA said it needed; None: unknown.
  seconds: float
  report: dict


def option_sets(config: ml_collections.ConfigDict) -> list[tuple[str, dict]]:
  """(name, overrides) in the order tried: the config as it is, then each memory option
  added to the ones before (bf16 activations, remat, sharded parameters), skipping those the
  config already has."""
  sets, overrides, names = [("as configured", {})], {}, []
  for field, value, name in (("model.dtype", "bfloat16", "bfloat16"),
                             ("model.remat", True, "remat"),
                             ("shard_params", True, "shard_params")):
    node = config
    for part in field.split("."):
      node = node[part]
    if node != value:
      overrides, names = {**overrides, field: value}, names + [name]
      sets.append(("+ " + " + ".join(names), overrides))
  return sets


def _with(config: ml_collections.ConfigDict, overrides: dict, k: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.update_from_flattened_dict({**overrides, "optim.microbatches": k})
  return c


def _report_bytes(report: dict) -> float | None:
  if report["memory"] is not None:
    return float(report["memory"]["total_bytes"])
  return report["error"].get("used_bytes")


def _fit_line(points: list[tuple[int, float]]):
  """Least-squares (intercept, slope) of bytes against micro-batch size."""
  n = len(points)
  mx = sum(m for m, _ in points) / n
  my = sum(b for _, b in points) / n
  sxx = sum((m - mx) ** 2 for m, _ in points)
  slope = sum((m - mx) * (b - my) for m, b in points) / sxx
  return my - slope * mx, slope


def check(config: ml_collections.ConfigDict, tpu: tpu_slices.TpuSlice) -> int:
  """What `search` checks before compiling (`--dry_run` stops here): the config is valid and
  its global batch splits over the slice's devices. Returns the batch per device."""
  config_lib.validate(config)
  if config.batch_size % tpu.num_devices:
    raise ValueError(f"config.batch_size={config.batch_size} does not split over the "
                     f"{tpu.num_devices} devices of {tpu.name}: use a multiple of "
                     f"{tpu.num_devices}")
  return config.batch_size // tpu.num_devices


def search(config: ml_collections.ConfigDict, tpu: tpu_slices.TpuSlice,
           capacity: float | None = None, *, max_compiles: int = 6,
           compile_fn: Callable = aot.compile_report, log: Callable = print) -> dict:
  """The cheapest setting that fits `config.batch_size` on `tpu` (see the module doc).

  Returns:
    {"fits", "options" (name), "overrides", "microbatches", "report" (tools.aot's, of the
    chosen setting or of the smallest micro-batch tried), "compiles" (every one, in order),
    "predicted" (what the line said of the next smaller k, when it was not compiled),
    "short_by_bytes" (when nothing fits: the least that was over)}.
  """
  capacity = tpu.hbm_bytes_per_device if capacity is None else capacity
  per_device = check(config, tpu)
  sizes = [m for m in range(per_device, 0, -1) if per_device % m == 0]  # Largest first.
  compiles: list[Compiled] = []
  best_short = None

  def run(name, overrides, m) -> Compiled:
    k = per_device // m
    log(f"compiling {name}, {k} micro-batch{'es' if k > 1 else ''} of {m} per device ...")
    t0 = time.perf_counter()
    report = compile_fn(_with(config, overrides, k), tpu, capacity)
    c = Compiled(name, k, m, bool(report["fits"]), _report_bytes(report),
                 time.perf_counter() - t0, report)
    compiles.append(c)
    got = "?" if c.bytes is None else f"{c.bytes / GiB:.2f} GiB"
    log(f"  {got} of {capacity / GiB:.2f} GiB: {'fits' if c.fits else 'does not fit'} "
        f"({c.seconds:.0f} s)" + (f": {report['error']['message'][:300]}"
                                  if c.bytes is None and report.get("error") else ""))
    return c

  for name, overrides in option_sets(config):
    tried: dict[int, Compiled] = {}
    predicted = None
    m = sizes[0]  # k = 1: the config as it is.
    for _ in range(max_compiles):
      tried[m] = run(name, overrides, m)
      fitting = [s for s in tried if tried[s].fits]
      best = max(fitting) if fitting else None
      failed = [s for s in tried if not tried[s].fits]
      # Bytes against micro-batch size: a line through what was compiled; with one point,
      # anchored at the train state's and batch's bytes, which no micro-batch size shrinks.
      points = [(s, c.bytes) for s, c in tried.items() if c.bytes is not None]
      fit_at = None
      by_size = [b for _, b in sorted(points)]
      if len(points) >= 2 and all(a < b for a, b in zip(by_size, by_size[1:])):
        intercept, slope = _fit_line(points)
        fit_at = lambda s, i=intercept, b=slope: i + b * s
      # Otherwise a smaller micro-batch needed as many bytes or more (XLA reports what it held
      # when it gave up, which depends on how far its rematerialisation got): no line, and the
      # search steps down one size at a time.
      elif len(points) == 1:
        (s0, b0), anchor = points[0], tried[points[0][0]].report["argument_bytes"]
        fit_at = lambda s, s0=s0, b0=b0, a=anchor: a + (b0 - a) * s / s0
      # Sizes still open: untried, below every size that failed, above the best that fits.
      open_sizes = [s for s in sizes if s not in tried and all(s < f for f in failed)
                    and (best is None or s > best)]
      likely = [s for s in open_sizes if fit_at is None or fit_at(s) <= capacity]
      if best is not None:
        nxt = min((s for s in sizes if s > best), default=None)
        if nxt is None or nxt in tried:
          break  # k = 1 fits, or the next larger micro-batch was compiled and does not.
        if not likely:
          predicted = {"microbatches": per_device // nxt, "microbatch_per_device": nxt,
                       "bytes": fit_at(nxt) if fit_at else None}
          break  # The line says the next larger micro-batch does not fit.
        m = max(likely)
      elif not open_sizes:
        break  # A micro-batch of 1 does not fit either.
      else:
        m = max(likely) if likely else min(open_sizes)
    if best is not None:
      chosen = tried[best]
      return {"fits": True, "options": name, "overrides": overrides,
              "microbatches": chosen.microbatches, "report": chosen.report,
              "compiles": [_summary(c) for c in compiles], "predicted": predicted,
              "short_by_bytes": None}
    smallest = tried[min(tried)]
    if smallest.bytes is not None:
      short = smallest.bytes - capacity
      best_short = short if best_short is None else min(best_short, short)
  return {"fits": False, "options": None, "overrides": None, "microbatches": None,
          "report": compiles[-1].report if compiles else None,
          "compiles": [_summary(c) for c in compiles], "predicted": None,
          "short_by_bytes": best_short}


def _summary(c: Compiled) -> dict:
  return {"options": c.options, "microbatches": c.microbatches,
          "microbatch_per_device": c.microbatch_per_device, "fits": c.fits, "bytes": c.bytes,
          "compile_seconds": c.seconds}


def costs(plan: dict, config: ml_collections.ConfigDict, tpu: tpu_slices.TpuSlice,
          decode_per_core: float = DECODE_IMAGES_PER_CORE) -> dict:
  """What the chosen setting costs: step time (cost model, or the FLOP bound), days to
  config.num_train_steps, and what each host's input pipeline must deliver."""
  r = plan["report"]
  flops = r["flops"]["compiled_per_device"]
  seconds = r["cost_model"]["step_seconds"]
  source = "cost model"
  if not seconds:
    seconds = flops / tpu.peak_flops_per_device
    source = "FLOP bound"
  hosts = hosts_of(tpu)
  images = config.batch_size * config.optim.d_steps / hosts / seconds
  return {"step_seconds": seconds, "step_source": source,
          "days": seconds * config.num_train_steps / 86400,
          "hosts": hosts, "host_images_per_second": images,
          "decode_images_per_core": decode_per_core,
          "host_cores_to_decode": images / decode_per_core}


FLAGS = flags.FLAGS


def define_flags():
  """Registers the command-line flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/bigbigan_resnet50.py.",
      lock_config=True)
  flags.DEFINE_string("topology", None, "Cloud TPU type (v4-8, v5litepod-8, v5p-8, v3-8) or a "
                      "libtpu topology (v4:2x2x1).")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
  flags.DEFINE_bool("dry_run", False, "Check the flags, the config and the slice, say what "
                    "the search starts with, and exit: seconds, no compile.")
  flags.DEFINE_float("hbm_gib", None, "HBM per device to fit in (GiB), instead of the chip's.")
  flags.DEFINE_integer("max_compiles", 6, "Compiles per memory option before trying the next.")
  flags.DEFINE_float("decode_images_per_core", DECODE_IMAGES_PER_CORE,
                     "Images/s one host core decodes and crops (tools.benchmark "
                     "--input_pipeline measures it).")


def format_plan(plan: dict, extra: dict | None, config_name: str, tpu) -> str:
  """The plan as text: the compiles, then the chosen setting's row."""
  lines = [f"{config_name} at global batch {plan['global_batch']} on {tpu.name} "
           f"({tpu.num_devices} devices, {tpu.hbm_bytes_per_device / GiB:.2f} GiB each)",
           "  compiled:"]
  for c in plan["compiles"]:
    got = "?" if c["bytes"] is None else f"{c['bytes'] / GiB:.2f} GiB"
    lines.append(f"    {c['options']:<24} k={c['microbatches']:<4} micro-batch "
                 f"{c['microbatch_per_device']:>4}/device  {got:>10}  "
                 f"{'fits' if c['fits'] else 'does not fit':<12} compile {c['compile_seconds']:.0f} s")
  if not plan["fits"]:
    short = plan["short_by_bytes"]
    lines.append("  NOTHING FITS" + (f": the smallest micro-batch is {short / GiB:.2f} GiB over "
                                     f"per device" if short is not None else "")
                 + "; use a larger slice, or a smaller global batch (another recipe).")
    return "\n".join(lines)
  r = plan["report"]
  if plan["predicted"] and plan["predicted"]["bytes"] is not None:
    p = plan["predicted"]
    lines.append(f"  k={p['microbatches']} (micro-batch {p['microbatch_per_device']}) is "
                 f"predicted at {p['bytes'] / GiB:.2f} GiB by the line through the compiles: "
                 "not compiled")
  flags_text = " ".join([f"--config.{k}={v}" for k, v in plan["overrides"].items()]
                        + [f"--config.optim.microbatches={plan['microbatches']}"])
  m = r["memory"]
  f = r["flops"]
  lines += [
      f"  choose      {flags_text}",
      f"  memory      {m['total_bytes'] / GiB:.2f} of {r['capacity_bytes'] / GiB:.2f} GiB "
      f"per device ({100 * m['fraction_of_capacity']:.0f}%)",
      f"  FLOPs       {f['compiled_per_device']:.3g} per device and step, "
      f"{f['compiled_over_analytic']:.3f} of the analytic count",
      f"  step        {extra['step_seconds'] * 1e3:.0f} ms ({extra['step_source']}"
      + (": compiled FLOPs at peak, a floor" if extra["step_source"] == "FLOP bound" else
         ", an estimate") + f"); {extra['days']:.1f} days to "
      f"{plan['num_train_steps']:,} steps",
      f"  input       {extra['host_images_per_second']:.0f} images/s per host "
      f"({extra['hosts']} host{'s' if extra['hosts'] > 1 else ''}): "
      f"{extra['host_cores_to_decode']:.1f} cores at {extra['decode_images_per_core']:.0f} "
      "images/s per core",
  ]
  return "\n".join(lines)


def main(argv):
  tpu = aot.slice_from_flags(argv, "v5litepod-8")
  config = FLAGS.config
  capacity = None if FLAGS.hbm_gib is None else FLAGS.hbm_gib * GiB
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if FLAGS.json else (
      lambda s: print(s, flush=True))
  try:
    per_device = check(config, tpu)
    if FLAGS.dry_run:
      print(f"Dry run: {tpu.name} has {tpu.num_devices} devices of "
            f"{(capacity or tpu.hbm_bytes_per_device) / GiB:.2f} GiB; batch "
            f"{config.batch_size} is {per_device} per device; the search compiles k = 1 "
            f"first, then up to {FLAGS.max_compiles - 1} more. Nothing was compiled.")
      return
    plan = search(config, tpu, capacity, max_compiles=FLAGS.max_compiles, log=log)
  except ValueError as error:
    sys.exit(f"error: {error}")
  plan.update(global_batch=config.batch_size, num_train_steps=config.num_train_steps,
              topology=tpu.name)
  extra = None
  if plan["fits"]:
    chosen = _with(config, plan["overrides"], plan["microbatches"])
    extra = costs(plan, chosen, tpu, FLAGS.decode_images_per_core)
  plan["costs"] = extra
  if FLAGS.json:
    print(json.dumps(plan))
  else:
    print(format_plan(plan, extra, config_flags.get_config_filename(FLAGS["config"]), tpu))
  if not plan["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  aot.use_compile_only_environment()
  overrides_lib.exit_on_unknown_override()
  define_flags()
  app.run(main)
