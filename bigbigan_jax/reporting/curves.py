"""Learning curves: the evaluation results of a workdir over training steps, as one PNG.

The trainer writes WORKDIR/eval/step_<step>.json at every evaluation; with
`config.eval_every_steps` set it redraws WORKDIR/learning_curves.png after each one. Left:
linear-probe top-1 of E's features beside raw pixels and a random E, and the judge's
recon/class_keep (all accuracies in [0, 1]); right: the judge's classifier IS of samples.
"""

from __future__ import annotations

import io
import os

from bigbigan_jax import storage

# Probe and judge series: (result key, legend label, line style).
ACCURACY_SERIES = (
    ("probe/avepool_feat/top1", "probe: E avepool", "-"),
    ("probe/bn_crelu_feat/top1", "probe: E bn_crelu", "-"),
    ("probe/pixels/top1", "probe: pixels", ":"),
    ("probe/random_encoder/avepool_feat/top1", "probe: random E avepool", "--"),
    ("probe/random_encoder/bn_crelu_feat/top1", "probe: random E bn_crelu", "--"),
    ("recon/class_keep", "recon class_keep", "-"),
    ("recon/judge_accuracy", "judge on real (ceiling)", ":"),
    ("samples/class_accuracy", "samples class_accuracy", "-"),
)
SCORE_SERIES = (("samples/classifier_is", "samples classifier IS", "-"),)


def read_results(workdir: str) -> list[tuple[int, dict[str, float]]]:
  """Every eval/step_*.json of a workdir, as (step, results), in step order."""
  runs = []
  for path in storage.glob(storage.join(workdir, "eval"), "step_*.json"):
    record = storage.read_json(path)
    runs.append((int(record["step"]), record["results"]))
  return sorted(runs, key=lambda r: r[0])


def plot(workdir: str, out: str | None = None) -> str | None:
  """Draws the learning curves of a workdir; returns the PNG's path (None: no results yet)."""
  runs = read_results(workdir)
  if not runs:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top  (only when plotting)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  steps = [s for s, _ in runs]
  for axis, series in ((left, ACCURACY_SERIES), (right, SCORE_SERIES)):
    for key, label, style in series:
      points = [(s, r[key]) for s, r in runs if key in r]
      if points:
        axis.plot(*zip(*points), style, marker="o", markersize=3, label=label)
    axis.set_xlabel("training step")
    axis.grid(alpha=0.3)
    if axis.lines:
      axis.legend(fontsize=7)
  left.set_ylabel("accuracy")
  left.set_title("E's features and reconstructions")
  right.set_title("samples, judged")
  if len(set(steps)) == 1:
    for axis in (left, right):
      axis.set_xlim(steps[0] - 1, steps[0] + 1)
  fig.tight_layout()
  return save_figure(fig, out or os.path.join(workdir, "learning_curves.png"), dpi=100)


def save_figure(fig, path: str, dpi: int = 90) -> str:
  """Writes a matplotlib figure as a PNG to any storage path (gs:// too), closes it, and
  returns the path."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top  (only when plotting)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  plt.close(fig)
  return storage.write_bytes(path, buffer.getvalue())
