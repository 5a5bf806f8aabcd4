"""Faults a multi-host run meets, turned into decisions every process agrees on.

* Preemption. A TPU VM announces it with SIGTERM to one or more hosts. Stopping is decided
  for all processes at once: JAX's preemption service (started by
  `jax.distributed.initialize`) hears the signal through its own SIGTERM handler and agrees
  on a step that every process reaches, so each saves that step's checkpoint and exits 0.
  A Python SIGTERM handler would replace JAX's and leave the other processes stepping into a
  collective the signalled one never joins, so one is installed only in single-process runs.
* A lost process. When a process dies, the others block in the next collective: on TPU and
  GPU it never completes; on the CPU's gloo it fails. `ProcessWatch` exits every survivor
  within `lost_process_timeout_s` with a message that says what happened and that rerunning
  the command resumes; `collectives()` does the same at once when a collective fails.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils

# The exit status of a process that stops because another one was lost (EX_TEMPFAIL: the
# job can be rerun as it is).
EXIT_LOST_PROCESS = 75
# How far apart the processes may be in starting up and compiling the step.
COMPILE_SKEW_TIMEOUT_S = 1800
_KEY = "bigbigan_jax/alive/{}"
_DONE = "bigbigan_jax/done/{}"


def _exit_now(message: str) -> None:
  """Logs `message` and ends the process without the interpreter's shutdown: that would wait
  in jax.distributed's shutdown barrier for the lost process, which never arrives."""
  logging.error("%s", message)
  for handler in std_logging.getLogger().handlers + logging.get_absl_logger().handlers:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_LOST_PROCESS)  # pylint: disable=protected-access


def _rerun_hint(workdir: str) -> str:
  return (f"Rerun the same command on every host to resume from the newest checkpoint in "
          f"{workdir}.")


class Preemption:
  """Says after which step to stop for preemption; the same step on every process."""

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._requested = False
    self._previous = None
    if self._multi:
      return  # JAX's preemption service listens; see the module docstring.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step.")
    self._requested = True

  def reached(self, step: int) -> bool:
    """Call once per step, on every process: True at the step where all of them stop."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class ProcessWatch:
  """Ends this process when another one of the run stops responding.

  Every `interval_s` a daemon thread bumps this process's counter in the coordination
  service's key-value store and reads everyone else's. A counter that has not moved for
  `timeout_s` by this process's clock (no clocks are compared) means its process is lost
  (one never heard from gets COMPILE_SKEW_TIMEOUT_S to start);
  so does a store that stops answering for as long (it lives in process 0). A process that
  finished (`finished`) is not waited for.
  """

  def __init__(self, timeout_s: float, workdir: str, *, client=None,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               interval_s: Optional[float] = None,
               on_lost: Optional[Callable[[str], None]] = None,
               clock: Callable[[], float] = time.monotonic):
    if client is None:
      from jax._src import distributed  # pylint: disable=g-import-not-at-top
      client = distributed.global_state.client
    self._client = client
    self._me = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    self._others = [p for p in range(count) if p != self._me]
    self._timeout = float(timeout_s)
    self._interval = interval_s if interval_s is not None else min(5.0, self._timeout / 10)
    self._workdir = workdir
    self._on_lost = on_lost or _exit_now
    self._clock = clock
    self._beats = 0
    now = clock()
    self._seen = {p: (None, now) for p in self._others}  # value, when it last changed
    self._store_ok = now
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="ProcessWatch", daemon=True)

  def start(self) -> "ProcessWatch":
    self.check()
    self._thread.start()
    return self

  def check(self) -> Optional[str]:
    """One beat and one look at the others; returns (and reports) the loss it finds."""
    now = self._clock()
    try:
      self._beats += 1
      self._client.key_value_set(_KEY.format(self._me), str(self._beats), allow_overwrite=True)
      for p in self._others:
        if _try_get(self._client, _DONE.format(p)) is not None:
          self._seen[p] = ("done", now)
          continue
        value = _try_get(self._client, _KEY.format(p))
        if value != self._seen[p][0]:
          self._seen[p] = (value, now)
      self._store_ok = now
    except Exception as error:  # pylint: disable=broad-except
      if now - self._store_ok > self._timeout:
        return self._lost(f"The coordination service (process 0) has not answered for "
                          f"{now - self._store_ok:.0f} s ({type(error).__name__}: {error}): "
                          "process 0 died or its host was lost.")
      return None
    for p, (value, since) in self._seen.items():
      # Until a process is first heard from it may still be starting (listing a dataset,
      # building evaluators on a slower host): it gets the compile-skew allowance.
      limit = self._timeout if value is not None else max(self._timeout, COMPILE_SKEW_TIMEOUT_S)
      if value != "done" and now - since > limit:
        return self._lost(f"Process {p} of {len(self._others) + 1} has not been heard from "
                          f"for {now - since:.0f} s: it died or its host was lost.")
    return None

  def _lost(self, what: str) -> str:
    message = (f"{what} This process (index {self._me}) exits with status "
               f"{EXIT_LOST_PROCESS} instead of waiting in a collective that cannot complete "
               f"(lost_process_timeout_s={self._timeout:g}). {_rerun_hint(self._workdir)}")
    self._on_lost(message)
    return message

  def _run(self):
    while not self._stop.wait(self._interval):
      if self.check() is not None:
        return

  def finished(self):
    """Tells the others that this process is done (it is about to exit, and is not lost)."""
    self._stop.set()
    with contextlib.suppress(Exception):
      self._client.key_value_set(_DONE.format(self._me), "1", allow_overwrite=True)

  def stop(self):
    """Stops watching. A process that stops without `finished` (an error) is then lost to the
    others, which is what it is."""
    self._stop.set()


def _try_get(client, key: str) -> Optional[str]:
  """The key's value, or None if it was never set."""
  try:
    return client.key_value_try_get(key)
  except Exception as error:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(error) or "not found" in str(error).lower():
      return None
    raise


_COMPILED = {}  # (jitted, argument structure, shapes, dtypes, shardings) → its executable.


def compile_on_every_process(jitted, *args):
  """Compiles `jitted` for `args` and, in a multi-process run, waits until every process has.

  Compile times differ between hosts (and a loaded CPU host may take minutes more): the first
  step's collectives would otherwise wait for the slowest compile, and gloo gives up on a
  peer after 30 s. The wait is a coordination-service barrier, which has no such limit.
  """
  leaves, treedef = jax.tree_util.tree_flatten(args)
  key = (jitted, treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
  compiled = _COMPILED.get(key)
  if compiled is None:
    # A second run in the same process (a notebook cell run again, a resume test) reuses
    # the executable instead of lowering it and loading it from the compilation cache again.
    compiled = _COMPILED[key] = jitted.lower(*args).compile()
    while len(_COMPILED) > 4:
      del _COMPILED[next(iter(_COMPILED))]
  if jax.process_count() > 1:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    distributed.global_state.client.wait_at_barrier(
        "bigbigan_jax/step_compiled", COMPILE_SKEW_TIMEOUT_S * 1000)
  return compiled


@contextlib.contextmanager
def collectives(what: str, workdir: str):
  """In a multi-process run, a failure inside `with` (a step's collectives) most likely means
  another process died: say so and exit at once. Non-finite losses are not that."""
  try:
    yield
  except FloatingPointError:
    raise
  except Exception as error:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    _exit_now(f"{what} failed in a collective ({type(error).__name__}: {first}): another "
              f"process has most likely died (see its log). This process (index "
              f"{jax.process_index()}) exits with status {EXIT_LOST_PROCESS}. "
              f"{_rerun_hint(workdir)}")
