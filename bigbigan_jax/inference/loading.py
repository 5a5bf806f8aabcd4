"""Making a `Model`: from a workdir's checkpoint (`load`) or an in-memory train state
(`from_state`); and reading image files to encode.
"""

from __future__ import annotations

import io
import json
from typing import Any, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from bigbigan_jax import config as config_lib
from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax import storage
from bigbigan_jax.data import sources
from bigbigan_jax.inference import model as model_lib
from bigbigan_jax.models import networks
from bigbigan_jax.models.networks import D
from bigbigan_jax.models.networks import E
from bigbigan_jax.models.networks import G
from bigbigan_jax.training import checkpoint as checkpoint_lib
from bigbigan_jax.training import state as state_lib


def _state_mesh(state) -> Mesh | None:
  for leaf in jax.tree_util.tree_leaves(state.params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding_lib.DATA in sharding.mesh.axis_names:
      return sharding.mesh
  return None


def from_state(nets: networks.Networks, state: Any, config: ml_collections.ConfigDict, *,
               use_ema: bool = True, batch_size: int = model_lib.DEFAULT_BATCH_SIZE,
               mesh: Mesh | None = None) -> model_lib.Model:
  """Wraps an in-memory `state_lib.TrainState` (no copy, no checkpoint).

  The Model holds the state's arrays. The trainer donates its state to the next train step,
  which frees them: build a fresh Model from each state you evaluate (cheap: compiled
  programs are shared by Models of the same networks and mesh).

  Args:
    nets: the networks the state belongs to.
    state: a TrainState (params, model_state, ema_params, step).
    config: the experiment config.
    use_ema: G's EMA weights (True, what evaluation uses) or the trained ones.
    batch_size: examples per compiled call.
    mesh: where batches are split; default: the mesh of the state's arrays, else every device.

  Returns:
    A Model.
  """
  mesh = mesh or _state_mesh(state) or sharding_lib.make_mesh(((sharding_lib.DATA, -1),))
  variables = lambda name: {"params": state.params[name], **state.model_state[name]}
  return model_lib.Model(
      nets, config,
      generator_params=state.ema_params if use_ema else state.params[G],
      generator_state=state.model_state[G], discriminator_variables=variables(D),
      encoder_variables=variables(E) if nets.is_bigbigan else None,
      step=int(jax.device_get(state.step)), use_ema=use_ema, mesh=mesh, batch_size=batch_size)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `workdir`, ascending (orbax's listing: a step
  is written under a temporary name and renamed when complete, so partial ones are left out)."""
  directory = checkpoint_lib.checkpoint_dir(workdir)
  if not storage.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def read_config(workdir: str, step: int | None = None
                ) -> tuple[int, ml_collections.ConfigDict]:
  """(step, experiment config) of a workdir's checkpoint, without restoring any array.

  The config comes from the newest checkpoint's metadata; every checkpoint of a workdir has
  the same model (the trainer refuses to resume with another).

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    ValueError: there is no checkpoint at `step`.
  """
  latest, meta, _ = checkpoint_lib.read_latest(workdir)
  if latest is None:
    raise FileNotFoundError(
        f"no checkpoint in {checkpoint_lib.checkpoint_dir(workdir)}: point --workdir at the "
        "directory of a training run (it holds checkpoints/<step>/), or train one first with "
        f"`python -m bigbigan_jax.main --config=configs/digits.py --workdir={workdir}`")
  if step is not None and step != latest:
    steps = checkpoint_steps(workdir)
    if step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {checkpoint_lib.checkpoint_dir(workdir)}"
                       f"; it has steps {steps}. Pass one of them, or none for the newest.")
  config = config_lib.with_defaults(json.loads(meta["config"]))
  return latest if step is None else step, config


def load(workdir: str, step: int | None = None, *, use_ema: bool = True,
         batch_size: int = model_lib.DEFAULT_BATCH_SIZE, mesh: Mesh | None = None) -> model_lib.Model:
  """Restores a training workdir's checkpoint for inference.

  What inference uses (G's EMA or trained weights, G's state, D, E) is replicated over the
  mesh, whatever mesh and device count training used; the rest of the train state is read
  split over the devices and dropped.

  Args:
    workdir: the directory given to `bigbigan_jax.main --workdir` (local or gs://).
    step: the checkpoint's step; None for the newest.
    use_ema: G's EMA weights (default: what the papers evaluate) or the trained ones.
    batch_size: examples per compiled call.
    mesh: default: every device on one "data" axis.

  Returns:
    A Model.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    ValueError: no checkpoint at `step`.
  """
  step, config = read_config(workdir, step)
  nets = networks.build(config.model)
  mesh = mesh or sharding_lib.make_mesh(((sharding_lib.DATA, -1),))
  restore_config = ml_collections.ConfigDict(config.to_dict())
  restore_config.shard_params = False  # Replicated: inference wants every weight everywhere.
  abstract = state_lib.abstract_train_state(nets, restore_config, mesh)

  def spread(tree):
    # Orbax's StandardRestore reads every leaf, so what inference does not use (optimiser
    # states, the other copy of G) is restored split over the devices, then dropped.
    shardings = sharding_lib.state_sharding(mesh, tree, shard_params=True)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

  params = dict(abstract.params)
  if use_ema:
    params[G] = spread(params[G])
  abstract = abstract.replace(
      params=params, ema_params=abstract.ema_params if use_ema else spread(abstract.ema_params),
      opt_d=spread(abstract.opt_d), opt_ge=spread(abstract.opt_ge))
  ckpt = checkpoint_lib.Checkpoints(workdir, restore_config)
  try:
    state = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return from_state(nets, state, config, use_ema=use_ema, batch_size=batch_size, mesh=mesh)


def image_files(paths: Sequence[str]) -> list[str]:
  """Expands folders (their images, sorted, not recursive) and checks that files exist.

  Raises:
    FileNotFoundError: a path does not exist, or a folder has no images.
  """
  files = []
  for path in paths:
    if storage.isdir(path):
      found = [storage.join(path, n) for n in storage.listdir(path)
               if n.lower().endswith(sources.IMAGE_EXTENSIONS)]
      if not found:
        raise FileNotFoundError(f"{path} has no images (files ending in "
                                f"{', '.join(sources.IMAGE_EXTENSIONS)})")
      files += found
    elif storage.exists(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"no such image file or folder: {path}")
  return files


def load_images(paths: Sequence[str], resolution: int) -> np.ndarray:
  """Reads image files (or folders of them) as E's input.

  Each image becomes RGB, is cropped to its largest centred square, and resized to
  resolution x resolution with bicubic (antialiased) interpolation.

  Returns:
    float32 (N, resolution, resolution, 3) in [-1, 1].

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: a file is not an image PIL can decode.
  """
  out = []
  for path in image_files(paths):
    data = storage.read_bytes(path)
    try:
      image = Image.open(io.BytesIO(data))
      image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image".
      raise ValueError(f"cannot read {path} as an image ({error}); pass PNG, JPEG, BMP or GIF "
                       "files, or a folder of them") from error
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.BICUBIC)
    out.append(np.asarray(image, np.float32) / 127.5 - 1.0)
  return np.stack(out)
