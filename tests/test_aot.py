"""The ahead-of-time TPU compile report (`bigbigan_jax.tools.aot`) and the analytic FLOP counts.

The report tests compile the tiny config's real train step (its 16 px `lifecycle` variant, which
compiles in half the time) for a v4-8 slice (4 chips, one megacore device each) with libtpu's
compile-only devices, and the digits demo's for a Colab TPU (v5e-1), through the command line
as a user runs it, in a subprocess: the test process itself is pinned to 8 fake CPU devices.
"""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from bigbigan_jax.models import flops
from bigbigan_jax.tools import tpu_slices


ROOT = pathlib.Path(__file__).resolve().parent.parent
GiB = 2**30


def _libtpu_available() -> bool:
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


needs_libtpu = pytest.mark.skipif(
    not _libtpu_available(),
    reason="libtpu is not installed (pip install -e '.[tpu]'): it compiles for TPU topologies")


def _aot(*args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  return subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.aot", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------------------------------------
# Analytic counts, by hand and against XLA's own count of the same op (no libtpu needed).
# ---------------------------------------------------------------------------------------------


def test_conv_and_dense_counts_by_hand():
  # 3x3 SAME conv, 4 → 16 channels, on 8x8: 8·8 outputs x 16 filters x 3·3·4 MACs, 2 FLOPs
  # per MAC, less the taps on the zero padding: along each axis the 2 edge outputs lose one
  # of their 3 taps, so 3·8 - 2 = 22 of the 24 (output, tap) pairs touch the input.
  assert flops.valid_taps(8, 3) == 22 and flops.valid_taps(8, 1) == 8
  assert flops.valid_taps(4, 3) == 10  # (10/12)² of the naive count at 4x4.
  # 7x7 stride 2 on 16 (ResNet's stem): 8 outputs, padding 2 before and 3 after. Output o
  # reads inputs 2o - 2 .. 2o + 4: output 0 loses 2 taps (-2, -1), output 6 one (16) and
  # output 7 three (16, 17, 18).
  assert flops.valid_taps(16, 7, stride=2) == 8 * 7 - 2 - 1 - 3
  count = flops.Count()
  count.conv(8, 3, 4, 16)
  assert count.per_example == 2 * 22 * 22 * 4 * 16 == 61_952
  count.dense(10, 5, spectral=False)
  assert count.per_example == 61_952 + 2 * 10 * 5
  # Only the conv is spectrally normalised: one power iteration on its (36, 16) matrix is
  # u·Wᵀ, v·W and v·W·uᵀ, 2·36·16 FLOPs each.
  assert count.sn_kernels == [(36, 16)]
  assert count.sn_flops == 3 * 2 * 36 * 16
  # The orthogonal regulariser's Gram matrices WᵀW: (16, 36)@(36, 16) and (5, 10)@(10, 5);
  # for a kernel wider than its fan-in, WWᵀ: (3, 8)@(8, 3).
  assert count.ortho_flops == 2 * 36 * 16 * 16 + 2 * 10 * 5 * 5
  count.dense(3, 8, spectral=False)
  assert count.ortho_flops == 2 * 36 * 16 * 16 + 2 * 10 * 5 * 5 + 2 * 3 * 8 * 3
  # BigGAN attention on 8x8x16: θφᵀ is (64 x 2)@(2 x 16), βg is (64 x 16)@(16 x 8).
  assert flops.attention_matmul_flops(1, 8, 16) == 2 * 64 * 16 * 2 + 2 * 64 * 16 * 8


def test_counts_agree_with_xla_cost_analysis():
  """A FLOP here is what XLA counts: a conv or matmul's multiply-adds count twice."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cost = jax.jit(conv).lower(x, w).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] == flops.conv_flops(2, 8, 8, 3, 4, 16) == 2 * 61_952
  # Strided, with uneven padding: ResNet's 7x7 stride-2 stem.
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((7, 7, 3, 8), jnp.float32)
  strided = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cost = jax.jit(strided).lower(x, w).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] == flops.conv_flops(1, 16, 16, 7, 3, 8, stride=2)
  a = jax.ShapeDtypeStruct((3, 10), jnp.float32)
  b = jax.ShapeDtypeStruct((10, 5), jnp.float32)
  cost = jax.jit(jnp.matmul).lower(a, b).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] == flops.dense_flops(3, 10, 5)


def test_train_step_count_composes_the_networks(load_config):
  config = load_config("tiny.py")
  b, d_steps = config.batch_size, config.optim.d_steps
  count = flops.train_step(config)
  g, e, d = (count[f"{k}_forward"] for k in ("generator", "encoder", "discriminator"))
  # Each D update: G and E forward on B, D forward + backward on 2B; the E/G update: G forward
  # + backward on B, E backward on B (its forward is the last D update's), D forward +
  # input-gradient on 2B.
  assert count["model"] == pytest.approx(
      d_steps * (g * b + e * b + 3 * d * 2 * b) + 3 * g * b + 2 * e * b + 2 * d * 2 * b)
  assert count["per_replica"] > 0 and count["ortho"] > 0
  assert count["useful"] == count["model"] + count["ortho"] + count["per_replica"]
  assert count["recompute"] == 0
  # remat reruns every residual block's forward wherever a backward pass goes through it.
  config.model.remat = True
  blocks = {k: getattr(flops, k)(config.model).in_blocks
            for k in ("generator", "encoder", "discriminator")}
  assert 0 < blocks["generator"] < g and 0 < blocks["discriminator"] < d
  assert flops.train_step(config)["recompute"] == pytest.approx(
      b * (d_steps * 2 * blocks["discriminator"] + blocks["generator"] + blocks["encoder"]
           + 2 * blocks["discriminator"]))


# ---------------------------------------------------------------------------------------------
# The compile report on a TPU topology.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_v4_8():
  """The JSON report of the tiny config's train step compiled for v4-8."""
  result = _aot("--config=configs/tiny.py:lifecycle", "--topology=v4-8", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_tiny_step_compiles_for_v4_8_and_fits(tiny_v4_8):
  r = tiny_v4_8
  # v4-8 counts TensorCores: 4 chips (2x2x1), each one megacore JAX device with 32 GiB.
  assert (r["topology_name"], r["chips"], r["devices"]) == ("v4:2x2x1", 4, 4)
  assert r["device_kind"] == "TPU v4"
  assert (r["global_batch"], r["per_device_batch"]) == (8, 2)
  assert r["capacity_bytes"] == 32 * GiB
  assert r["peak_flops_per_device"] == 275e12
  assert r["fits"] is True and r["error"] is None and r["advice"] == []

  m = r["memory"]
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes"):
    assert m[key] > 0, key
  assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"]
                              - m["alias_bytes"])
  # The state is donated, so the outputs reuse most of its buffers.
  assert 0 < m["alias_bytes"] <= min(m["argument_bytes"], m["output_bytes"])
  assert m["fraction_of_capacity"] == pytest.approx(m["total_bytes"] / r["capacity_bytes"])
  assert m["total_bytes"] < 0.01 * r["capacity_bytes"]

  f = r["flops"]
  assert f["compiled_global"] == pytest.approx(4 * f["compiled_per_device"])
  assert f["analytic_recompute_global"] == 0  # tiny has remat off.
  assert f["analytic_per_device"] == pytest.approx(
      (f["analytic_model_global"] + f["analytic_ortho_global"]) / 4 + f["analytic_per_replica"])
  # At 16 channels element-wise work (batch norm, activations, Adam) is a large share, which
  # the analytic count leaves out; at the paper's widths the two agree within 10%.
  assert 1.0 <= f["compiled_over_analytic"] < 2.0

  c = r["cost_model"]
  assert c["step_seconds"] > 0
  assert 0 < c["model_flops_utilisation"] <= c["hardware_flops_utilisation"] < 1


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_microbatches_in_a_scan_count_the_loop_body_k_times(tiny_v4_8):
  # XLA's cost analysis counts a while loop's body once: the report counts the scan's body
  # k times, so the step's FLOPs match the same batch's without accumulation (2 images a
  # device in 2 micro-batches of 1, against the fixture's 2 at once).
  result = _aot("--config=configs/tiny.py:lifecycle", "--topology=v4-8", "--json",
                "--config.optim.microbatches=2")
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout.strip().splitlines()[-1])
  assert (r["microbatches"], r["microbatch_per_device"], r["microbatch_loop"]) == (2, 1, "scan")
  f, whole = r["flops"], tiny_v4_8["flops"]
  assert f["loop_body_counted_once"] and not whole["loop_body_counted_once"]
  assert f["cost_analysis_per_device"] < 0.7 * f["compiled_per_device"]  # Counted once.
  assert f["compiled_per_device"] == pytest.approx(whole["compiled_per_device"], rel=0.15)
  # Spectral norm runs once per micro-batch, the rest of the analytic count is the same.
  assert f["analytic_per_replica"] == pytest.approx(2 * whole["analytic_per_replica"])
  assert "in 2 micro-batches of 1 (scan)" in aot_text(r)


def aot_text(report):
  from bigbigan_jax.tools import aot  # pylint: disable=g-import-not-at-top
  return aot.format_report(report, "configs/tiny.py:lifecycle")


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_text_report_reads_the_same_numbers(tiny_v4_8):
  from bigbigan_jax.tools import aot  # pylint: disable=g-import-not-at-top
  text = aot.format_report(tiny_v4_8, "configs/tiny.py:lifecycle")
  assert "v4-8 (v4:2x2x1: 4 chips, 4 devices of TPU v4)" in text
  assert "2 per device" in text and ": fits" in text and "of 32.00 GiB" in text


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_unknown_topology_is_a_clear_error():
  from bigbigan_jax.tools import aot  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'.*Known slices"):
    tpu_slices.parse_slice("v9-8")
  with pytest.raises(ValueError, match="counts TensorCores"):
    tpu_slices.parse_slice("v4-6")
  with pytest.raises(ValueError, match="neither a Cloud TPU type"):
    tpu_slices.parse_slice("tpu-big")
  result = _aot("--config=configs/tiny.py", "--topology=v9-8")
  assert result.returncode != 0
  assert "unknown TPU generation 'v9'" in result.stderr
  assert "Known slices" in result.stderr
  # v6e: this libtpu's compile crashes the process, so the name is refused before it.
  v6e = tpu_slices.parse_slice("v6e-1")
  if aot.CRASHING_GENERATIONS.get("v6e") == importlib.metadata.version("libtpu"):
    with pytest.raises(ValueError, match="crashes .segmentation fault. when it compiles for v6e"):
      aot.refuse_crashing_generation(v6e)
  aot.refuse_crashing_generation(tpu_slices.parse_slice("v5litepod-1"))  # Not refused.


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_digits_demo_compiles_and_fits_on_a_colab_tpu():
  # Colab's single-chip TPU runtime (v5e-1): the notebook's path must keep compiling.
  result = _aot("--config=configs/digits.py", "--topology=v5litepod-1", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout.strip().splitlines()[-1])
  assert (r["topology_name"], r["devices"], r["device_kind"]) == ("v5e:1x1", 1, "TPU v5 lite")
  assert r["per_device_batch"] == 32 and r["fits"] is True
  assert r["memory"]["total_bytes"] < 0.05 * r["capacity_bytes"]
  assert 0.9 < r["flops"]["compiled_over_analytic"] < 1.5
  assert r["cost_model"]["step_seconds"] > 0


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_step_too_big_for_hbm_fails_with_advice():
  # 1 MiB of HBM per device: the train state alone overflows it, found before compiling.
  result = _aot("--config=configs/tiny.py", "--topology=v4-8", "--json", "--hbm_gib=0.001")
  assert result.returncode == 1, result.stderr[-3000:]
  r = json.loads(result.stdout.strip().splitlines()[-1])
  assert r["fits"] is False and r["memory"] is None
  assert r["error"]["used_bytes"] > r["error"]["limit_bytes"] == 0.001 * GiB
  advice = "\n".join(r["advice"])
  for knob in ("--config.optim.microbatches=2", "--config.model.dtype=bfloat16", "--config.model.remat=True",
               "--config.shard_params=True", "--config.batch_size=4", "v4-16"):
    assert knob in advice, knob
  assert "does not fit" in result.stderr


def test_out_of_memory_compile_error_is_summarised():
  from bigbigan_jax.tools import aot  # pylint: disable=g-import-not-at-top
  error = RuntimeError(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
      "hbm. Used 40.52G of 15.48G hbm. Exceeded hbm capacity by 25.04G.\n\nTotal hbm usage")
  oom = aot._resource_exhausted(error)  # pylint: disable=protected-access
  assert oom["message"].startswith("RESOURCE_EXHAUSTED")
  assert oom["used_bytes"] == pytest.approx(40.52 * GiB)
  assert oom["limit_bytes"] == pytest.approx(15.48 * GiB)
  # libtpu's other wording (v4, v5e): the temporaries alone, against the HBM it leaves free.
  oom = aot._resource_exhausted(RuntimeError(  # pylint: disable=protected-access
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (48.32G) exceeds available HBM (30.75G)."))
  assert oom["temp_bytes"] == pytest.approx(48.32 * GiB)
  assert oom["limit_bytes"] == pytest.approx(30.75 * GiB)
  assert aot._resource_exhausted(ValueError("shapes differ")) is None  # pylint: disable=protected-access


def test_importing_aot_defines_no_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  from bigbigan_jax.tools import \
      aot  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  assert "topology" not in flags.FLAGS and "hbm_gib" not in flags.FLAGS
