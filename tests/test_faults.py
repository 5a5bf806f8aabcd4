"""Faults a pod run meets, on the CPU, with 2 micro-batches an update: SIGTERM and `kill -9`
of a single host mid-save, damaged checkpoints, the lost-process watch
(bigbigan_jax/training/faults.py and checkpoint.restore_newest_intact). Two hosts:
test_multihost.py."""

import glob
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from processes import stopped_at
from processes import wait_for
from test_train import tiny
from train_steps import flat
from train_steps import LIFECYCLE_FLAGS
from train_steps import LIFECYCLE_RUN

from bigbigan_jax import train
from bigbigan_jax.training import faults
from bigbigan_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# Damaged checkpoints.
# ------------------------------------------------------------------------------------------


def _damage(step_dir: pathlib.Path, how: str):
  """Truncates every array data file of the step to a third, or deletes them all (one file
  alone may hold nothing the restore reads: orbax writes some data more than once)."""
  files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
  assert files
  for name in files:
    if how == "truncate":
      with open(name, "r+b") as f:
        f.truncate(os.path.getsize(name) // 3)
    else:
      os.remove(name)


# What the single-host tests run: configs/tiny.py:lifecycle, whose step traces and loads in
# about half the tiny BigBiGAN's time (what is tested is the run's life, not the step), with
# train_steps.LIFECYCLE_RUN: the in-process runs and the entry point's processes get the same
# overrides, and their final params are compared bit for bit.
RUN = LIFECYCLE_RUN
STEPS = RUN["num_train_steps"]
FLAGS = LIFECYCLE_FLAGS


def _config(**overrides):
  """The config FLAGS give the entry point (and `overrides`)."""
  return tiny("lifecycle", **RUN, **overrides)


@pytest.fixture(scope="session")  # test_storage's reference too, when in the same worker.
def uninterrupted(tmp_path_factory):
  """A workdir of the tiny config trained to step STEPS without a stop (checkpoints 8 and
  12), the reference of every single-host test. Trained in this process: only the tests of
  signals need the entry point as a process of its own, and in this process the later runs
  reuse the step it traced. The entry point's processes run the same program on the same 8
  CPU devices, so their final params must equal these bit for bit.

  Every check below reads it from a fresh copy in this process: orbax restores through
  TensorStore's cache, so a process that had read a step would not see it damaged.
  """
  workdir = tmp_path_factory.mktemp("faults") / "uninterrupted"
  train.train_and_evaluate(_config(checkpoint_every_steps=4), str(workdir))
  return workdir


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_training_redoes_the_same_steps(
    tmp_path, uninterrupted, caplog):
  run = tmp_path / "run"
  shutil.copytree(uninterrupted, run)
  _damage(run / "checkpoints" / "12", "truncate")
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(_config(checkpoint_every_steps=4), str(run))
  log = caplog.text
  assert "Damaged checkpoint(s)" in log and "step 12:" in log and "Traceback" not in log
  assert "Resuming from step 8, the newest that reads back whole" in log
  # Steps 9-12 were trained again from step 8, to the same numbers; step 12 was saved anew,
  # and the damaged copy kept beside it.
  assert sorted(os.listdir(run / "checkpoints"), key=int) == ["8", "12"]
  assert os.listdir(run / "damaged_checkpoints") == ["12"]
  config = _config()
  np.testing.assert_array_equal(_final_params(run, config)[1],
                                _final_params(uninterrupted, config)[1])


@pytest.mark.slow
def test_newest_checkpoint_with_deleted_files_falls_back_to_the_one_before(tmp_path, uninterrupted):
  # The same fallback as above, for files deleted rather than truncated; the restore is what
  # differs, so the set-up alone (no training) shows it.
  run = tmp_path / "run"
  shutil.copytree(uninterrupted, run)
  _damage(run / "checkpoints" / "12", "delete")
  prepared = loop.prepare(_config(), str(run))
  assert prepared.resume_step == 8
  assert os.listdir(run / "checkpoints") == ["8"]
  assert os.listdir(run / "damaged_checkpoints") == ["12"]


@pytest.mark.slow
def test_all_checkpoints_damaged_is_an_error_that_changes_nothing(tmp_path, uninterrupted):
  run = tmp_path / "run"
  shutil.copytree(uninterrupted, run)
  _damage(run / "checkpoints" / "12", "truncate")
  (run / "checkpoints" / "8" / "meta" / "metadata").write_text("{not json")
  before = sorted(glob.glob(str(run / "**"), recursive=True))
  with pytest.raises(ValueError) as error:
    loop.prepare(_config(), str(run))
  message = str(error.value)
  assert "no checkpoint in" in message and "step 12:" in message and "step 8:" in message
  assert "Restore those step folders from a copy" in message
  assert sorted(glob.glob(str(run / "**"), recursive=True)) == before


# ------------------------------------------------------------------------------------------
# The lost-process watch, on a fake coordination service and a fake clock.
# ------------------------------------------------------------------------------------------


class _FakeStore:
  def __init__(self):
    self.values, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect")
    assert allow_overwrite or key not in self.values
    self.values[key] = value

  def key_value_try_get(self, key):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect")
    if key not in self.values:
      raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
    return self.values[key]


def _watches(store, clock, lost):
  return [faults.ProcessWatch(60, "/tmp/run", client=store, process_index=i, process_count=2,
                              on_lost=lambda m, i=i: lost.append((i, m)), clock=lambda: clock[0])
          for i in range(2)]


def test_watch_reports_a_silent_process_after_the_timeout_and_not_before():
  store, clock, lost = _FakeStore(), [0.0], []
  zero, one = _watches(store, clock, lost)
  for t in range(0, 121, 5):  # Both beat for two minutes: nobody is lost.
    clock[0] = float(t)
    zero.check()
    one.check()
  assert lost == []
  # Process 1 stops beating at t=120; process 0 sees that beat at t=125.
  for t in range(125, 300, 5):
    clock[0] = float(t)
    zero.check()
    if lost:
      break
  assert t == 190 and len(lost) == 1 and lost[0][0] == 0
  message = lost[0][1]
  assert "Process 1 of 2 has not been heard from for 65 s" in message
  assert "exits with status 75" in message and "Rerun the same command" in message
  assert "/tmp/run" in message


def test_watch_gives_a_process_never_heard_from_the_start_up_allowance():
  store, clock, lost = _FakeStore(), [0.0], []
  zero, _ = _watches(store, clock, lost)
  for t in range(0, faults.COMPILE_SKEW_TIMEOUT_S, 60):  # Process 1 is still starting.
    clock[0] = float(t)
    zero.check()
  assert lost == []
  clock[0] = faults.COMPILE_SKEW_TIMEOUT_S + 1.0
  zero.check()
  assert len(lost) == 1 and "Process 1 of 2" in lost[0][1]


def test_watch_does_not_wait_for_a_finished_process():
  store, clock, lost = _FakeStore(), [0.0], []
  zero, one = _watches(store, clock, lost)
  zero.check()
  one.check()
  one.finished()
  for t in range(5, 400, 5):
    clock[0] = float(t)
    zero.check()
  assert lost == []


def test_watch_reports_a_coordination_service_that_stops_answering():
  store, clock, lost = _FakeStore(), [0.0], []
  _, one = _watches(store, clock, lost)
  one.check()
  store.down = True
  clock[0] = 30.0
  assert one.check() is None and lost == []
  clock[0] = 61.0
  one.check()
  assert len(lost) == 1 and "process 0 died" in lost[0][1]


# ------------------------------------------------------------------------------------------
# The single-host entry point, as a real process (two hosts: test_multihost.py).
# ------------------------------------------------------------------------------------------


def _main(workdir, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  log = open(f"{workdir}.log", "a")  # pylint: disable=consider-using-with
  return subprocess.Popen(
      [sys.executable, "-m", "bigbigan_jax.main", f"--config={ROOT}/configs/tiny.py:lifecycle",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _final_params(workdir, config):
  prepared = loop.prepare(config, str(workdir))
  return prepared.resume_step, flat(jax.device_get(prepared.resumed_state.params))


@pytest.mark.slow
def test_single_host_sigterm_saves_and_kill_mid_save_resumes_exactly(tmp_path, uninterrupted):
  run = tmp_path / "run"
  # SIGTERM: the run saves the step it is at and exits 0.
  proc = _main(run, *FLAGS, "--config.checkpoint_every_steps=1000")
  wait_for(f"{run}.log", "First step done", [proc])
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, pathlib.Path(f"{run}.log").read_text()[-3000:]
  stopped = stopped_at(f"{run}.log")
  assert os.listdir(run / "checkpoints") == [str(stopped)]

  # The same run resumed, then `kill -9` while an asynchronous save is in flight (orbax's
  # temporary folder exists).
  proc = _main(run, *FLAGS, "--config.checkpoint_every_steps=1")
  wait_for(f"{run}.log", "Resuming from", [proc])
  deadline = time.monotonic() + 300
  while not glob.glob(str(run / "checkpoints" / "*.orbax-checkpoint-tmp*")):
    assert time.monotonic() < deadline and proc.poll() is None, "no save was seen in flight"
    time.sleep(0.001)
  proc.kill()
  proc.wait()
  assert glob.glob(str(run / "checkpoints" / "*.orbax-checkpoint-tmp*"))
  # Resumed once more, it finishes; its final params equal the uninterrupted run's.
  proc = _main(run, *FLAGS, "--config.checkpoint_every_steps=1000")
  assert proc.wait(timeout=600) == 0, pathlib.Path(f"{run}.log").read_text()[-3000:]
  finals = [_final_params(workdir, _config()) for workdir in (run, uninterrupted)]
  assert [step for step, _ in finals] == [STEPS, STEPS]
  np.testing.assert_array_equal(finals[0][1], finals[1][1])
