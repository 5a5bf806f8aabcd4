"""Two hosts x 2 CPU devices (jax.distributed over gloo on localhost), each feeding its own
half of the batch, train to the same parameters as one host with 4 devices."""

import os

import numpy as np
import pytest
from processes import free_port
from processes import start_worker

pytestmark = pytest.mark.slow  # Three processes that train the tiny model.


def test_two_processes_match_one_process(tmp_path):
  port = free_port()
  logs = [tmp_path / f"two_hosts{i}.log" for i in range(2)] + [tmp_path / "one_host.log"]
  procs = [start_worker(i, 2, 2, port, tmp_path / "two_hosts", logs[i]) for i in range(2)]
  procs.append(start_worker(0, 1, 4, 0, tmp_path / "one_host", logs[2]))
  for proc, log in zip(procs, logs):
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
  two = np.load(tmp_path / "two_hosts.npz")
  one = np.load(tmp_path / "one_host.npz")
  assert sorted(two.files) == sorted(one.files) and len(one.files) > 50
  for key in one.files:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # Both runs checkpointed their final step.
  assert os.listdir(tmp_path / "two_hosts" / "checkpoints") == ["2"]
