"""Two hosts x 2 CPU devices (jax.distributed over gloo on localhost), each feeding its own
half of the batch, train to the same parameters as one host with 4 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # Three processes that train the tiny model.

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(process_id, num_processes, local_devices, port, tmp_path, name):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
      [sys.executable, str(WORKER), str(process_id), str(num_processes), str(local_devices),
       str(port), str(tmp_path / name), str(tmp_path / f"{name}.npz")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  hosts = [_start(i, 2, 2, port, tmp_path, "two_hosts") for i in range(2)]
  single = _start(0, 1, 4, 0, tmp_path, "one_host")
  for proc in hosts + [single]:
    finish(proc)
  two = np.load(tmp_path / "two_hosts.npz")
  one = np.load(tmp_path / "one_host.npz")
  assert sorted(two.files) == sorted(one.files) and len(one.files) > 50
  for key in one.files:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # Both runs checkpointed their final step.
  assert os.listdir(tmp_path / "two_hosts" / "checkpoints") == ["2"]
