"""Which checkpoints a long run keeps (the newest few, permanent snapshots every
`keep_every_steps`, and the best N by an evaluation result, in the right direction, through
ties, NaNs and a resume), and evaluating the kept ones afterwards (`--mode=eval --steps`)."""

import json
import math

import jax.numpy as jnp
import pytest
from train_steps import save_initial_state

from bigbigan_jax import config as config_lib
from bigbigan_jax.evaluation import evaluators
from bigbigan_jax.training import checkpoint as checkpoint_lib


def test_steps_to_keep_newest_snapshots_and_best():
  steps = list(range(100, 1100, 100))
  assert checkpoint_lib.steps_to_keep(steps, latest=3) == {800, 900, 1000}
  assert checkpoint_lib.steps_to_keep(steps, latest=2, every=400) == {400, 800, 900, 1000}
  fid = {100: 90.0, 200: 40.0, 300: 35.0, 400: 50.0, 500: 35.0, 600: math.nan, 700: 80.0}
  # Lower is better; 300 and 500 tie and both fit; NaN is never best.
  assert checkpoint_lib.steps_to_keep(steps, latest=1, best=3, results=fid, mode="min") == {
      1000, 300, 500, 200}
  # Of a tie that does not fit, the earlier step stays.
  assert checkpoint_lib.steps_to_keep(steps, latest=0, best=1, results=fid, mode="min") == {300}
  top1 = {100: 0.2, 200: 0.5, 300: 0.4, 400: math.nan}
  assert checkpoint_lib.steps_to_keep(steps, latest=0, best=2, results=top1, mode="max") == {
      200, 300}
  # Results of steps no longer saved do not take a place.
  assert checkpoint_lib.steps_to_keep([300, 400], latest=0, best=1, results=top1,
                                      mode="max") == {300}


def _config(**fields):
  config = config_lib.base_config()
  config.checkpoint_every_steps = 1
  config.update(fields)
  return config


def test_best_set_follows_the_metric_and_snapshots_survive_rotation(tmp_path):
  """A run's sequence of saves and evaluations: what is on disk after each."""
  config = _config(keep_checkpoints=2, keep_every_steps=40, keep_best=2,
                   keep_best_metric="samples/classifier_fid", keep_best_mode="min")
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), config)
  state = {"w": jnp.arange(3.0)}
  fids = {10: 50.0, 20: 30.0, 30: math.nan, 40: 45.0, 50: 30.0, 60: 20.0, 70: 90.0, 80: 25.0}
  for step in range(10, 90, 10):
    ckpt.save(step, state, {"step": step})
    ckpt.record(step, {"samples/classifier_fid": fids[step], "other": 0.0})
  ckpt.wait()
  on_disk = set(ckpt._manager.all_steps())  # pylint: disable=protected-access
  # Newest 2 (70, 80); snapshots 40, 80; best 2 by FID: 60 (20.0), 80 (25.0).
  assert on_disk == {40, 60, 70, 80}
  assert ckpt.kept_best() == [60, 80]
  ckpt.close()


def test_resumed_run_reads_earlier_results_and_keeps_the_newest(tmp_path):
  config = _config(keep_checkpoints=1, keep_best=1, keep_best_metric="probe/top1",
                   keep_best_mode="max")
  state = {"w": jnp.zeros(2)}
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), config)
  for step, top1 in ((1, 0.3), (2, 0.9), (3, 0.5)):
    ckpt.save(step, state, {"step": step})
    # What evaluators.report writes; the resumed run reads these.
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / f"step_{step:07d}.json").write_text(
        json.dumps({"step": step, "results": {"probe/top1": top1}}))
    ckpt.record(step, {"probe/top1": top1})
  ckpt.wait()
  ckpt.close()
  assert checkpoint_lib.read_results(str(tmp_path), "probe/top1") == {1: 0.3, 2: 0.9, 3: 0.5}

  resumed = checkpoint_lib.Checkpoints(str(tmp_path), config)
  assert resumed.latest_step() == 3  # Resume takes the newest step, whichever kind it is.
  resumed.save(4, state, {"step": 4})
  resumed.record(4, {"probe/top1": 0.1})
  resumed.wait()
  assert set(resumed._manager.all_steps()) == {2, 4}  # pylint: disable=protected-access
  resumed.close()


@pytest.mark.parametrize("fields,message", [
    (dict(keep_best=2), "set keep_best_metric"),
    (dict(keep_best=2, keep_best_metric="samples/classifier_fid"), "config.evals, which is empty"),
    (dict(keep_best_mode="lower"), "allowed values are 'min', 'max'"),
    (dict(keep_every_steps=-5), "keep_every_steps"),
])
def test_bad_keep_fields_name_the_fix(load_config, fields, message):
  config = load_config("tiny.py")
  config.evals = ()
  config.update(fields)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_eval_sweep_does_only_what_is_missing_and_resumes_after_a_stop(load_config, tmp_path,
                                                                       monkeypatch):
  """`--mode=eval --steps=all`: every kept checkpoint without a result, oldest first."""
  config = load_config("tiny.py")
  config.evals = ("linear_probe",)
  config.eval.update(probe_max_examples=32, probe_steps=20, batch_size=16)
  workdir = save_initial_state(config, tmp_path / "run", steps=(2, 4, 6))
  computed_before = {"step": 4, "results": {"probe/avepool_feat/top1": 0.5}}
  (tmp_path / "run" / "eval").mkdir()
  (tmp_path / "run" / "eval" / "step_0000004.json").write_text(json.dumps(computed_before))

  real_evaluate = evaluators.evaluate
  calls = []

  def stopped_at_6(config, workdir, step=None):
    calls.append(step)
    if step == 6:
      raise _Killed  # As a kill would, mid-sweep.
    return real_evaluate(config, workdir, step)

  monkeypatch.setattr(evaluators, "evaluate", stopped_at_6)
  with pytest.raises(_Killed):
    evaluators.evaluate_steps(config, workdir, "all")
  assert calls == [2, 6]  # 4 had a result.
  assert (tmp_path / "run" / "eval" / "step_0000002.json").exists()
  assert not (tmp_path / "run" / "eval" / "step_0000006.json").exists()

  monkeypatch.setattr(evaluators, "evaluate", real_evaluate)
  swept = evaluators.evaluate_steps(config, workdir, "all")
  assert sorted(swept) == [6] and "probe/avepool_feat/top1" in swept[6]
  assert json.loads((tmp_path / "run" / "eval" / "step_0000004.json").read_text()) == (
      computed_before)  # Not redone.
  assert (tmp_path / "run" / "learning_curves.png").exists()
  assert evaluators.evaluate_steps(config, workdir, "2,6") == {}
  with pytest.raises(ValueError, match="no checkpoint at step.*5.*it has 2, 4, 6"):
    evaluators.sweep_steps(workdir, "2,5")
