"""tools.compare on workdirs whose evaluations are written here."""

import json
import subprocess
import sys

import pytest

from bigbigan_jax.tools import compare


def _workdir(path, series):
  (path / "eval").mkdir(parents=True)
  for step, results in series.items():
    (path / "eval" / f"step_{step:07d}.json").write_text(
        json.dumps({"step": step, "results": results}))
  return path


def test_compare_finds_thresholds_last_and_best_and_draws_the_runs(tmp_path):
  a = _workdir(tmp_path / "a", {
      250: {"samples/class_accuracy": 0.1, "samples/classifier_fid": 90.0},
      500: {"samples/class_accuracy": 0.6, "samples/classifier_fid": 40.0},
      750: {"samples/class_accuracy": 0.95, "samples/classifier_fid": 50.0}})
  b = _workdir(tmp_path / "b", {250: {"samples/class_accuracy": 0.3}})
  from bigbigan_jax.reporting import curves  # pylint: disable=g-import-not-at-top
  metrics = ["samples/class_accuracy", "samples/classifier_fid"]
  s = compare.summarise(curves.read_results(str(a)), metrics, [0.5, 0.9],
                        {"samples/classifier_fid"})
  assert s["first"] == {0.5: 500, 0.9: 750}
  assert s["samples/class_accuracy"] == (0.95, 0.95, 750)
  assert s["samples/classifier_fid"] == (50.0, 40.0, 500)  # Lower is better.
  s = compare.summarise(curves.read_results(str(b)), metrics, [0.5], set())
  assert s["first"] == {0.5: None} and s["samples/classifier_fid"] is None

  out = subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.compare",
                        f"--runs=first={a},second={b}", f"--out={tmp_path / 'c.png'}",
                        "--metrics=samples/class_accuracy,samples/classifier_fid"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "first | 500 | 750 | 0.95 / 0.95 (750) | 50 / 40 (500)" in out.stdout
  assert "second | - | - | 0.3 / 0.3 (250) | -" in out.stdout
  assert (tmp_path / "c.png").stat().st_size > 10_000
  bad = subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.compare",
                        f"--runs=x={tmp_path}"], capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "has no eval/step_*.json" in bad.stderr
  with pytest.raises(ValueError, match="not LABEL=WORKDIR"):
    compare.parse_runs("a=/x,/y")
