"""Faults a pod run meets, on the CPU: preemption of one host of two, a host lost, SIGTERM
and `kill -9` of a single host mid-save, damaged checkpoints (bigbigan_jax/training/faults.py and
checkpoint.restore_newest_intact)."""

import glob
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_multihost import _free_port
from test_train import tiny
from train_steps import flat

from bigbigan_jax.training import faults
from bigbigan_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"


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


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A workdir of the tiny config trained to step 4 by the entry point (checkpoints 2 and 4).

  Every check below reads it from a fresh copy in this process: orbax restores through
  TensorStore's cache, so a process that had read a step would not see it damaged.
  """
  workdir = tmp_path_factory.mktemp("faults") / "four_steps"
  proc = _main(workdir)
  assert proc.wait(timeout=600) == 0, pathlib.Path(f"{workdir}.log").read_text()[-3000:]
  return workdir


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, four_steps, how):
  run = tmp_path / "run"
  shutil.copytree(four_steps, run)
  _damage(run / "checkpoints" / "4", how)
  proc = _main(run)
  assert proc.wait(timeout=600) == 0, pathlib.Path(f"{run}.log").read_text()[-3000:]
  log = pathlib.Path(f"{run}.log").read_text()
  assert "Damaged checkpoint(s)" in log and "step 4:" in log and "Traceback" not in log
  assert "Resuming from step 2, the newest that reads back whole" in log
  # Steps 3-4 were trained again from step 2, to the same numbers; step 4 was saved anew, and
  # the damaged copy kept beside it.
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  assert os.listdir(run / "damaged_checkpoints") == ["4"]
  config = tiny()
  np.testing.assert_array_equal(_final_params(run, config)[1],
                                _final_params(four_steps, config)[1])


def test_all_checkpoints_damaged_is_an_error_that_changes_nothing(tmp_path, four_steps):
  run = tmp_path / "run"
  shutil.copytree(four_steps, run)
  _damage(run / "checkpoints" / "4", "truncate")
  (run / "checkpoints" / "2" / "meta" / "metadata").write_text("{not json")
  before = sorted(glob.glob(str(run / "**"), recursive=True))
  with pytest.raises(ValueError) as error:
    loop.prepare(tiny(), str(run))
  message = str(error.value)
  assert "no checkpoint in" in message and "step 4:" in message and "step 2:" in message
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
# Real processes: two gloo hosts, and the single-host entry point.
# ------------------------------------------------------------------------------------------


def _start_host(process_id, port, workdir, log, *overrides):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  with open(log, "w") as out:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(process_id), "2", "2", str(port), str(workdir),
         f"{workdir}.npz", *overrides], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(path, pattern, procs, timeout=600):
  """Waits until the log at `path` matches `pattern`; fails if a process ends first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.exists(path) and re.search(pattern, pathlib.Path(path).read_text()):
      return
    ended = [p for p in procs if p.poll() is not None]
    assert not ended, f"a process ended before {pattern!r}:\n" + pathlib.Path(path).read_text()[-3000:]
    time.sleep(0.05)
  raise AssertionError(f"no {pattern!r} in {path} after {timeout} s")


def _stopped_at(log) -> int:
  found = re.findall(r"Stopped at step (\d+) for preemption", pathlib.Path(log).read_text())
  assert len(found) == 1, pathlib.Path(log).read_text()[-3000:]
  return int(found[0])


LONG = ("num_train_steps=20", "log_every_steps=5", "checkpoint_every_steps=100")


@pytest.mark.slow
def test_sigterm_to_one_of_two_hosts_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  run, straight = tmp_path / "run", tmp_path / "straight"
  port = _free_port()
  logs = [tmp_path / f"host{i}.log" for i in range(2)]
  hosts = [_start_host(i, port, run, logs[i], *LONG) for i in range(2)]
  _wait_for(logs[1], "First step done", hosts)
  hosts[1].send_signal(signal.SIGTERM)
  for host, log in zip(hosts, logs):
    assert host.wait(timeout=600) == 0, log.read_text()[-3000:]
  steps = [_stopped_at(log) for log in logs]
  print(f"both hosts stopped at step {steps[0]}")
  assert steps[0] == steps[1] < 20
  assert os.listdir(run / "checkpoints") == [str(steps[0])]

  port = _free_port()
  hosts = [_start_host(i, port, run, tmp_path / f"resume{i}.log", *LONG) for i in range(2)]
  for host in hosts:
    assert host.wait(timeout=900) == 0
  assert "Resuming from" in (tmp_path / "resume0.log").read_text()
  port = _free_port()
  hosts = [_start_host(i, port, straight, tmp_path / f"straight{i}.log", *LONG) for i in range(2)]
  for host in hosts:
    assert host.wait(timeout=900) == 0
  resumed, uninterrupted = np.load(f"{run}.npz"), np.load(f"{straight}.npz")
  assert sorted(resumed.files) == sorted(uninterrupted.files)
  for key in resumed.files:
    np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


@pytest.mark.slow
def test_a_lost_host_ends_the_other_with_the_message(tmp_path):
  port = _free_port()
  logs = [tmp_path / f"host{i}.log" for i in range(2)]
  overrides = ("num_train_steps=100000", "log_every_steps=10", "checkpoint_every_steps=5",
               "lost_process_timeout_s=60.0")
  hosts = [_start_host(i, port, tmp_path / "run", logs[i], *overrides) for i in range(2)]
  _wait_for(logs[0], r"step 10/100000", hosts)
  _wait_for(logs[1], r"step 10/100000", hosts)
  hosts[1].kill()
  killed = time.monotonic()
  code = hosts[0].wait(timeout=300)
  took = time.monotonic() - killed
  text = logs[0].read_text()
  print(f"the survivor exited {took:.1f} s after the kill, status {code}")
  assert code == faults.EXIT_LOST_PROCESS, text[-3000:]
  assert took < 120
  assert "another process has most likely died" in text or "has not been heard from" in text
  assert "Rerun the same command on every host to resume" in text


def _main(workdir, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  log = open(f"{workdir}.log", "a")  # pylint: disable=consider-using-with
  return subprocess.Popen(
      [sys.executable, "-m", "bigbigan_jax.main", f"--config={ROOT}/configs/tiny.py",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _final_params(workdir, config):
  prepared = loop.prepare(config, str(workdir))
  return prepared.resume_step, flat(jax.device_get(prepared.resumed_state.params))


@pytest.mark.slow
def test_single_host_sigterm_saves_and_kill_mid_save_resumes_exactly(tmp_path):
  steps = ["--config.num_train_steps=16", "--config.log_every_steps=5",
           "--config.sample_every_steps=1000"]
  # SIGTERM: the run saves the step it is at and exits 0.
  run = tmp_path / "sigterm"
  proc = _main(run, *steps, "--config.checkpoint_every_steps=1000")
  _wait_for(f"{run}.log", "First step done", [proc])
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, pathlib.Path(f"{run}.log").read_text()[-3000:]
  stopped = _stopped_at(f"{run}.log")
  assert os.listdir(run / "checkpoints") == [str(stopped)]

  # kill -9 while an asynchronous save is in flight (orbax's temporary folder exists).
  run = tmp_path / "kill"
  proc = _main(run, *steps, "--config.checkpoint_every_steps=1")
  _wait_for(f"{run}.log", "First step done", [proc])
  deadline = time.monotonic() + 300
  while not glob.glob(str(run / "checkpoints" / "*.orbax-checkpoint-tmp*")):
    assert time.monotonic() < deadline and proc.poll() is None, "no save was seen in flight"
    time.sleep(0.001)
  proc.kill()
  proc.wait()
  assert glob.glob(str(run / "checkpoints" / "*.orbax-checkpoint-tmp*"))
  # Both runs resume and finish; their final params equal an uninterrupted run's.
  for workdir in (tmp_path / "sigterm", run, tmp_path / "straight"):
    proc = _main(workdir, *steps, "--config.checkpoint_every_steps=1000")
    assert proc.wait(timeout=600) == 0, pathlib.Path(f"{workdir}.log").read_text()[-3000:]
  config = tiny(num_train_steps=16)
  finals = [_final_params(tmp_path / name, config) for name in ("sigterm", "kill", "straight")]
  assert [step for step, _ in finals] == [16, 16, 16]
  for _, params in finals[:2]:
    np.testing.assert_array_equal(params, finals[2][1])
