"""Checkpoints in `WORKDIR/checkpoints/<step>` with orbax: the train state, the input
iterator's position (so a resumed run sees the batches the uninterrupted one would have),
and the model config that made them (so a mismatched resume fails before anything runs).

Saves are asynchronous; orbax writes into a temporary folder and renames it when complete, so
a step folder is either whole or absent, and a crash mid-save leaves the last one intact.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as std_logging
import math
import os
import sys
import tempfile
import time
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from bigbigan_jax import config as config_lib
from bigbigan_jax import storage
from bigbigan_jax.reporting import curves

ITEMS = ("state", "data", "meta")
# Fields that change numerics or memory but not what is stored: a run may resume with them
# changed (e.g. turn on rematerialisation to fit a larger batch).
RESUMABLE_MODEL_FIELDS = ("dtype", "remat", "conv_weight_grad", "resample_convs")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute: orbax refuses relative paths (--workdir=run1 is fine)."""
  return storage.join(storage.absolute(workdir), "checkpoints")


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


# Orbax's default splits every replicated array into one slice per replica ("replica-parallel"
# saving), so that hosts share the writing. Each slice is an eager device op compiled for its
# shape, which for the many small arrays of a GAN's state costs far more than it saves: the
# tiny config's state (575 arrays, all under 1 MiB) on 8 CPU devices took 57 s to save the
# first time in a process and 3.4 s before each later save could go asynchronous, against
# 0.8 s and 0.2-0.7 s with each small array written whole by its first replica. Arrays whose
# slices would still be this large keep the split.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4 * 2**20
_ARRAY_HANDLER_SET = False


def _use_array_handler():
  """Registers orbax's jax.Array handler with that threshold, once per process (orbax's
  registry is process-wide; this runs when a manager is made, never at import)."""
  global _ARRAY_HANDLER_SET
  if _ARRAY_HANDLER_SET:
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  # Orbax warns that the handler is overridden, which is the point here: nothing to act on.
  quiet = _DropMessages("Type handler registry")
  logging.get_absl_logger().addFilter(quiet)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
        # The default handler's per-array metadata (shardings) is kept as it was.
        array_metadata_store=getattr(current, "_array_metadata_store", None)), override=True)
  finally:
    logging.get_absl_logger().removeFilter(quiet)
  _ARRAY_HANDLER_SET = True


class _DropMessages(std_logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.prefix)


def _manager(workdir: str, *, keep: int = 1, every: int = 1, async_save: bool = True,
             create: bool = True) -> ocp.CheckpointManager:
  _use_array_handler()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=every, create=create,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def read_latest(workdir: str) -> tuple[int | None, dict | None, dict | None]:
  """(step, meta, data position) of the newest checkpoint, or Nones. Writes nothing."""
  if not storage.isdir(checkpoint_dir(workdir)):
    return None, None, None
  manager = _manager(workdir, create=False)  # Only reads: no save, no delete.
  step = manager.latest_step()
  if step is None:
    return None, None, None
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                                                           data=ocp.args.JsonRestore()))
  manager.close()
  return step, restored.meta, restored.data


def _signature_diffs(meta: dict, config: ml_collections.ConfigDict) -> list[str]:
  wanted = dict(_flatten(model_signature(config)))
  # A field the checkpoint does not know was added later, with the earlier behaviour as its
  # default: the checkpoint was made with the default.
  defaults = dict(_flatten(model_signature(config_lib.base_config())))
  saved = {**{k: v for k, v in defaults.items() if k in wanted},
           **dict(_flatten(meta["signature"]))}
  return [f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}"
          for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


def _refuse_other_model(workdir: str, step: int, diffs: list[str]):
  raise ValueError(
      f"--workdir={workdir} holds a checkpoint (step {step}) of a different model:\n  "
      + "\n  ".join(diffs)
      + "\nUse a new --workdir for this config, or the config that made the checkpoint. "
      "Nothing in the workdir was changed.")


def check_compatible(workdir: str, config: ml_collections.ConfigDict):
  """Raises ValueError if the workdir's checkpoint was made by a different model config.

  Returns:
    (step, data position) of the newest checkpoint, or (None, None).
  """
  step, meta, data = read_latest(workdir)
  if step is None:
    return None, None
  diffs = _signature_diffs(meta, config)
  if diffs:
    _refuse_other_model(workdir, step, diffs)
  return step, data


def _describe(error: Exception) -> str:
  text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


# What orbax's event-loop callbacks print, from several threads at once, after a restore
# failed on damaged files: one "Event loop is closed" traceback per unreadable chunk.
_NOISE = ("Traceback (most recent call last):", "asyncio/base_events.py", "_check_closed()",
          "Event loop is closed")


class _FailedReadTasks(std_logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's reads of a damaged step.

  asyncio logs it when the garbage collector reaches such a task, which may be long after the
  restore; the warning of `restore_newest_intact` has already named the step and the error.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ("Task exception was never retrieved" in text and "async_deserialize" in text)


_FAILED_READS = _FailedReadTasks()


@contextlib.contextmanager
def _stderr_filtered(noisy: Callable[[], bool]):
  """Passes on what is written to stderr inside `with`; if `noisy()` says a restore failed,
  less the lines of that noise (the error itself says what is wrong, in one line)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      if noisy():
        std_logging.getLogger("asyncio").addFilter(_FAILED_READS)  # Added once: a set.
        time.sleep(0.5)  # The last callbacks of a failed read.
        gc.collect()  # Its abandoned tasks, while stderr is still held.
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      lines = held.read().decode(errors="replace").splitlines(keepends=True)
      if noisy():
        lines = [line for line in lines if not any(n in line for n in _NOISE)]
      sys.stderr.write("".join(lines))
      sys.stderr.flush()


def damaged_dir(workdir: str) -> str:
  """Where damaged steps are moved: beside checkpoints/, so orbax no longer lists them."""
  return os.path.join(os.path.dirname(checkpoint_dir(workdir)), "damaged_checkpoints")


def restore_newest_intact(workdir: str, config: ml_collections.ConfigDict, abstract_state):
  """Restores the newest checkpoint that reads back whole, for resuming training.

  A step whose files were truncated or partly deleted after it was written (a disk error, a
  partial copy between buckets) fails to read: the run falls back to the newest step older
  than it that reads, and the damaged ones are moved to WORKDIR/damaged_checkpoints/ (so the
  resumed run can save those step numbers again) with a warning. Nothing is deleted.

  Returns:
    (step, train state on `abstract_state`'s shardings, data position), or Nones if the
    workdir has no checkpoint.

  Raises:
    ValueError: the newest readable checkpoint is of a different model, or no step reads
      back (then nothing is moved).
  """
  if not storage.isdir(checkpoint_dir(workdir)):
    return None, None, None
  manager = _manager(workdir, create=False)  # Only reads: no save, no delete.
  damaged = []
  found = (None, None, None)
  try:
    with _stderr_filtered(lambda: bool(damaged)):
      for step in sorted(manager.all_steps(), reverse=True):
        try:
          small = manager.restore(step, args=ocp.args.Composite(
              meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        except Exception as error:  # pylint: disable=broad-except
          damaged.append((step, error))
          continue
        diffs = _signature_diffs(small.meta, config)
        if diffs:
          _refuse_other_model(workdir, step, diffs)
        try:
          state = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state))).state
        except Exception as error:  # pylint: disable=broad-except
          damaged.append((step, error))
          continue
        found = (step, state, small.data)
        break
  finally:
    manager.close()
  if not damaged:
    return found
  listing = "\n  ".join(f"step {step}: {_describe(error)}" for step, error in damaged)
  if found[0] is None:
    raise ValueError(
        f"no checkpoint in {checkpoint_dir(workdir)} reads back whole:\n  {listing}\n"
        "Restore those step folders from a copy, or move checkpoints/ away to start from "
        "scratch. Nothing was changed.")
  if jax.process_index() == 0:
    for step, _ in damaged:
      target = storage.join(damaged_dir(workdir), str(step))
      while storage.exists(target):
        target += "_again"
      storage.move(storage.join(checkpoint_dir(workdir), str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("bigbigan_jax: damaged checkpoints moved")
  logging.warning(
      "Damaged checkpoint(s) in %s, moved to %s (nothing deleted):\n  %s\nResuming from step "
      "%d, the newest that reads back whole.", checkpoint_dir(workdir), damaged_dir(workdir),
      listing, found[0])
  return found


def steps_to_keep(steps, *, latest: int, every: int = 0, best: int = 0,
                  results: dict[int, float] | None = None, mode: str = "max") -> set[int]:
  """Which checkpoint steps stay: the newest `latest`; every multiple of `every` (> 0); and
  the `best` best by `results` ({step: metric}, lower is better for mode "min", higher for
  "max"). A NaN result is never among the best; of equal results the earlier step ranks
  first (it was there first, and the order does not depend on when pruning runs)."""
  steps = sorted(set(steps))
  keep = set(steps[-latest:]) if latest > 0 else set()
  if every > 0:
    keep |= {s for s in steps if s % every == 0}
  if best > 0 and results:
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted((sign * float(v), s) for s, v in results.items()
                    if s in steps and math.isfinite(float(v)))
    keep |= {s for _, s in ranked[:best]}
  return keep


def read_results(workdir: str, metric: str) -> dict[int, float]:
  """{step: value} of `metric` in WORKDIR/eval/step_*.json (what the evaluators wrote)."""
  if not metric:
    return {}
  return {step: float(results[metric]) for step, results in curves.read_results(workdir)
          if metric in results}


class Checkpoints:
  """Save and restore of (train state, data position, meta) at a step, and which steps stay.

  Kept: the newest `config.keep_checkpoints`, every multiple of `config.keep_every_steps`
  (permanent snapshots), and the `config.keep_best` best by `config.keep_best_metric` among
  the evaluation results `record`ed (and those found in WORKDIR/eval/ when the run resumes).
  Every other step is deleted when a newer save starts or a result arrives. The policy is
  applied here rather than by orbax's rotation, so that a result that arrives after its
  step was saved (the trainer evaluates after saving) can still keep that step.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    self._signature = model_signature(config)
    self._config_json = config.to_json()
    self._manager = _manager(workdir, keep=None, every=config.checkpoint_every_steps)
    self._policy = dict(latest=config.keep_checkpoints, every=config.keep_every_steps,
                        best=config.keep_best, mode=config.keep_best_mode)
    self._metric = config.keep_best_metric if config.keep_best else ""
    self._results = read_results(workdir, self._metric)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it started a save."""
    if not (force or self._manager.should_save(step)):
      return False
    self._manager.wait_until_finished()  # The previous save, before counting the steps.
    self._prune(also=step)
    meta = {"signature": self._signature, "config": self._config_json, "step": step}
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def record(self, step: int, results: dict[str, float]):
    """An evaluation's results at `step` (a saved step): may keep it, or free a worse one."""
    if self._metric and self._metric in results:
      self._results[step] = float(results[self._metric])
      self._manager.wait_until_finished()
      self._prune()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def kept_best(self) -> list[int]:
    """The steps kept for their result, best first."""
    steps = self._manager.all_steps()
    best = steps_to_keep(steps, latest=0, best=self._policy["best"], results=self._results,
                         mode=self._policy["mode"])
    sign = 1.0 if self._policy["mode"] == "min" else -1.0
    return sorted(best, key=lambda s: (sign * self._results[s], s))

  def _prune(self, also: int | None = None):
    steps = list(self._manager.all_steps())
    keep = steps_to_keep(steps + ([] if also is None else [also]), results=self._results,
                         **self._policy)
    for step in steps:
      if step not in keep:
        self._manager.delete(step)

  def restore(self, step: int, abstract_state):
    """Restores the train state onto the shardings of `abstract_state` (any device count)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
