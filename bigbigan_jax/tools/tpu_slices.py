"""Cloud TPU slices: their names, generations, chip figures, and libtpu's compile-only devices.

`parse_slice("v3-128")` reads a Cloud accelerator type (or a libtpu topology name such as
"v4:2x2x2"); `slice_devices` gives the compile-only devices that `tools.aot` compiles for.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: how its Cloud names count, its JAX devices, and a chip's figures.

  Attributes:
    topology_prefix: the generation in libtpu's topology names ("v5e:4x4").
    name_counts_cores: Cloud names count TensorCores (v2-v5p: "v3-8" is 4 chips), not chips
      (v5e, v6e: "v6e-8" is 8 chips).
    devices_per_chip: JAX devices per chip: v2 and v3 expose each of their 2 TensorCores; v4
      and v5p run their 2 as one "megacore" device; v5e and v6e have one TensorCore.
    mesh_dims: 2 (2D torus) or 3 (3D torus/mesh) chip coordinates.
    chip_config: libtpu's chip configuration ("megacore" fuses a chip's two cores).
    hbm_gib: HBM per chip (GiB).
    peak_tflops: peak bf16 dense TFLOP/s per chip.
  """

  topology_prefix: str
  name_counts_cores: bool
  devices_per_chip: int
  mesh_dims: int
  chip_config: str
  hbm_gib: float
  peak_tflops: float


# Per-chip figures from cloud.google.com/tpu/docs/{v3,v4,v5e,v5p,v6e} ("Peak compute per
# chip", "HBM capacity"); v2 (not in its page's table) from the TPU v2/v3 paper, Jouppi et al.,
# "A Domain-Specific Supercomputer for Training Deep Neural Networks" (CACM 2020):
# 16 GiB and 45 TFLOP/s per chip. Device counts checked against libtpu's compile-only
# topologies (see `slice_devices`).
GENERATIONS = {
    "v2": Generation("v2", True, 2, 2, "default", 16, 45),
    "v3": Generation("v3", True, 2, 2, "default", 32, 123),
    "v4": Generation("v4", True, 1, 3, "megacore", 32, 275),
    "v5p": Generation("v5p", True, 1, 3, "megacore", 95, 459),
    "v5e": Generation("v5e", False, 1, 2, "default", 16, 197),
    "v6e": Generation("v6e", False, 1, 2, "default", 32, 918),
}

ALIASES = {"v5litepod": "v5e"}  # Cloud's accelerator type for v5e.


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A slice to compile for, as libtpu names it, with per-device capacity and peak."""

  name: str  # As given, e.g. "v3-128".
  generation: str  # Key of GENERATIONS.
  shape: tuple  # Chips along each torus axis.
  devices_per_chip: int
  chip_config: str
  hbm_bytes_per_device: float
  peak_flops_per_device: float

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def num_devices(self) -> int:
    return self.chips * self.devices_per_chip

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. "v4:2x4x4"."""
    prefix = GENERATIONS[self.generation].topology_prefix
    return f"{prefix}:{'x'.join(str(d) for d in self.shape)}"


def _chip_shape(chips: int, dims: int) -> tuple:
  """The slice shape Cloud TPU gives a power-of-two chip count: each doubling doubles the
  last of the smallest axes (v4: 4 → 2x2x1, 8 → 2x2x2, 32 → 2x4x4, 64 → 4x4x4; 2D:
  64 → 8x8, 128 → 8x16)."""
  shape = [1] * dims
  if dims == 3:  # The smallest 3D slice is one host's 2x2x1 chips.
    shape, chips = [2, 2, 1], chips // 4
  while chips > 1:
    smallest = min(shape)
    axis = max(i for i, s in enumerate(shape) if s == smallest)
    shape[axis] *= 2
    chips //= 2
  return tuple(shape)


def _usage(message: str):
  names = ("v2-8 .. v2-512, v3-8 .. v3-2048, v4-8 .. v4-4096, v5p-8 ..., v5litepod-N or "
           "v5e-N (N = 1, 4, 8, .., 256), v6e-N; or a libtpu topology such as v4:2x4x4")
  raise ValueError(f"{message}. Known slices: {names}")


def parse_slice(name: str) -> TpuSlice:
  """Maps a Cloud TPU accelerator type ("v3-128", "v5litepod-16") or a libtpu topology
  ("v4:2x4x4") to the slice to compile for.

  Raises:
    ValueError: an unknown generation, or a size that is not a Cloud slice of it.
  """
  m = re.fullmatch(r"(v\d[a-z]*)(?::(\d+(?:x\d+)*)|-(\d+))", name.strip().lower())
  if not m:
    _usage(f"--topology={name!r} is neither a Cloud TPU type like v3-128 nor a topology like "
           "v4:2x4x4")
  gen_name = ALIASES.get(m.group(1), m.group(1))
  if gen_name == "v5" and m.group(2):
    gen_name = "v5p"  # libtpu spells v5p topologies "v5:2x2x1" too.
  if gen_name not in GENERATIONS:
    _usage(f"--topology={name!r}: unknown TPU generation {m.group(1)!r}")
  gen = GENERATIONS[gen_name]
  if m.group(2):
    shape = tuple(int(d) for d in m.group(2).split("x"))
    if len(shape) != gen.mesh_dims:
      _usage(f"--topology={name!r}: {gen_name} slices have {gen.mesh_dims} axes")
  else:
    n = int(m.group(3))
    chips = n // 2 if gen.name_counts_cores else n
    smallest = 4 if gen.mesh_dims == 3 or gen.name_counts_cores else 1
    if (gen.name_counts_cores and n % 2) or chips < smallest or chips & (chips - 1):
      counted = "TensorCores (2 per chip)" if gen.name_counts_cores else "chips"
      _usage(f"--topology={name!r}: {m.group(1)}-N counts {counted}; this tool knows the "
             f"power-of-two slices of at least {smallest} chips (give other shapes as a "
             "topology, e.g. v4:4x4x12)")
    shape = _chip_shape(chips, gen.mesh_dims)
  return TpuSlice(
      name=name, generation=gen_name, shape=shape, devices_per_chip=gen.devices_per_chip,
      chip_config=gen.chip_config,
      hbm_bytes_per_device=gen.hbm_gib * GiB / gen.devices_per_chip,
      peak_flops_per_device=gen.peak_tflops * 1e12 / gen.devices_per_chip)


def slice_devices(tpu: TpuSlice) -> list:
  """libtpu's compile-only devices of the slice; checks their count against the table.

  libtpu's own default for v4 is one JAX device per TensorCore (v4:2x2x2 gives 16 devices of
  one core each); Cloud TPU v4 VMs run each chip's two cores as one megacore device, which is
  what `chip_config_name="megacore"` gives (8 devices of 2 cores). v5p defaults to megacore;
  v2/v3 have one device per core, v5e/v6e one core per chip.
  """
  if "tpu" not in (jax.config.jax_platforms or "").lower():
    # No TPU runtime here. Give libtpu what it would look up in a TPU VM's metadata server
    # (it logs errors about not finding it otherwise); compile-only devices do not use it.
    gen = GENERATIONS[tpu.generation]
    cloud = "v5litepod" if tpu.generation == "v5e" else tpu.generation
    count = tpu.chips * (2 if gen.name_counts_cores else 1)
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", f"{cloud}-{count}"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
      os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  host = tuple(min(2, d) for d in tpu.shape[:2]) + (1,)  # 2x2x1 chips per host (or fewer).
  kwargs = dict(chip_config_name=tpu.chip_config, chips_per_host_bounds=host)
  if len(tpu.shape) == 3 and all(d % 4 == 0 for d in tpu.shape):
    kwargs["wrap"] = (True, True, True)  # v4/v5p slices of whole 4x4x4 cubes are tori.
  devices = topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu",
                                         **kwargs).devices
  if len(devices) != tpu.num_devices:
    raise RuntimeError(f"libtpu gives {len(devices)} devices for {tpu.topology}, the table "
                       f"expects {tpu.num_devices} ({tpu.chips} chips x "
                       f"{tpu.devices_per_chip}); fix GENERATIONS in {__file__}")
  return list(devices)
