"""The collapse rules (bigbigan_jax/training/collapse.py): each fires on a constructed stream
that collapses, once, naming itself and a step from before; none fires on the digits demo's
own stream."""

import json
import math
import pathlib

import pytest

from bigbigan_jax import config as config_lib
from bigbigan_jax.training import collapse

DATA = pathlib.Path(__file__).resolve().parent / "data"


def _monitor(**fields):
  config = config_lib.base_config()
  config.collapse.update(fields)
  return collapse.Monitor(config)


def _healthy(step):
  """A stream like a healthy run's: σ0 growing slowly, D at 0.6-0.8, G's loss near 0."""
  return {"sigma0/g_first": 1.0 + step / 2000, "sigma0/d_last": 2.0 + step / 1000,
          "d_accuracy": 0.6 + 0.2 * math.sin(step / 300) ** 2,
          "g_loss": 0.3 * math.sin(step / 170)}


def _run(monitor, stream):
  return [alarm for step, metrics in stream for alarm in monitor.observe(step, metrics)]


def test_sigma_explosion_fires_once_with_the_step_before_its_window():
  stream = [(s, _healthy(s)) for s in range(100, 2100, 100)]
  stream += [(2100, {**_healthy(2100), "sigma0/d_last": 40.0}),
             (2200, {**_healthy(2200), "sigma0/d_last": 80.0})]
  alarms = _run(_monitor(), stream)
  assert [(a.rule, a.step) for a in alarms] == [("sigma_growth", 2100)]
  assert alarms[0].good_before == 1100  # The first log of the 10-log window.
  assert "sigma0/d_last is 40" in alarms[0].message and "sigma_growth=4" in alarms[0].message


def test_d_accuracy_pinned_at_one_fires_after_the_run_of_logs():
  stream = [(s, _healthy(s)) for s in range(100, 1100, 100)]
  stream += [(s, {**_healthy(s), "d_accuracy": 1.0}) for s in range(1100, 1600, 100)]
  alarms = _run(_monitor(), stream)
  assert [(a.rule, a.step, a.good_before) for a in alarms] == [("d_accuracy", 1500, 1100)]
  # Four pinned logs and a break: nothing.
  stream = stream[:-1] + [(1500, _healthy(1500))]
  assert _run(_monitor(), stream) == []


def test_g_loss_jump_fires_on_a_jump_not_on_drift():
  stream = [(s, _healthy(s)) for s in range(100, 1200, 100)]
  assert _run(_monitor(), stream + [(1200, {**_healthy(1200), "g_loss": 2.5})]) == []
  alarms = _run(_monitor(), stream + [(1200, {**_healthy(1200), "g_loss": 4.0})])
  assert [a.rule for a in alarms] == ["g_loss_jump"]


@pytest.mark.parametrize("mode,values,good_before", [
    ("min", [30.0, 25.0, 27.0, 29.0, 35.0], 2000),   # FID up three times in a row.
    ("min", [30.0, 25.0, 27.0, 26.0, 35.0], None),   # A dip breaks the run.
    ("max", [0.5, 0.6, 0.58, 0.55, 0.5], 2000),      # A probe's top-1 down three times.
    ("min", [30.0, math.nan, 31.0, 32.0, 33.0], 1000),  # A NaN result is skipped.
])
def test_eval_worse_follows_the_metrics_direction(mode, values, good_before):
  config = config_lib.base_config()
  config.keep_best_metric, config.keep_best_mode = "m", mode
  monitor = collapse.Monitor(config)
  alarms = [a for i, v in enumerate(values) for a in monitor.observe_eval(1000 * (i + 1),
                                                                          {"m": v})]
  assert [(a.rule, a.good_before) for a in alarms] == (
      [("eval_worse", good_before)] if good_before else []), alarms


def test_a_rule_set_to_zero_is_off():
  stream = [(s, {**_healthy(s), "d_accuracy": 1.0}) for s in range(100, 1100, 100)]
  assert _run(_monitor(d_accuracy=0.0), stream) == []


def test_nothing_fires_on_the_digits_demo_stream():
  """The console metrics of `configs/digits.py` (seeds 0 and 1, every 100 steps to 2,500),
  read from the demo's TensorBoard events (tests/data/README.md says how)."""
  runs = json.loads((DATA / "digits_demo_metrics.json").read_text())
  assert len(runs) == 2
  for run in runs:
    stream = [(int(step), metrics) for step, metrics in sorted(run["stream"].items(),
                                                                 key=lambda kv: int(kv[0]))]
    assert len(stream) == 25 and "sigma0/d_last" in stream[0][1]
    assert _run(_monitor(), stream) == [], run["seed"]
