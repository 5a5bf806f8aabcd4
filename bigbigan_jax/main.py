r"""Trains BigBiGAN or BigGAN: the command-line entry point.

  python -m bigbigan_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m bigbigan_jax.main --mode=eval --config=configs/digits.py --workdir=/tmp/digits \
      --config.eval.probe_baselines=True
  python -m bigbigan_jax.main --config=configs/bigbigan_resnet50.py --workdir=gs://b/run \
      --config.distributed=True --config.data.data_dir=gs://b/tensorflow_datasets

Any config field can be overridden with --config.FIELD=VALUE (see configs/*.py and
bigbigan_jax/config.py for every field). A second run with the same --workdir resumes from
its newest checkpoint. `--mode=eval` evaluates a workdir's checkpoint instead (config.evals,
or every evaluator that applies when that is empty; see bigbigan_jax/evaluation/evaluators.py)
and writes the results to WORKDIR/eval/step_<step>.json and TensorBoard. All logic lives in
`bigbigan_jax.train` and `bigbigan_jax.evaluation.evaluators`, which tests and
notebooks import; this file only parses flags.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bigbigan_jax import overrides as overrides_lib
from bigbigan_jax import environment

FLAGS = flags.FLAGS


def define_flags():
  """Registers the command-line flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file(
      "config", None,
      "Experiment config: a file in configs/ (a variant may follow a colon, e.g. "
      "configs/digits.py:biggan). Override fields with --config.FIELD=VALUE.",
      lock_config=True)
  flags.DEFINE_string(
      "workdir", None,
      "Directory (local or gs://) for checkpoints, TensorBoard events and PNG sample grids. "
      "If it holds a checkpoint, training resumes from it.")
  flags.DEFINE_enum(
      "mode", "train", ["train", "eval"],
      "train: train (or resume) in --workdir. eval: run the evaluators on its checkpoint.")
  flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint's step (default: the newest).")
  flags.DEFINE_string(
      "steps", None,
      "--mode=eval: 'all', or steps N,M,...: evaluate every kept checkpoint (or those listed) "
      "that has no result in WORKDIR/eval/ yet, oldest first, and redraw the learning curves. "
      "Results already there are not redone, so a stopped sweep resumes.")
  flags.DEFINE_bool(
      "dry_run", False,
      "Check everything that can be checked without compiling (the config, the data, the "
      "batch against the devices, the workdir's checkpoints), print what the run would do, "
      "and exit. Writes nothing.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.distributed:
    # On TPU pods every other argument comes from the environment. JAX's own heartbeat
    # outlasts the trainer's lost-process watch, so that the trainer's message comes first.
    jax.distributed.initialize(
        heartbeat_timeout_seconds=int(config.lost_process_timeout_s) + 60)
  # Deferred so that TensorFlow (used for input and summaries) sees no accelerator.
  from bigbigan_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.reporting import metric_writer  # pylint: disable=g-import-not-at-top
  from bigbigan_jax import train  # pylint: disable=g-import-not-at-top
  pipeline.hide_accelerators_from_tf()
  metric_writer.quiet_library_logs()
  config_name = config_flags.get_config_filename(FLAGS["config"])
  logging.info("%s", describe(config, config_name, FLAGS.workdir, FLAGS.mode, FLAGS.step,
                                 FLAGS.steps))
  try:
    if FLAGS.mode == "eval" and FLAGS.steps is not None:
      if FLAGS.step is not None:
        raise ValueError("give --step (one checkpoint) or --steps (several), not both")
      if FLAGS.dry_run:
        evaluators.check(config, FLAGS.workdir)
        evaluators.sweep_steps(FLAGS.workdir, FLAGS.steps)
      else:
        swept = evaluators.evaluate_steps(config, FLAGS.workdir, FLAGS.steps)
        if jax.process_index() == 0:
          print(json.dumps({str(k): v for k, v in swept.items()}, indent=2, sort_keys=True))
    elif FLAGS.mode == "eval":
      if FLAGS.dry_run:
        evaluators.check(config, FLAGS.workdir, FLAGS.step)
      else:
        results = evaluators.evaluate(config, FLAGS.workdir, FLAGS.step)
        if jax.process_index() == 0:
          print(json.dumps(results, indent=2, sort_keys=True))
    else:
      if FLAGS.step is not None or FLAGS.steps is not None:
        raise ValueError("--step and --steps only apply to --mode=eval; training resumes "
                         "from the newest checkpoint")
      if FLAGS.dry_run:
        train.check(config, FLAGS.workdir)
      else:
        state = train.train_and_evaluate(config, FLAGS.workdir)
        if int(state.step) < config.num_train_steps:
          return  # Stopped for preemption: the loop's last line says so.
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    # Bad input and diverged runs end with the message alone: it names the problem and the fix.
    logging.error("%s", error)
    sys.exit(f"error: {error}")
  if FLAGS.dry_run:
    logging.info("Dry run: every check passed; nothing was compiled or written.")
  else:
    logging.info("%s", results_line(config, FLAGS.workdir, FLAGS.mode))


def describe(config, config_name: str, workdir: str, mode: str, step: int | None,
             steps: str | None = None) -> str:
  """The run's first console line: what it will do, on what, where."""
  data = config.data
  source = {"tfds": data.name, "folder": data.folder}.get(data.source, data.source)
  devices = (f"{jax.device_count()} {jax.devices()[0].platform} device(s) in "
             f"{jax.process_count()} process(es)")
  if mode == "eval":
    evals = ", ".join(config.evals) or "every evaluator that applies"
    which = f"steps {steps}" if steps else f"step {'newest' if step is None else step}"
    return (f"Evaluating {workdir} ({which}) with "
            f"{config_name}: {evals}, on {devices}.")
  accumulation = (f" in {config.optim.microbatches} micro-batches"
                  if config.optim.microbatches > 1 else "")
  return (f"Training {config.model.kind} ({config_name}) on {source}[{data.train_split}] for "
          f"{config.num_train_steps:,} steps at batch {config.batch_size}{accumulation}, on "
          f"{devices}, in {workdir}.")


def results_line(config, workdir: str, mode: str) -> str:
  """The run's last console line: where its results are."""
  if mode == "eval":
    return f"Done. The results are in {workdir}/eval/ and in TensorBoard."
  grids = "samples/ and reconstructions/" if config.model.kind == "bigbigan" else "samples/"
  evals = "eval/ (the evaluations), " if config.evals else ""
  logdir = config.tensorboard_dir or workdir
  return (f"Done. In {workdir}: {grids} (PNG grids), {evals}checkpoints/; "
          f"tensorboard --logdir {logdir}")


if __name__ == "__main__":
  environment.set_entry_point_defaults()  # Before TensorFlow loads (in main).
  overrides_lib.exit_on_unknown_override()
  define_flags()
  app.run(main)
