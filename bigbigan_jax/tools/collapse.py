r"""Replays the collapse rules over a finished (or running) workdir's logged metrics.

  python -m bigbigan_jax.tools.collapse --workdir=workdir_digits
  python -m bigbigan_jax.tools.collapse --workdir=gs://b/run --set=collapse.sigma_growth=3
  python -m bigbigan_jax.tools.collapse --workdir=workdir_digits --stream_out=stream.json

Reads the scalars the trainer wrote to TensorBoard (WORKDIR/tensorboard, or the run's
config.tensorboard_dir) and the results in WORKDIR/eval, feeds them to `bigbigan_jax.training.collapse.Monitor` in step order with the run's own
config (WORKDIR/config.json) with any --set=FIELD=VALUE changes, and prints each rule that
fires, or that none did, and the largest value each rule saw against its limit: how close
the run came, and how to set the rules for the next one. --stream_out writes the per-step
metrics it read as JSON.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
import ml_collections

from bigbigan_jax import config as config_lib
from bigbigan_jax import environment
from bigbigan_jax import storage

FLAGS = flags.FLAGS
CONSOLE = re.compile(r"^(sigma0/.*|d_accuracy|g_loss|d_loss|eg_loss)$")


def define_flags():
  flags.DEFINE_string("workdir", None, "A training run's directory (local or gs://).")
  flags.DEFINE_string("stream_out", None, "Write the metrics read, {step: {name: value}}.")
  flags.DEFINE_multi_string("set", [], "Config changes, e.g. --set=collapse.window=20.")
  flags.mark_flag_as_required("workdir")


def read_stream(directory: str) -> dict[int, dict[str, float]]:
  """The rules' metrics at each logged step, from the TensorBoard events in `directory`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  stream: dict[int, dict[str, float]] = {}
  for name in sorted(tf.io.gfile.listdir(directory)):
    for record in tf.data.TFRecordDataset(os.path.join(directory, name)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        if CONSOLE.match(value.tag):
          number = (value.simple_value if value.HasField("simple_value")
                    else float(tf.make_ndarray(value.tensor)))
          stream.setdefault(int(event.step), {})[value.tag] = number
  return stream


def replay(config: ml_collections.ConfigDict, stream: dict, evals: dict) -> list:
  """The alarms of the rules over a stream of logs and evaluations, in step order."""
  from bigbigan_jax.training import collapse  # pylint: disable=g-import-not-at-top
  monitor = collapse.Monitor(config)
  alarms = []
  for step in sorted(set(stream) | set(evals)):
    if step in stream:
      alarms += monitor.observe(step, stream[step])
    if step in evals:
      alarms += monitor.observe_eval(step, evals[step])
  return alarms


def margins(config: ml_collections.ConfigDict, stream: dict) -> str:
  """How close a stream came to each log rule's limit."""
  import statistics  # pylint: disable=g-import-not-at-top
  c, w = config.collapse, config.collapse.window
  steps = sorted(stream)
  series = lambda name: [stream[s][name] for s in steps if name in stream[s]]
  growth = max((v[i] / min(v[i - w:i]) for name in {n for s in steps for n in stream[s]
                                                     if n.startswith("sigma0/")}
                for v in [series(name)] for i in range(w, len(v)) if min(v[i - w:i]) > 0),
               default=float("nan"))
  g = series("g_loss")
  jump = max((g[i] - statistics.median(g[i - w:i]) for i in range(w, len(g))),
             default=float("nan"))
  run = longest = 0
  for a in series("d_accuracy"):
    run = run + 1 if a >= c.d_accuracy else 0
    longest = max(longest, run)
  return (f"largest σ0 growth over a window of {w} logs: {growth:.2f}x (limit "
          f"{c.sigma_growth:g}); longest run of d_accuracy >= {c.d_accuracy:g}: {longest} logs "
          f"(limit {c.pinned_logs}); largest g_loss jump above its window median: {jump:.3f} "
          f"(limit {c.g_loss_jump:g}).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigbigan_jax.reporting import curves  # pylint: disable=g-import-not-at-top
  path = os.path.join(FLAGS.workdir, "config.json")
  if not storage.exists(path):
    sys.exit(f"error: no {path}: point --workdir at a training run's directory")
  config = config_lib.with_defaults(storage.read_json(path))
  for change in FLAGS.set:
    key, _, value = change.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    old = node[leaf]
    node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)
  config_lib.validate(config)
  from bigbigan_jax.reporting import metric_writer  # pylint: disable=g-import-not-at-top
  stream = read_stream(metric_writer.tensorboard_dir(config, FLAGS.workdir))
  evals = dict(curves.read_results(FLAGS.workdir))
  if FLAGS.stream_out:
    storage.write_json(FLAGS.stream_out, {str(k): v for k, v in sorted(stream.items())})
  alarms = replay(config, stream, evals)
  steps = sorted(stream)
  print(f"{len(steps)} logged steps ({steps[0] if steps else '-'} to "
        f"{steps[-1] if steps else '-'}), {len(evals)} evaluations.")
  for alarm in alarms:
    print(alarm.message)
  if not alarms:
    print("No collapse rule fired.")
  print(margins(config, stream))


if __name__ == "__main__":
  environment.set_entry_point_defaults()
  define_flags()
  app.run(main)
