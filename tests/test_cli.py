"""Every command-line module can be imported as a library, all in one process.

Each registers its absl flags only when run as a program (`define_flags()` under
`__main__`): two modules that both defined `--config` at import once made collecting the
suite fail with DuplicateFlagError.
"""

import importlib
import subprocess
import sys

from absl import flags
import pytest

CLI_MODULES = ("main", "tools.summary", "tools.benchmark", "tools.aot", "tools.sample")


def test_importing_every_cli_module_defines_no_flags():
  for name in CLI_MODULES:
    module = importlib.import_module(f"bigbigan_jax.{name}")
    assert callable(module.define_flags) and callable(module.main)
  ours = {"config", "workdir", "mode", "topology", "hbm_gib", "steps", "warmup", "num",
          "truncation", "reconstruct", "interpolate"}
  assert not ours & set(flags.FLAGS), sorted(ours & set(flags.FLAGS))


@pytest.mark.slow
@pytest.mark.parametrize("name", CLI_MODULES)
def test_help_describes_the_flags(name):
  out = subprocess.run([sys.executable, "-m", f"bigbigan_jax.{name}", "--help"],
                       capture_output=True, text=True, timeout=300)
  # absl's --help exits with status 1 after printing; what matters is what it printed.
  assert f"bigbigan_jax.{name}" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
  expected = "--workdir" if name == "tools.sample" else "--config"
  assert expected in out.stdout
