"""jax's compile log of every Python process, the test workers' subprocesses included, in one
file: which test traced, compiled, or loaded from the persistent cache which program.

  COMPILE_LOG=/tmp/compiles.log PYTHONPATH=.ci/compile_log python3 -m pytest tests
  python3 .ci/compile_log/report.py /tmp/compiles.log

Python imports this module at start-up when its folder is on PYTHONPATH. It imports nothing
from jax (the tests set jax's environment first): it only routes three jax loggers, at DEBUG,
to the file, and not to the console, where tests read the entry points' lines.
"""

import logging
import os
import sys
import time

_PATH = os.environ.get("COMPILE_LOG", "")


class _ToFile(logging.Handler):

  def emit(self, record):
    test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" ")[0]
    line = record.getMessage().replace("\n", " ")[:500]
    with open(_PATH, "a", encoding="utf-8") as f:
      f.write(f"{time.time():.2f}|{os.getpid()}|{test}|{line}\n")


if _PATH:
  _handler = _ToFile()
  for _name in ("jax._src.compiler", "jax._src.interpreters.pxla", "jax._src.dispatch"):
    _logger = logging.getLogger(_name)
    _logger.setLevel(logging.DEBUG)
    _logger.addHandler(_handler)
    _logger.propagate = False
  _handler.emit(logging.makeLogRecord({"msg": "START " + " ".join(sys.argv)[:300]}))
