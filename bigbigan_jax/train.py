"""Training, from the top: the loop that ties the train step, the evaluators and checkpoint
keeping together, above both `training/` and `evaluation/` (as big_vision's train.py sits
above its evaluators), so every import of the package points down.

`check` is the trainer's `--dry_run`; `train_and_evaluate` trains (or resumes) up to
`config.num_train_steps`, saving on preemption and stopping at the first non-finite loss with
the last good checkpoint intact.
"""

from __future__ import annotations


from absl import logging
import jax
import ml_collections

from bigbigan_jax import storage
from bigbigan_jax.data import pipeline
from bigbigan_jax.evaluation import evaluators as evaluators_lib
from bigbigan_jax.reporting import curves
from bigbigan_jax.reporting import metric_writer
from bigbigan_jax.training import checkpoint as checkpoint_lib
from bigbigan_jax.training import collapse
from bigbigan_jax.training import faults
from bigbigan_jax.training import loop
from bigbigan_jax.training import objectives
from bigbigan_jax.training import state as state_lib
from bigbigan_jax.training import step as step_lib


def check(config: ml_collections.ConfigDict, workdir: str):
  """`--dry_run`: what `prepare` checks, without restoring or writing anything."""
  state_lib.setup(config)
  _, data_state = checkpoint_lib.check_compatible(workdir, config)
  pipeline.create_input_iter(config, split=config.data.train_split, start_state=data_state,
                             train=True)
  evaluators_lib.build(config, workdir, skip_unavailable=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains (or resumes training) in `workdir` up to config.num_train_steps.

  The workdir receives checkpoints/ (orbax), tensorboard/ (event files), samples/ (EMA G at
  fixed z) and, for BigBiGAN, reconstructions/ (real | G(E(x))) as PNG grids. config.evals
  run every config.eval_every_steps and at the end, into eval/ (JSON) and TensorBoard.

  Returns:
    The final train state.
  """
  nets, mesh, abstract_state, resume_step, state, train_iter = loop.prepare(config, workdir)

  # FID without Inception weights is skipped with one warning here, not a crash hours in.
  evals = evaluators_lib.build(config, workdir, skip_unavailable=True)
  primary = jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpoints(workdir, config)
  if resume_step is not None:
    logging.info("Resuming from %s at step %d.", checkpoint_lib.checkpoint_dir(workdir),
                 resume_step)
  else:
    logging.info("Starting from scratch in %s.", workdir)
    state = state_lib.make_init_fn(nets, config, abstract_state)(jax.random.PRNGKey(config.seed))
  start = int(state.step)
  batches = step_lib.stacked_batches(train_iter, config.optim.d_steps)
  step_fn = step_lib.make_train_step(nets, config, mesh, abstract_state)

  writer = metric_writer.MetricWriter(metric_writer.tensorboard_dir(config, workdir),
                                      enabled=primary)
  progress = metric_writer.Progress(start, config.num_train_steps,
                                    config.batch_size * config.optim.d_steps)
  previews = loop.Previews(nets, config, mesh, workdir, writer)
  preemption = faults.Preemption()
  watch = None
  if jax.process_count() > 1:
    watch = faults.ProcessWatch(config.lost_process_timeout_s, workdir).start()
  if start == 0 and primary:
    storage.write_bytes(storage.join(workdir, "config.json"), config.to_json(indent=2).encode())

  console_keys = objectives.build(nets, config.loss).console_keys
  monitor = collapse.Monitor(config)
  previous = None  # (step, metrics) of the step before, checked once the next is queued.
  try:
    for step in range(start + 1, config.num_train_steps + 1):
      local = next(batches)
      # Everything below runs collectives: in a multi-process run, one that fails means a
      # process was lost, and this one exits saying so.
      with faults.collectives(f"Step {step}", workdir):
        if step == start + 1:
          previews.set_reals(local["image"][-1])
        batch = step_lib.to_global(local, config, nets, mesh)
        if step == start + 1:
          step_fn = faults.compile_on_every_process(step_fn, state, batch)
        state, metrics = step_fn(state, batch)
        # Checking one step late keeps the device busy while the host looks; the run still
        # stops at the first non-finite step, before any checkpoint of it is written.
        if previous is not None:
          loop.check_finite(jax.device_get(previous[1]), previous[0], ckpt)
        previous = (step, metrics)
        if step == start + 1:
          jax.block_until_ready(metrics)
          logging.info("First step done (compiled). Training to step %d.",
                       config.num_train_steps)
          progress.start(step)
        last = step == config.num_train_steps
        # Called on every process at every step: the preemption service agrees on the step.
        stop = preemption.reached(step)
        alarms = []
        if step % config.log_every_steps == 0 or last or stop:
          host_metrics = loop.check_finite(jax.device_get(metrics), step, ckpt)
          rates = progress.report(step, host_metrics, console_keys)
          writer.scalars(step, {**host_metrics, **rates})
          alarms += monitor.observe(step, host_metrics)
        if step % config.sample_every_steps == 0 or last:
          previews.write(step, state)
        evaluating = bool(evals) and (
            last or bool(config.eval_every_steps) and step % config.eval_every_steps == 0)
        # A step that is evaluated is saved, so that a result can keep its checkpoint.
        saved = step % config.checkpoint_every_steps == 0 or last or stop or evaluating
        if saved:
          loop.check_finite(jax.device_get(metrics), step, ckpt)
          ckpt.save(step, state, train_iter.get_state(), force=True)
        # After the save: an evaluation that fails loses no training.
        if evaluating:
          results = evaluators_lib.run_on_state(evals, nets, state, config)
          evaluators_lib.report(step, results, workdir, writer)
          ckpt.record(step, results)
          alarms += monitor.observe_eval(step, results)
          if config.eval_every_steps and primary:
            curves.plot(workdir)
          progress.start(step)  # The next rate leaves the evaluation's time out.
        for alarm in alarms:
          _report_alarm(alarm, ckpt, writer)
        if alarms and config.collapse.stop_on_collapse:
          if not saved:
            ckpt.save(step, state, train_iter.get_state(), force=True)
          ckpt.wait()
          logging.warning("Stopped at step %d: collapse.stop_on_collapse is set; the checkpoint "
                          "is saved. Rerunning the same command would resume from it.", step)
          break
        if stop:
          ckpt.wait()
          logging.warning("Stopped at step %d for preemption; the checkpoint is saved. Rerun "
                          "the same command to resume.", step)
          break
    if watch is not None:
      watch.finished()  # The others need not wait for this process any more.
  finally:
    ckpt.wait()
    ckpt.close()
    writer.flush()
    preemption.close()
    if watch is not None:
      watch.stop()
  return state


def _report_alarm(alarm: collapse.Alarm, ckpt: checkpoint_lib.Checkpoints,
                  writer: metric_writer.MetricWriter):
  """A collapse rule that fired: a warning naming it, the step and the newest checkpoint from
  before what it saw, and the same in TensorBoard (collapse/<rule> = 1, and the text)."""
  ckpt.wait()
  before = [s for s in ckpt.all_steps() if s <= alarm.good_before]
  where = (f"The newest checkpoint from before it is step {max(before)}; roll back to it as "
           "the README says (a copy of checkpoints/STEP in a new workdir)." if before else
           f"No checkpoint from before step {alarm.good_before} is kept.")
  text = f"{alarm.message} {where}"
  logging.warning("%s", text)
  writer.scalars(alarm.step, {f"collapse/{alarm.rule}": 1.0})
  writer.text(alarm.step, f"collapse/{alarm.rule}", text)
