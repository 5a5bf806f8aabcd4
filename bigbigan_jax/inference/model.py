"""`Model`: a trained G (EMA weights by default), E and D behind TF-Hub-shaped numpy methods.

Every method takes numpy (or jax) arrays of any batch size and returns numpy arrays. A call
is cut into chunks of a fixed size (`batch_size`, rounded up to a multiple of the device
count), the last chunk zero-padded, each chunk sharded over a ("data",) mesh of every
device, and the padding trimmed: one compiled program per method serves every batch size.
Padding cannot leak into real outputs, since in evaluation mode nothing mixes examples: G and
E normalise with running statistics and D has no batch norm.
"""

from __future__ import annotations

from typing import Sequence

import flax.traverse_util
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax.inference import latents
from bigbigan_jax.inference import programs
from bigbigan_jax.models import networks

DEFAULT_BATCH_SIZE = 64


class Model:
  """A trained G (EMA weights by default), E and D behind TF-Hub-shaped numpy methods.

  Build it with `load(workdir)` or `from_state(nets, state, config)`.
  """

  def __init__(self, nets: networks.Networks, config: ml_collections.ConfigDict, *,
               generator_params, generator_state: dict, discriminator_variables: dict,
               encoder_variables: dict | None, step: int, use_ema: bool, mesh: Mesh,
               batch_size: int = DEFAULT_BATCH_SIZE):
    """Wraps arrays that are already on `mesh`'s devices (see `load` and `from_state`).

    Args:
      nets: the networks (`networks.build(config.model)`).
      config: the experiment config.
      generator_params: G's weights (the EMA copy or the trained ones).
      generator_state: G's {"spectral", "batch_stats"}.
      discriminator_variables: D's {"params", "spectral"}.
      encoder_variables: E's {"params", "batch_stats"}, or None for BigGAN.
      step: the training step the weights come from.
      use_ema: whether `generator_params` are the EMA weights (reported, not used).
      mesh: a mesh with a "data" axis; batches are split over it.
      batch_size: examples per compiled call; rounded up to a multiple of the data axis.
    """
    if sharding_lib.DATA not in mesh.axis_names:
      raise ValueError(f"the mesh needs a {sharding_lib.DATA!r} axis; it has {mesh.axis_names}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be positive")
    self._nets, self._config, self._mesh = nets, config, mesh
    self._g_params = generator_params
    self._g_state = dict(generator_state)
    self._checkpoint_batch_stats = self._g_state.get("batch_stats")
    self._d_vars = discriminator_variables
    self._e_vars = encoder_variables
    self._step, self._use_ema = int(step), use_ema
    self._chunk = sharding_lib.round_up(batch_size, sharding_lib.data_size(mesh))
    self._programs = programs.jitted_programs(nets, mesh)

  # --- Properties. ---------------------------------------------------------------------------

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self._config

  @property
  def nets(self) -> networks.Networks:
    return self._nets

  @property
  def mesh(self) -> Mesh:
    return self._mesh

  @property
  def step(self) -> int:
    return self._step

  @property
  def use_ema(self) -> bool:
    return self._use_ema

  @property
  def is_bigbigan(self) -> bool:
    return self._nets.is_bigbigan

  @property
  def resolution(self) -> int:
    """G's output and D's input side."""
    return self._nets.resolution

  @property
  def encoder_resolution(self) -> int:
    """E's input side (= resolution for BigGAN)."""
    return self._nets.encoder_resolution

  @property
  def z_dim(self) -> int:
    return self._nets.z_dim

  @property
  def num_classes(self) -> int:
    """0 for an unconditional G (BigBiGAN)."""
    return self._nets.num_classes

  @property
  def batch_size(self) -> int:
    """Examples per compiled call (a multiple of the data-axis size)."""
    return self._chunk

  @property
  def generator_variables(self) -> dict:
    return {"params": self._g_params, **self._g_state}

  @property
  def discriminator_variables(self) -> dict:
    return self._d_vars

  @property
  def encoder_variables(self) -> dict | None:
    return self._e_vars

  @property
  def batch_stats(self):
    """G's batch-norm statistics that `generate` uses now."""
    return self._g_state["batch_stats"]

  def set_batch_stats(self, stats=None) -> None:
    """Makes `generate` use `stats` (e.g. kept from `standing_stats`), or with None the
    checkpoint's running statistics again."""
    stats = self._checkpoint_batch_stats if stats is None else stats
    expected = jax.tree_util.tree_structure(self._checkpoint_batch_stats)
    if jax.tree_util.tree_structure(stats) != expected:
      raise ValueError("these statistics do not have the structure of this generator's "
                       "batch_stats")
    self._g_state = {**self._g_state, "batch_stats": jax.device_put(
        stats, sharding_lib.replicated(self._mesh))}

  # --- Batching. -----------------------------------------------------------------------------

  def _map(self, fn, inputs: Sequence[np.ndarray | None], row_indices: bool = False):
    """`fn` over `inputs` in chunks of `batch_size` rows (sharding.batched_map)."""
    return sharding_lib.batched_map(fn, inputs, mesh=self._mesh, chunk=self._chunk,
                                    row_indices=row_indices)

  # --- Inputs. -------------------------------------------------------------------------------

  def _latents(self, z) -> np.ndarray:
    z = np.asarray(z, np.float32)
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z has shape {z.shape}; this generator takes (batch, {self.z_dim}): "
                       f"draw it with inference.sample_z(seed, num, model.z_dim)")
    return z

  def _labels(self, labels, num: int) -> np.ndarray | None:
    if not self.num_classes:
      if labels is not None:
        raise ValueError("this generator is unconditional (BigBiGAN): call it without labels")
      return None
    if labels is None:
      raise ValueError(f"this BigGAN is class-conditional: pass labels, ints in "
                       f"[0, {self.num_classes}) (one per example, or a single int)")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == self.num_classes:
      # One-hot rows, as TF-Hub's BigGAN takes them.
      if not (np.all((labels == 0) | (labels == 1)) and np.all(labels.sum(axis=1) == 1)):
        raise ValueError("2-D labels must be one-hot rows; pass class ids for anything else")
      labels = labels.argmax(axis=1)
    if labels.ndim == 0:
      labels = np.full((num,), labels)
    if (labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer)
        or labels.min(initial=0) < 0 or labels.max(initial=0) >= self.num_classes):
      raise ValueError(f"labels must be {num} ints in [0, {self.num_classes}) (or one-hot rows);"
                       f" got shape {labels.shape}, dtype {labels.dtype}")
    return labels.astype(np.int32)

  def _images(self, images, resolutions: Sequence[int], what: str) -> np.ndarray:
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"{what} images must be floats in [-1, 1] (got {images.dtype}); for uint8"
                       " pixels use x / 127.5 - 1")
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1:3] not in [
        (r, r) for r in resolutions]:
      sizes = " or ".join(f"(batch, {r}, {r}, 3)" for r in resolutions)
      raise ValueError(f"{what} takes images of shape {sizes}; got {images.shape}. "
                       "inference.load_images(paths, resolution) crops and resizes files.")
    return images.astype(np.float32)

  def _require_encoder(self, what: str):
    if not self.is_bigbigan:
      raise ValueError(f"{what} needs the encoder, and this checkpoint is a BigGAN (no E); use "
                       "a BigBiGAN workdir (config.model.kind='bigbigan')")

  # --- The TF-Hub signatures. ----------------------------------------------------------------

  def generate(self, z, labels=None, upsample: bool = False) -> np.ndarray:
    """G(z[, labels]) in evaluation mode (G's current `batch_stats`).

    Args:
      z: (N, z_dim) latents, e.g. from `sample_z`.
      labels: class-conditional G only: N class ids, one id for all, or one-hot (N, C).
      upsample: nearest-neighbour upsample to E's resolution (TF-Hub's "upsampled" output).

    Returns:
      float32 (N, R, R, 3) in [-1, 1]; R = `resolution`, or `encoder_resolution` if upsample.
    """
    z = self._latents(z)
    labels = self._labels(labels, z.shape[0])
    program, g_vars = self._programs["generate"], self.generator_variables
    images = self._map(lambda *args: program(g_vars, *args), (z, labels))
    if upsample:
      f = self.encoder_resolution // self.resolution
      images = np.repeat(np.repeat(images, f, axis=1), f, axis=2)
    return images

  def sample(self, num: int, seed: int = 0, truncation: float | None = None,
             method: str = "resample", labels=None, upsample: bool = False) -> np.ndarray:
    """`generate(sample_z(seed, num, ...), labels)`; a class-conditional G without labels
    gets classes drawn uniformly from the seed."""
    z = latents.sample_z(seed, num, self.z_dim, truncation, method)
    if self.num_classes and labels is None:
      labels = np.random.default_rng(seed).integers(0, self.num_classes, num)
    return self.generate(z, labels, upsample=upsample)

  def encode(self, images, seed: int = 0) -> dict[str, np.ndarray]:
    """E(x) in evaluation mode: TF-Hub BigBiGAN's `encode` outputs.

    Args:
      images: float (N, R_E, R_E, 3) in [-1, 1], R_E = `encoder_resolution`.
      seed: the noise of z_sample; example i's noise depends on (seed, i) only.

    Returns:
      numpy float32 dict: z_mean, z_stdev, z_sample (N, z_dim); avepool_feat (N, F);
      bn_crelu_feat (N, 2F).
    """
    self._require_encoder("encode")
    images = self._images(images, (self.encoder_resolution,), "encode")
    program, e_vars = self._programs["encode"], self._e_vars
    key = jax.device_put(jax.random.PRNGKey(seed), sharding_lib.replicated(self._mesh))
    return self._map(lambda x, rows: program(e_vars, x, rows, key), (images,),
                     row_indices=True)

  def reconstruct(self, images, use_sample: bool = True, upsample: bool = False,
                  seed: int = 0) -> np.ndarray:
    """G(E(x)): `generate(encode(images, seed)["z_sample" or "z_mean"])`.

    Returns:
      float32 (N, R, R, 3) in [-1, 1] (E's resolution if upsample).
    """
    self._require_encoder("reconstruct")
    enc = self.encode(images, seed)
    return self.generate(enc["z_sample" if use_sample else "z_mean"], upsample=upsample)

  def discriminate(self, images, z_or_labels):
    """D's scores in evaluation mode.

    Args:
      images: float (N, R, R, 3) in [-1, 1] at G/D's resolution; BigBiGAN also takes E's
        resolution and average-pools it as training does for real images.
      z_or_labels: BigBiGAN: the (N, z_dim) latents paired with the images; BigGAN: labels
        as `generate` takes them.

    Returns:
      BigBiGAN: dict of float32 (N,) arrays s_x, s_z, s_xz; BigGAN: float32 (N,) scores.
    """
    if self.is_bigbigan:
      images = self._images(images, (self.resolution, self.encoder_resolution), "discriminate")
      if images.shape[1] != self.resolution:
        images = np.asarray(networks.pool_for_discriminator(images, self.resolution))
      cond = self._latents(z_or_labels)
      if cond.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {cond.shape[0]} latents")
    else:
      images = self._images(images, (self.resolution,), "discriminate")
      cond = self._labels(z_or_labels, images.shape[0])
    program, d_vars = self._programs["discriminate"], self._d_vars
    return self._map(lambda x, c: program(d_vars, x, c), (images, cond))

  # --- Standing statistics. ------------------------------------------------------------------

  def standing_stats(self, num_batches: int = 100, batch_size: int | None = None,
                     truncation: float | None = None, method: str = "resample",
                     seed: int = 0):
    """Re-estimates G's batch-norm statistics from many G passes on fresh latents.

    The BigGAN paper evaluates with these "standing statistics" rather than the running
    averages of training, re-estimated for each truncation value; after this call `generate`
    uses them (until `set_batch_stats`). Only batch_stats change: G's weights and its
    spectral-norm state are untouched.

    Each pass runs G in training mode on `batch_size` latents drawn like `sample_z`'s (with
    uniform labels for a class-conditional G) and records every layer's batch mean and
    variance. The estimate pools all passes: the mean of the batch means, and the variance of
    every activation seen, i.e. the mean of the batch variances plus the variance of the
    batch means. Averaging the batch variances alone (BigGAN-PyTorch's choice) misses that
    second term, so its estimate would shrink with the batch size used here; pooling gives
    the same statistics whatever the batch size, and equals the former at large batches.

    Args:
      num_batches: G passes.
      batch_size: latents per pass (default: `self.batch_size`); rounded up to a multiple of
        the data-axis size.
      truncation, method: as for `sample_z`.
      seed: the latents' seed.

    Returns:
      The new batch_stats pytree (also installed for `generate`).
    """
    latents.check_truncation(truncation, method)
    if num_batches < 1:
      raise ValueError(f"num_batches={num_batches} must be positive")
    batch = sharding_lib.round_up(batch_size or self._chunk, sharding_lib.data_size(self._mesh))
    program = self._programs["standing_pass"](batch, method, truncation is not None)
    replicated = sharding_lib.replicated(self._mesh)
    key = jax.device_put(jax.random.PRNGKey(seed), replicated)
    t = jax.device_put(np.float32(truncation or 0.0), replicated)
    g_vars = {"params": self._g_params, **self._g_state}
    passes = [program(g_vars, jax.random.fold_in(key, k), t) for k in range(num_batches)]
    passes = [flax.traverse_util.flatten_dict(p) for p in jax.device_get(passes)]
    pooled = {}
    for path in passes[0]:
      if path[-1] != "mean":
        continue
      var_path = path[:-1] + ("var",)
      pooled[path], pooled[var_path] = programs.pooled_moments([p[path] for p in passes],
                                                      [p[var_path] for p in passes])
    stats = flax.traverse_util.unflatten_dict(pooled)
    self.set_batch_stats(stats)
    return self.batch_stats
