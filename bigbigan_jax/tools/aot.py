"""Compiles the trainer's real step for a Cloud TPU slice on any host, and says if it fits.

  python -m bigbigan_jax.tools.aot --config=configs/bigbigan_resnet50.py --topology=v3-128
  python -m bigbigan_jax.tools.aot --config=configs/tiny.py --topology=v4-8 --json
  python -m bigbigan_jax.tools.aot --config=configs/biggan_128.py --topology=v4-64 \
      --config.batch_size=1024 --config.model.remat=False

No TPU is needed: libtpu (`pip install -e '.[tpu]'`) compiles for compile-only devices of
the named topology, the way XLA would on the slice itself. The train state comes from
`jax.eval_shape`, so nothing is allocated; the step is `step_lib.make_train_step`'s, at the
config's global batch, on a mesh over every device of the slice.

Reported, per device unless said otherwise:
  * HBM: arguments, outputs, temporaries and the donated bytes that outputs reuse (aliased);
    total = arguments + outputs + temporaries - aliased, against the device's capacity.
  * FLOPs of one step from the compiled program (XLA's cost analysis is of the per-device
    SPMD program) against `bigbigan_jax.models.flops`' analytic count of what one device should run:
    its share of the batch's work (with remat's recompute when model.remat is on) and of the
    orthogonal regulariser (split over the data axis), plus the spectral-norm work every
    replica repeats.
  * XLA's cost-model time for the step ("optimal_seconds") and the FLOP utilisation it
    implies against the chips' peak bf16 rate: model-FLOP utilisation counts the model's
    FLOPs once per slice (no recompute, no replicated work), hardware utilisation the
    compiled FLOPs. It is the compiler's estimate, not a measurement: use
    `bigbigan_jax.tools.benchmark` on the slice for that.
Exits with status 1 when the step does not fit (XLA reports RESOURCE_EXHAUSTED, or the total
exceeds the capacity) and names the config fields that reduce memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from bigbigan_jax import overrides as overrides_lib
from bigbigan_jax import environment
from bigbigan_jax.models import flops as flops_lib
from bigbigan_jax.models import networks
from bigbigan_jax.tools import tpu_slices
from bigbigan_jax.training import state as state_lib
from bigbigan_jax.training import step as step_lib


def memory_advice(config: ml_collections.ConfigDict, tpu: tpu_slices.TpuSlice) -> list[str]:
  """The config fields (and slice sizes) that lower per-device memory, cheapest first."""
  tips = []
  per_device = config.batch_size // tpu.num_devices
  k = config.optim.microbatches
  more = next((m for m in range(2 * k, per_device + 1) if per_device % m == 0), None)
  if more:
    tips.append(f"--config.optim.microbatches={more}: the same global batch in {more} "
                f"micro-batches of {per_device // more} per device, one optimiser update "
                f"(gradient accumulation; `python -m bigbigan_jax.tools.plan` finds the "
                f"smallest that fits)")
  if config.model.dtype != "bfloat16":
    tips.append("--config.model.dtype=bfloat16: bf16 activations, params and optimiser state "
                "stay float32 (about half the activation memory)")
  if not config.model.remat:
    tips.append("--config.model.remat=True: recompute each residual block in the backward "
                "pass instead of storing its activations (about one more forward of compute)")
  if not config.shard_params:
    tips.append("--config.shard_params=True: split params, EMA and Adam state over the "
                "devices instead of replicating them")
  if per_device > 1:
    gen = tpu_slices.GENERATIONS[tpu.generation]
    bigger = tpu.chips * 2 * (2 if gen.name_counts_cores else 1)
    tips.append(f"a smaller per-device batch (now {per_device}): --config.batch_size="
                f"{config.batch_size // 2}, or keep the global batch on a slice twice as "
                f"large ({tpu.name.split('-')[0].split(':')[0]}-{bigger})")
  return tips


def _resource_exhausted(error: Exception) -> dict | None:
  """XLA's out-of-memory compile error, summarised; None for any other error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  out = {"message": text.strip().splitlines()[0][:500]}
  # e.g. "Ran out of memory in memory space hbm. Used 40.52G of 15.48G hbm."
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  m = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", text)
  if m:
    out["used_bytes"] = float(m.group(1)) * scale[m.group(2)]
    out["limit_bytes"] = float(m.group(3)) * scale[m.group(4)]
  # e.g. "the total memory required for HLO temporaries (48.32G) exceeds available HBM
  # (30.75G)": the temporaries alone, beside the arguments.
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM "
                r"\(([\d.]+)([KMGT])\)", text)
  if m:
    out["temp_bytes"] = float(m.group(1)) * scale[m.group(2)]
    out["limit_bytes"] = float(m.group(3)) * scale[m.group(4)]
  return out


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


def compile_report(config: ml_collections.ConfigDict, tpu: tpu_slices.TpuSlice,
                   capacity_bytes: float | None = None) -> dict:
  """Compiles the train step of `config` for `tpu` and measures it.

  Args:
    config: an experiment config (validated here).
    tpu: the slice, from `parse_slice`.
    capacity_bytes: HBM per device to check against; None takes the table's.

  Returns:
    A JSON-serialisable dict: the slice, the batch split, "memory" (bytes per device),
    "flops", "cost_model", compile times, "fits", and "advice" when it does not fit. When
    XLA runs out of memory compiling, "memory" is None and "error" holds its message.
  """
  model = networks.for_backend(config.model, "tpu")  # "auto" would see this host's CPU.
  nets, mesh, abstract = state_lib.setup(config, tpu_slices.slice_devices(tpu), model=model)
  capacity = tpu.hbm_bytes_per_device if capacity_bytes is None else capacity_bytes

  t0 = time.perf_counter()
  batch = step_lib.batch_spec(config, nets, mesh)
  step = step_lib.make_train_step(nets, config, mesh, abstract)
  lowered = step.lower(abstract, batch)
  lower_s = time.perf_counter() - t0
  argument_bytes = per_device_bytes((abstract, batch))

  analytic = flops_lib.train_step(config)
  n = tpu.num_devices
  k = config.optim.microbatches
  loop = step_lib.microbatch_loop(config.optim, mesh)
  report = {
      "topology": tpu.name, "topology_name": tpu.topology, "chips": tpu.chips,
      "devices": n, "device_kind": mesh.devices.flat[0].device_kind,
      "global_batch": config.batch_size, "per_device_batch": config.batch_size // n,
      "microbatches": k, "microbatch_per_device": config.batch_size // n // k,
      "microbatch_loop": loop if k > 1 else None, "d_steps": config.optim.d_steps, "dtype": config.model.dtype,
      "remat": bool(config.model.remat), "shard_params": bool(config.shard_params),
      "capacity_bytes": capacity, "peak_flops_per_device": tpu.peak_flops_per_device,
      "lower_seconds": lower_s, "argument_bytes": argument_bytes, "error": None,
  }
  if argument_bytes > capacity:
    # The state and batch alone overflow: say so now rather than after minutes of compiling.
    report.update(compile_seconds=0.0, memory=None, flops=None, cost_model=None, fits=False,
                  error={"message": f"the train state and batch alone take "
                                    f"{argument_bytes / tpu_slices.GiB:.3g} GiB per device",
                         "used_bytes": argument_bytes, "limit_bytes": capacity},
                  advice=memory_advice(config, tpu))
    return report
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = _resource_exhausted(e)
    if oom is None:
      raise
    if "used_bytes" not in oom and "temp_bytes" in oom:
      oom["used_bytes"] = argument_bytes + oom["temp_bytes"]  # Outputs alias the state.
    report.update(compile_seconds=time.perf_counter() - t0, memory=None, flops=None,
                  cost_model=None, fits=False, error=oom,
                  advice=memory_advice(config, tpu))
    return report
  report["compile_seconds"] = time.perf_counter() - t0

  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  report["memory"] = {
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes,
      "generated_code_bytes": mem.generated_code_size_in_bytes,
      "peak_bytes": getattr(mem, "peak_memory_in_bytes", None),
      "total_bytes": total,
      "fraction_of_capacity": total / capacity,
      "headroom_fraction": 1 - total / capacity,
  }

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: one per module.
  counted_flops = float(cost.get("flops", 0.0))
  # XLA's cost analysis counts a while loop's body once. With k micro-batches in a scan the
  # body is one micro-batch of every update; what runs once per update outside it is the
  # orthogonal regulariser (this device's share) and element-wise optimiser work (not
  # counted here). So the step runs once + k * (counted - once).
  once = analytic["ortho"] / n
  loop_counted_once = k > 1 and loop == "scan"
  compiled_flops = (once + k * (counted_flops - once)) if loop_counted_once else counted_flops
  # What each device should execute: its share of the batch's work (remat's recompute
  # included) plus the batch-independent work every replica repeats.
  analytic_per_device = ((analytic["model"] + analytic["recompute"] + analytic["ortho"]) / n
                         + analytic["per_replica"])
  # Useful work: the model's FLOPs counted once for the whole slice, no recompute.
  model_per_device = analytic["useful"] / n
  report["flops"] = {
      "compiled_per_device": compiled_flops,
      "cost_analysis_per_device": counted_flops,
      "loop_body_counted_once": loop_counted_once,
      "compiled_global": compiled_flops * n,
      "analytic_model_global": analytic["model"],
      "analytic_recompute_global": analytic["recompute"],
      "analytic_ortho_global": analytic["ortho"],
      "analytic_per_replica": analytic["per_replica"],
      "analytic_per_device": analytic_per_device,
      "model_per_device": model_per_device,
      "compiled_over_analytic": compiled_flops / analytic_per_device,
      "analytic_forward_per_example": {k: analytic[f"{k}_forward"] for k in
                                       ("generator", "encoder", "discriminator")},
  }
  raw_seconds = cost.get("optimal_seconds")
  raw_seconds = None if raw_seconds is None else float(raw_seconds)
  # libtpu's cost model sometimes returns a negative time (seen for v4 programs): no estimate.
  seconds = raw_seconds if raw_seconds is not None and raw_seconds > 0 else None
  if seconds and loop_counted_once:
    # The cost model, too, sees the loop's body once: scale its time by the FLOPs the step
    # runs over those it counted (the same rate for the k - 1 micro-batches it left out).
    seconds *= compiled_flops / counted_flops
  peak = tpu.peak_flops_per_device
  report["cost_model"] = {
      "step_seconds": seconds,
      "optimal_seconds_raw": raw_seconds,
      "model_flops_utilisation": model_per_device / seconds / peak if seconds else None,
      "hardware_flops_utilisation": compiled_flops / seconds / peak if seconds else None,
      "note": "XLA's cost-model estimate for this program, not a measurement"
              + ("; scaled by the FLOPs of the micro-batch loop's k iterations over the one "
                 "it counts" if loop_counted_once else ""),
  }
  report["fits"] = total <= capacity
  report["advice"] = [] if report["fits"] else memory_advice(config, tpu)
  return report


FLAGS = flags.FLAGS


def define_flags():
  """Registers the command-line flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/bigbigan_resnet50.py.",
      lock_config=True)
  flags.DEFINE_string(
      "topology", None, "Cloud TPU type (v3-128, v4-64, v5litepod-16, v5p-128) or a libtpu "
      "topology (v4:2x4x4). v6e is refused with libtpu 0.0.42.1, whose compile for it crashes.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
  flags.DEFINE_float(
      "hbm_gib", None, "Check against this much HBM per device (GiB) instead of the table's, "
      "e.g. to keep a margin for the runtime.")


def _gib(x) -> str:
  return f"{x / tpu_slices.GiB:.2f} GiB"


def format_report(report: dict, config_name: str) -> str:
  """The report as text for a terminal."""
  r = report
  params = "params sharded" if r["shard_params"] else "params replicated"
  lines = [
      f"{config_name} on {r['topology']} ({r['topology_name']}: {r['chips']} chips, "
      f"{r['devices']} devices of {r['device_kind']})",
      f"  batch       global {r['global_batch']}, {r['per_device_batch']} per device"
      + (f" in {r['microbatches']} micro-batches of {r['microbatch_per_device']} "
         f"({r['microbatch_loop']})" if r["microbatches"] > 1 else "")
      + f", {r['d_steps']} D steps; {r['dtype']} activations, remat "
      f"{'on' if r['remat'] else 'off'}, {params}",
  ]
  if r["memory"] is None:
    err = r["error"]
    used = (f": {_gib(err['used_bytes'])} needed of {_gib(err['limit_bytes'])}"
            if "used_bytes" in err else "")
    lines.append(f"  HBM         does NOT fit{used}")
    lines.append(f"              {err['message']}")
  else:
    m = r["memory"]
    lines += [
        f"  HBM/device  arguments {_gib(m['argument_bytes'])} + outputs "
        f"{_gib(m['output_bytes'])} + temporaries {_gib(m['temp_bytes'])} - aliased "
        f"{_gib(m['alias_bytes'])}",
        f"              = {_gib(m['total_bytes'])} of {_gib(r['capacity_bytes'])} "
        f"({100 * m['fraction_of_capacity']:.0f}%, headroom "
        f"{100 * m['headroom_fraction']:.0f}%): {'fits' if r['fits'] else 'does NOT fit'}",
    ]
    f = r["flops"]
    recompute = (f" + remat recompute {f['analytic_recompute_global']:.3g}"
                 if f["analytic_recompute_global"] else "")
    lines.append(
        f"  FLOPs/step  compiled {f['compiled_per_device']:.3g} per device "
        f"(x{r['devices']} = {f['compiled_global']:.3g}); analytic {f['analytic_per_device']:.3g}"
        f" per device (model {f['analytic_model_global']:.3g}{recompute} + orthogonal "
        f"regulariser {f['analytic_ortho_global']:.3g} global / "
        f"{r['devices']} + {f['analytic_per_replica']:.3g} per replica); compiled/analytic "
        f"{f['compiled_over_analytic']:.2f}")
    c = r["cost_model"]
    if c["step_seconds"]:
      lines.append(
          f"  cost model  {c['step_seconds'] * 1e3:.1f} ms/step (XLA's estimate, not a "
          f"measurement): {100 * c['model_flops_utilisation']:.0f}% model-FLOP utilisation, "
          f"{100 * c['hardware_flops_utilisation']:.0f}% of compiled FLOPs, of "
          f"{r['peak_flops_per_device'] / 1e12:.1f} TFLOP/s bf16 peak per device")
    elif c.get("optimal_seconds_raw") is None:
      lines.append("  cost model  no step-time estimate from this XLA version")
    else:
      lines.append(f"  cost model  no usable step-time estimate (XLA's optimal_seconds = "
                   f"{c['optimal_seconds_raw']:.4g})")
  lines.append(f"  compile     lower {r['lower_seconds']:.1f} s, compile "
               f"{r['compile_seconds']:.1f} s on this host")
  if r["advice"]:
    lines.append("  To fit, try (one at a time, cheapest first):")
    lines += [f"    {tip}" for tip in r["advice"]]
  return "\n".join(lines)


def slice_from_flags(argv, example_topology: str) -> tpu_slices.TpuSlice:
  """The checks every compile-for-a-slice tool makes of its flags before compiling anything,
  and the slice; sets JAX to compile the program the trainer runs (fully optimised, afresh).

  Raises:
    app.UsageError: stray arguments, --config or --topology missing, an unknown slice, or a
      generation this libtpu cannot compile for.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None or not FLAGS.topology:
    raise app.UsageError("--config and --topology are required, e.g. "
                         f"--config=configs/bigbigan_resnet50.py --topology={example_topology}")
  try:
    tpu = tpu_slices.parse_slice(FLAGS.topology)
    refuse_crashing_generation(tpu)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  jax.config.update("jax_disable_most_optimizations", False)
  jax.config.update("jax_enable_compilation_cache", False)
  return tpu


def main(argv):
  tpu = slice_from_flags(argv, "v3-128")
  capacity = None if FLAGS.hbm_gib is None else FLAGS.hbm_gib * tpu_slices.GiB
  report = compile_report(FLAGS.config, tpu, capacity)
  if FLAGS.json:
    print(json.dumps(report))
  else:
    print(format_report(report, config_flags.get_config_filename(flags.FLAGS["config"])))
  if not report["fits"]:
    print(f"error: the train step does not fit in {_gib(report['capacity_bytes'])} of HBM per "
          f"device on {tpu.name}; see the advice above" + (" (the \"advice\" field)"
                                                           if FLAGS.json else ""),
          file=sys.stderr)
    sys.exit(1)


# Generations whose compile-only compile kills the process with this libtpu: refused up front
# with the reason, instead of a segmentation fault minutes in. Seen with libtpu 0.0.42.1 and
# jax 0.10.2 (the digits demo at v6e-1).
CRASHING_GENERATIONS = {"v6e": "0.0.42.1"}


def refuse_crashing_generation(tpu: tpu_slices.TpuSlice):
  """Raises ValueError for a generation whose compile crashes with the installed libtpu."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    installed = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return  # The compile itself will say that libtpu is missing.
  if CRASHING_GENERATIONS.get(tpu.generation) == installed:
    raise ValueError(
        f"{tpu.name}: libtpu {installed} crashes (segmentation fault) when it compiles for "
        f"{tpu.generation} on a host without that TPU, so this tool refuses {tpu.generation} "
        "names. Check the fit on the same per-device batch with another generation (e.g. "
        "--topology=v5p-8 or v5litepod-4), or run the tool on a v6e host, or with a libtpu "
        "other than this one.")


def use_compile_only_environment():
  """Set when run as a program (importing this module changes nothing): compile-only TPU
  devices need no TPU runtime, so the CPU platform keeps jax from looking for one, and
  libtpu's host-wide lock must not stop a second compile (or a test) beside this one."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  environment.set_entry_point_defaults()
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")


if __name__ == "__main__":
  use_compile_only_environment()
  overrides_lib.exit_on_unknown_override()
  define_flags()
  app.run(main)
