r"""Puts several runs' evaluations side by side: one figure, one line per run, and a table.

  python -m bigbigan_jax.tools.compare --out=compare.png \
      --runs="before s0=/tmp/base_s0,before s1=/tmp/base_s1,after s0=/tmp/new_s0"

Each run is LABEL=WORKDIR (local or gs://); its WORKDIR/eval/step_*.json are read, as the
trainer writes them with --config.eval_every_steps. --metrics picks the panels (default: a
class-conditional BigGAN's class accuracy, classifier IS and classifier FID). For each run
the table gives, for the first metric, the first evaluated step at which it reaches each of
--thresholds, and for every metric its value at the last evaluation and its best over the
run (the highest, or for metrics named in --lower_is_better the lowest, with last / best).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("runs", None, "Comma-separated LABEL=WORKDIR pairs.")
  flags.DEFINE_list("metrics", ["samples/class_accuracy", "samples/classifier_is",
                                "samples/classifier_fid"], "Result keys to plot.")
  flags.DEFINE_list("thresholds", ["0.5", "0.9"], "First step the first metric reaches each.")
  flags.DEFINE_list("lower_is_better", ["samples/classifier_fid", "fid"],
                    "Metrics whose best is their lowest.")
  flags.DEFINE_string("out", None, "The PNG to write (any storage path); default: none.")
  flags.mark_flag_as_required("runs")


def parse_runs(text: str) -> list[tuple[str, str]]:
  runs = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    label, sep, workdir = item.partition("=")
    if not sep or not label.strip() or not workdir.strip():
      raise ValueError(f"--runs item {item!r} is not LABEL=WORKDIR")
    runs.append((label.strip(), workdir.strip()))
  return runs


def summarise(results, metrics, thresholds, lower_is_better) -> dict:
  """{"first": {threshold: step or None}, metric: (last, best, best step)} of one run."""
  first_metric = metrics[0]
  points = [(s, r[first_metric]) for s, r in results if first_metric in r]
  out = {"first": {t: next((s for s, v in points if v >= t), None) for t in thresholds}}
  for m in metrics:
    series = [(s, r[m]) for s, r in results if m in r]
    if not series:
      out[m] = None
      continue
    pick = min if m in lower_is_better else max
    best_step, best = pick(series, key=lambda p: p[1])
    out[m] = (series[-1][1], best, best_step)
  return out


def plot(runs, metrics, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.reporting import curves  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
  for ax, m in zip(axes[0], metrics):
    for label, results in runs:
      points = [(s, r[m]) for s, r in results if m in r]
      if points:
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_title(m, fontsize=9)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  curves.save_figure(fig, out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigbigan_jax.reporting import curves  # pylint: disable=g-import-not-at-top
  try:
    pairs = parse_runs(FLAGS.runs)
    thresholds = [float(t) for t in FLAGS.thresholds]
  except ValueError as e:
    sys.exit(f"error: {e}")
  runs = []
  for label, workdir in pairs:
    results = curves.read_results(workdir)
    if not results:
      sys.exit(f"error: {workdir} has no eval/step_*.json: train it with "
               "--config.eval_every_steps=N, or evaluate it with --mode=eval --steps=all")
    runs.append((label, results))
  metrics, lower = FLAGS.metrics, set(FLAGS.lower_is_better)
  header = ["run"] + [f"{metrics[0]} >= {t:g} at" for t in thresholds] + [
      f"{m} last / best (step)" for m in metrics]
  print(" | ".join(header))
  for label, results in runs:
    s = summarise(results, metrics, thresholds, lower)
    cells = [label] + [str(s["first"][t]) if s["first"][t] is not None else "-"
                       for t in thresholds]
    cells += ["-" if s[m] is None else f"{s[m][0]:.4g} / {s[m][1]:.4g} ({s[m][2]})"
              for m in metrics]
    print(" | ".join(cells))
  if FLAGS.out:
    plot(runs, metrics, FLAGS.out)
    print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
