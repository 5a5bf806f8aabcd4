"""`--config.a.b=...` flags that name no field: one line naming the field and the nearest
valid ones, before absl parses anything. Every entry point calls `exit_on_unknown_override()`
before defining its flags.
"""

from __future__ import annotations

import difflib
import re
import sys

import ml_collections

from bigbigan_jax import config as config_lib


def unknown_override(argv: list[str], flag: str = "config") -> str | None:
  """The message for the first `--config.a.b=...` in `argv` that names no field of the config
  file `--config=` gives (with the nearest valid names), or None when every one exists.

  ml_collections fails on such a flag deep inside absl's parsing, with three chained
  tracebacks ending in `AttributeError: "'lrr'"`; entry points call this first instead.
  """
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
  if spec is None:
    return None
  try:
    config = config_lib.load(spec)
  except Exception:  # pylint: disable=broad-except
    return None  # absl's own parsing reports a missing or broken file.
  for arg in argv:
    m = re.match(rf"--{flag}\.([\w.]+)(=|$)", arg)
    if not m:
      continue
    node, path = config, []
    for part in m.group(1).split("."):
      fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in fields:
        where = ".".join([flag, *path])
        near = difflib.get_close_matches(part, fields, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(f'--{where}.{n}' for n in near)}? " if near else "")
        listed = ", ".join(sorted(fields)) if fields else f"{where} has no fields"
        return (f"--{'.'.join([flag, *path, part])}: {where} has no field {part!r}; {hint}"
                f"its fields: {listed}. Every field is documented in bigbigan_jax/config.py.")
      node, path = node[part], path + [part]
  return None


def exit_on_unknown_override(argv: list[str] | None = None) -> None:
  """Exits with `unknown_override`'s message (status 2, as a usage error), if any."""
  message = unknown_override(sys.argv if argv is None else argv)
  if message:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
