"""Real processes for the multi-process tests: the 2-host worker, free ports, log waits."""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_worker(process_id, num_processes, local_devices, port, workdir, log, *overrides):
  """One process of tests/multihost_worker.py; its output goes to `log`, its final params to
  WORKDIR.npz (process 0)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  with open(log, "w") as out:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(process_id), str(num_processes), str(local_devices),
         str(port), str(workdir), f"{workdir}.npz", *overrides],
        env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(path, pattern, procs, timeout=600):
  """Waits until the log at `path` matches `pattern`; fails if a process ends first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.exists(path) and re.search(pattern, pathlib.Path(path).read_text()):
      return
    ended = [p for p in procs if p.poll() is not None]
    assert not ended, (f"a process ended before {pattern!r}:\n"
                       + pathlib.Path(path).read_text()[-3000:])
    time.sleep(0.05)
  raise AssertionError(f"no {pattern!r} in {path} after {timeout} s")


def stopped_at(log) -> int:
  """The step a run's log says it stopped at for preemption (exactly one such line)."""
  found = re.findall(r"Stopped at step (\d+) for preemption", pathlib.Path(log).read_text())
  assert len(found) == 1, pathlib.Path(log).read_text()[-3000:]
  return int(found[0])
