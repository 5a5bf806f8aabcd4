"""The device mesh and how arrays are laid out on it.

Data parallelism: every batch is split along its example axis over the mesh's "data" axis,
across every device of every host. The train state is replicated, or, with
`config.shard_params`, each parameter and optimiser slot is split over "data" along its
largest divisible dimension (ZeRO-3/FSDP style); XLA gathers what a layer needs on the fly.
Either way the math is the same, and batch statistics are global because the reductions run
on globally sharded arrays inside `jax.jit`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA = "data"


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Builds a Mesh from `config.mesh`, e.g. (("data", -1),); -1 takes the remaining devices.

  Raises:
    ValueError: the axis sizes do not multiply to the device count, or "data" is missing.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  if DATA not in names:
    raise ValueError(f"config.mesh={tuple(mesh_config)} has no {DATA!r} axis; the batch is "
                     f"split over it. Use e.g. config.mesh=(('data', -1),)")
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ValueError(f"config.mesh={tuple(mesh_config)} does not fit {len(devices)} devices: "
                     "give at most one -1 and sizes whose product divides the device count")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh={tuple(mesh_config)} covers {math.prod(sizes)} devices but "
                     f"{len(devices)} are present; use -1 for the data axis")
  return Mesh(mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True),
              names)


def data_size(mesh: Mesh) -> int:
  """The number of shards a batch is split into: the size of the mesh's data axis."""
  if DATA not in mesh.axis_names:
    raise ValueError(f"the mesh needs an axis named {DATA!r}; it has {mesh.axis_names}")
  return mesh.shape[DATA]


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def put_rows(mesh: Mesh, x: np.ndarray, rows: int | None = None) -> jax.Array:
  """Zero-pads `x` to `rows` rows and splits them over the data axis.

  Built from the host array shard by shard, so it also works when the mesh spans hosts
  (every host passes the same array)."""
  pad = (rows or x.shape[0]) - x.shape[0]
  if pad:
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def batched_map(fn: Callable, inputs: Sequence[np.ndarray | None], *, mesh: Mesh, chunk: int,
                row_indices: bool = False):
  """Runs `fn(*chunk_inputs)` over fixed-size chunks of `inputs`, each sharded over the mesh.

  What every evaluation over a dataset does (inference.Model's methods, the evaluators): the
  inputs are cut along axis 0 into chunks of `chunk` rows (a multiple of the data axis), the
  last one zero-padded, so `fn` compiles once. Chunk k+1 is dispatched before chunk k is
  fetched, keeping the devices busy. A None input stays None. With `row_indices`, `fn` also
  gets each row's int32 index within the call. Padding cannot reach real rows as long as `fn`
  mixes no examples (evaluation mode: running BN statistics).

  Returns:
    `fn`'s output pytree as numpy, concatenated over chunks and trimmed to the real rows.
  """
  num = next(x.shape[0] for x in inputs if x is not None)
  if row_indices:
    inputs = (*inputs, np.arange(round_up(max(num, 1), chunk), dtype=np.int32))
  pieces, pending = [], None
  for start in range(0, max(num, 1), chunk):  # An empty call still runs one padded chunk.
    args = [None if x is None else put_rows(mesh, x[start:start + chunk], chunk)
            for x in inputs]
    result = fn(*args)
    if pending is not None:
      pieces.append(jax.device_get(pending))
    pending = result
  pieces.append(jax.device_get(pending))
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:num], *pieces)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Splits the example axis (after `leading_axes` unsplit axes) over "data"."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _param_spec(shape, n: int) -> P:
  """Shards the largest dimension divisible by n; small or indivisible leaves replicate."""
  if n == 1 or not shape or math.prod(shape) < 1024:  # Tiny leaves: not worth a gather.
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return P(*spec)
  return P()


def state_sharding(mesh: Mesh, abstract_state, shard_params: bool = False):
  """NamedShardings for a (abstract) train state: replicated, or sharded over "data"."""
  n = data_size(mesh)

  def leaf(x):
    if not shard_params:
      return replicated(mesh)
    return NamedSharding(mesh, _param_spec(tuple(getattr(x, "shape", ())), n))

  return jax.tree_util.tree_map(leaf, abstract_state)


def sum_of_shares(fn: Callable, mesh: Mesh | None, *args) -> jax.Array:
  """Σ over the data axis's devices of fn(*args, part=i, parts=n): batch-independent work
  split across the replicas instead of repeated by each (inside jit).

  `fn(*args, part=, parts=)` returns device `part`'s share (of `parts`) of a scalar whose
  shares add up to the whole; `args` are replicated. Each device computes its share and the
  shares are summed across devices (its gradient too: autodiff sums the cotangents). On one
  device, or with no mesh, it is fn(*args, part=0, parts=1).
  """
  n = 1 if mesh is None else data_size(mesh)
  if n == 1:
    return fn(*args, part=0, parts=1)

  def share(*local_args):
    return jax.lax.psum(fn(*local_args, part=jax.lax.axis_index(DATA), parts=n), DATA)

  return jax.shard_map(share, mesh=mesh, in_specs=P(), out_specs=P())(*args)


def check_batch_divisible(global_batch: int, mesh: Mesh, microbatches: int = 1) -> None:
  """Raises a ValueError that names the fix when the batch cannot be split evenly: over the
  devices, over the processes that feed it, and, with gradient accumulation, each device's
  share over the micro-batches."""
  n = mesh.devices.size
  per_process = jax.process_count()
  if global_batch % n:
    lower, upper = global_batch // n * n, -(-global_batch // n) * n
    raise ValueError(
        f"config.batch_size={global_batch} is not divisible by the {n} devices it is split "
        f"over; use a multiple of {n} (e.g. --config.batch_size={upper or n}"
        + (f" or {lower}" if lower else "") + ")")
  if global_batch % per_process:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{per_process} processes that each feed a slice of it")
  per_device = global_batch // n
  if per_device % microbatches:
    fits = [k for k in range(1, per_device + 1) if per_device % k == 0]
    raise ValueError(
        f"config.optim.microbatches={microbatches} does not divide the {per_device} examples "
        f"each of the {n} devices holds (config.batch_size={global_batch}): every micro-batch "
        f"takes the same share of every device. Use one of {fits} (e.g. "
        f"--config.optim.microbatches={max(k for k in fits if k <= microbatches)}), or a "
        f"batch_size that is a multiple of {n * microbatches}")
