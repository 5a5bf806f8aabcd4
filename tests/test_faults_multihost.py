"""Two hosts x 2 CPU devices (jax.distributed over gloo on localhost): SIGTERM to one stops
both after the same step, and the resumed run equals an uninterrupted one bit for bit; a host
killed ends the other within the bound, with the message. (2 hosts = 1 host with 4 devices:
test_multihost.py.)"""

import os
import signal
import time

import numpy as np
import pytest
from processes import free_port
from processes import start_worker
from processes import stopped_at
from processes import wait_for

from bigbigan_jax.training import faults

pytestmark = pytest.mark.slow

LONG = ("num_train_steps=20", "log_every_steps=5", "checkpoint_every_steps=100")


def _hosts(workdir, logs, *overrides):
  port = free_port()
  return [start_worker(i, 2, 2, port, workdir, logs[i], *overrides) for i in range(2)]


def test_sigterm_to_one_of_two_hosts_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  run, straight = tmp_path / "run", tmp_path / "straight"
  # Preemption notice to one host of two, after its first step.
  logs = [tmp_path / f"host{i}.log" for i in range(2)]
  hosts = _hosts(run, logs, *LONG)
  wait_for(logs[1], "First step done", hosts)
  hosts[1].send_signal(signal.SIGTERM)
  for host, log in zip(hosts, logs):
    assert host.wait(timeout=600) == 0, log.read_text()[-3000:]
  steps = [stopped_at(log) for log in logs]
  print(f"both hosts stopped at step {steps[0]}")
  assert steps[0] == steps[1] < 20
  assert os.listdir(run / "checkpoints") == [str(steps[0])]

  # Rerun both: they resume. Then an uninterrupted run.
  hosts = _hosts(run, [tmp_path / f"resume{i}.log" for i in range(2)], *LONG)
  for host in hosts:
    assert host.wait(timeout=900) == 0
  assert "Resuming from" in (tmp_path / "resume0.log").read_text()
  hosts = _hosts(straight, [tmp_path / f"straight{i}.log" for i in range(2)], *LONG)
  for host in hosts:
    assert host.wait(timeout=900) == 0
  resumed, uninterrupted = np.load(f"{run}.npz"), np.load(f"{straight}.npz")
  assert sorted(resumed.files) == sorted(uninterrupted.files) and len(resumed.files) > 50
  for key in resumed.files:
    np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


def test_a_lost_host_ends_the_other_with_the_message(tmp_path):
  logs = [tmp_path / f"host{i}.log" for i in range(2)]
  hosts = _hosts(tmp_path / "run", logs, "num_train_steps=100000", "log_every_steps=10",
                 "checkpoint_every_steps=5", "lost_process_timeout_s=60.0", "optim.d_steps=1")
  wait_for(logs[0], r"step 10/100000", hosts)
  wait_for(logs[1], r"step 10/100000", hosts)
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
