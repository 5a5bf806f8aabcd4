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
`bigbigan_jax.training.loop` and `bigbigan_jax.evaluation.evaluators`, which tests and
notebooks import; this file only parses flags.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bigbigan_jax import config as config_lib
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
  from bigbigan_jax.training import loop  # pylint: disable=g-import-not-at-top
  pipeline.hide_accelerators_from_tf()
  metric_writer.quiet_library_logs()
  logging.info("JAX: process %d of %d, %d local and %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    if FLAGS.mode == "eval":
      results = evaluators.evaluate(config, FLAGS.workdir, FLAGS.step)
      if jax.process_index() == 0:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
      if FLAGS.step is not None:
        raise ValueError("--step only applies to --mode=eval; training resumes from the "
                         "newest checkpoint")
      loop.train_and_evaluate(config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    # Bad input and diverged runs end with the message alone: it names the problem and the fix.
    logging.error("%s", error)
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  environment.set_entry_point_defaults()  # Before TensorFlow loads (in main).
  config_lib.exit_on_unknown_override()
  define_flags()
  app.run(main)
