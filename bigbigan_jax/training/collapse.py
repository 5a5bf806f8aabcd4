"""Training collapse, named as it happens: rules over the logged metrics and the evaluations.

BigGAN's paper describes how its large runs end (Brock et al. 2018, section 4): the top
singular value σ0 of G's first layer grows through training and explodes at collapse, D's
spectra jump at the same time, and D's loss falls towards zero while G's rises, D winning
outright. Sample quality falls from there on, and the model to report is the one from
before. The trainer logs σ0 of G's and D's first and last layers, D's accuracy on real and
fake pairs, and the losses (`objectives.sigma_metrics`, `losses`); each rule below reads one
of those streams and is a field of `config.collapse` (0 turns it off):

  sigma_growth    a layer's σ0 more than this many times its smallest value over the last
                  `window` logs (an explosion, not the steady growth of a healthy run);
  d_accuracy      D's accuracy at or above this on `pinned_logs` consecutive logs (D wins
                  every pair: it has learned to tell G's samples apart without fail);
  g_loss_jump     G's loss more than this above its median over the last `window` logs;
  eval_worse      `keep_best_metric` (or `collapse.eval_metric`) worse than at the
                  evaluation before on this many consecutive evaluations.

docs/design.md ("Collapse, named") has the defaults and the healthy streams they were set
against. A rule fires once per run; what it returns is logged as a warning and written to
TensorBoard by the trainer, which stops after saving when `collapse.stop_on_collapse`.
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import NamedTuple

import ml_collections

SIGMA_PREFIX = "sigma0/"


class Alarm(NamedTuple):
  rule: str  # "sigma_growth", "d_accuracy", "g_loss_jump" or "eval_worse".
  step: int  # Where it fired.
  message: str
  good_before: int  # The last step before the evidence began: a checkpoint at or before it
                    # predates what the rule saw.


class Monitor:
  """Feeds on the metrics of each log step and each evaluation; says which rules fired."""

  def __init__(self, config: ml_collections.ConfigDict):
    c = config.collapse
    self.sigma_growth, self.window = float(c.sigma_growth), int(c.window)
    self.d_accuracy, self.pinned_logs = float(c.d_accuracy), int(c.pinned_logs)
    self.g_loss_jump = float(c.g_loss_jump)
    self.eval_worse = int(c.eval_worse)
    self.eval_metric = c.eval_metric or config.keep_best_metric
    self.lower_is_better = (config.keep_best_mode == "min" if not c.eval_metric
                            else c.eval_metric_mode == "min")
    self._history = collections.defaultdict(lambda: collections.deque(maxlen=self.window))
    self._pinned: list[int] = []  # Steps of the current run of pinned logs.
    self._evals: list[tuple[int, float]] = []
    self.fired: dict[str, int] = {}  # rule → the step it fired at.

  def observe(self, step: int, metrics: dict[str, float]) -> list[Alarm]:
    """The rules that fire on this log step's metrics."""
    out = []
    for name, value in sorted(metrics.items()):
      if not name.startswith(SIGMA_PREFIX) or not math.isfinite(value):
        continue
      past = self._history[name]
      low = min(v for _, v in past) if past else 0.0
      if self.sigma_growth and len(past) == self.window and low > 0 and (
          value > self.sigma_growth * low):
        out += self._fire("sigma_growth", step, past[0][0],
                          f"{name} is {value:.4g}, {value / low:.1f}x its smallest over the "
                          f"last {self.window} logs ({low:.4g}); the limit is "
                          f"collapse.sigma_growth={self.sigma_growth:g}")
      past.append((step, value))
    accuracy = metrics.get("d_accuracy")
    if self.d_accuracy and accuracy is not None:
      self._pinned = self._pinned + [step] if accuracy >= self.d_accuracy else []
      if self.pinned_logs and len(self._pinned) >= self.pinned_logs:
        out += self._fire("d_accuracy", step, self._pinned[0],
                          f"d_accuracy has been >= {self.d_accuracy:g} on {len(self._pinned)} "
                          "logs in a row: D tells every real pair from every fake one")
    g_loss = metrics.get("g_loss")
    if g_loss is not None and math.isfinite(g_loss):
      past = self._history["g_loss"]
      if self.g_loss_jump and len(past) == self.window:
        median = statistics.median(v for _, v in past)
        if g_loss - median > self.g_loss_jump:
          out += self._fire("g_loss_jump", step, past[0][0],
                            f"g_loss is {g_loss:.4g}, {g_loss - median:.3g} above its median "
                            f"over the last {self.window} logs ({median:.4g}); the limit is "
                            f"collapse.g_loss_jump={self.g_loss_jump:g}")
      past.append((step, g_loss))
    return out

  def observe_eval(self, step: int, results: dict[str, float]) -> list[Alarm]:
    """The rules that fire on an evaluation's results."""
    value = results.get(self.eval_metric) if self.eval_metric else None
    if not self.eval_worse or value is None or not math.isfinite(value):
      return []
    self._evals.append((step, value))
    recent = self._evals[-(self.eval_worse + 1):]
    if len(recent) <= self.eval_worse:
      return []
    values = [v for _, v in recent]
    worse = all((b > a) if self.lower_is_better else (b < a)
                for a, b in zip(values, values[1:]))
    if not worse:
      return []
    trail = " → ".join(f"{v:.4g} (step {s})" for s, v in recent)
    return self._fire("eval_worse", step, recent[0][0],
                      f"{self.eval_metric} worsened on {self.eval_worse} evaluations in a "
                      f"row: {trail}")

  def _fire(self, rule: str, step: int, good_before: int, detail: str) -> list[Alarm]:
    if rule in self.fired:
      return []
    self.fired[rule] = step
    return [Alarm(rule, step, f"Collapse rule {rule} fired at step {step}: {detail}.",
                  good_before)]
