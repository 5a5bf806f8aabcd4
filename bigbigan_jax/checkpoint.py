"""Checkpoints in `WORKDIR/checkpoints/<step>` with orbax: the train state, the input
iterator's position (so a resumed run sees the batches the uninterrupted one would have),
and the model config that made them (so a mismatched resume fails before anything runs).

Saves are asynchronous; orbax writes into a temporary folder and renames it when complete, so
a step folder is either whole or absent, and a crash mid-save leaves the last one intact.
"""

from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp
import tensorflow as tf

from bigbigan_jax import config as config_lib

ITEMS = ("state", "data", "meta")
# Fields that change numerics or memory but not what is stored: a run may resume with them
# changed (e.g. turn on rematerialisation to fit a larger batch).
RESUMABLE_MODEL_FIELDS = ("dtype", "remat", "conv_weight_grad")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute: orbax refuses relative paths (--workdir=run1 is fine)."""
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return os.path.join(workdir, "checkpoints")


def _json(value):
  return json.loads(json.dumps(value))


def model_signature(config: ml_collections.ConfigDict) -> dict:
  """The config fields a checkpoint's arrays depend on."""
  model = _json(config.model.to_dict())
  for field in RESUMABLE_MODEL_FIELDS:
    model.pop(field, None)
  return {"model": model}


def _flatten(d, prefix=""):
  for key, value in d.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _manager(workdir: str, *, keep: int = 1, every: int = 1, async_save: bool = True,
             create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=every, create=create,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def read_latest(workdir: str) -> tuple[int | None, dict | None, dict | None]:
  """(step, meta, data position) of the newest checkpoint, or Nones. Writes nothing."""
  if not tf.io.gfile.isdir(checkpoint_dir(workdir)):
    return None, None, None
  manager = _manager(workdir, create=False)  # Only reads: no save, no delete.
  step = manager.latest_step()
  if step is None:
    return None, None, None
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                                                           data=ocp.args.JsonRestore()))
  manager.close()
  return step, restored.meta, restored.data


def check_compatible(workdir: str, config: ml_collections.ConfigDict):
  """Raises ValueError if the workdir's checkpoint was made by a different model config.

  Returns:
    (step, data position) of the checkpoint the run will resume from, or (None, None).
  """
  step, meta, data = read_latest(workdir)
  if step is None:
    return None, None
  wanted = dict(_flatten(model_signature(config)))
  # A field the checkpoint does not know was added later, with the earlier behaviour as its
  # default: the checkpoint was made with the default.
  defaults = dict(_flatten(model_signature(config_lib.base_config())))
  saved = {**{k: v for k, v in defaults.items() if k in wanted},
           **dict(_flatten(meta["signature"]))}
  diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}"
           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  if diffs:
    raise ValueError(
        f"--workdir={workdir} holds a checkpoint (step {step}) of a different model:\n  "
        + "\n  ".join(diffs)
        + "\nUse a new --workdir for this config, or the config that made the checkpoint. "
        "Nothing in the workdir was changed.")
  return step, data


class Checkpoints:
  """Save and restore of (train state, data position, meta) at a step."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    self._signature = model_signature(config)
    self._config_json = config.to_json()
    self._manager = _manager(workdir, keep=config.keep_checkpoints,
                             every=config.checkpoint_every_steps)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once the TPU runtime has signalled preemption (multi-host)."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it started a save."""
    meta = {"signature": self._signature, "config": self._config_json, "step": step}
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state):
    """Restores the train state onto the shardings of `abstract_state` (any device count)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
