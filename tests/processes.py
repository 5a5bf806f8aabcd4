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
  # The worker sets its own device count and keeps the other XLA flags, with XLA:CPU's legacy
  # element-wise emitters in place of its fusion emitters: a two-host run is mostly start-up
  # and compiles (both processes compile; only process 0 may write the compile cache), and
  # this cuts the tiny train step's compile from 18-23 s of CPU to 12-14 on this project's
  # 2-core host (jaxlib 0.10.2; test_multihost.py's tests summed to 385 s against 538 in
  # two cold suite runs). Not for the whole suite: the programs run slower, and over a cold
  # suite run the gains elsewhere were lost to tests that train or evaluate for longer
  # (20m57s against 21m28s, 39m24s of CPU against 40m05s).
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  env = {**os.environ, "XLA_FLAGS": " ".join([*flags, "--xla_cpu_use_fusion_emitters=false"])}
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
