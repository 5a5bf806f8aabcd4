"""Every command-line module can be imported as a library, all in one process.

Each registers its absl flags only when run as a program (`define_flags()` under
`__main__`): two modules that both defined `--config` at import once made collecting the
suite fail with DuplicateFlagError.
"""

import importlib
import pathlib
import subprocess
import sys

from absl import flags
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLI_MODULES = ("main", "tools.summary", "tools.benchmark", "tools.aot", "tools.plan",
               "tools.sample", "tools.collapse", "tools.conditioning", "tools.glyphs", "tools.compare")


def test_importing_every_cli_module_defines_no_flags():
  for name in CLI_MODULES:
    module = importlib.import_module(f"bigbigan_jax.{name}")
    assert callable(module.define_flags) and callable(module.main)
  ours = {"config", "workdir", "mode", "topology", "hbm_gib", "steps", "warmup", "num",
          "truncation", "reconstruct", "interpolate", "max_compiles", "decode_images_per_core",
          "dry_run", "stream_out", "per_class", "runs", "thresholds"}
  assert not ours & set(flags.FLAGS), sorted(ours & set(flags.FLAGS))


@pytest.mark.slow
@pytest.mark.parametrize("name", CLI_MODULES)
def test_help_describes_the_flags(name):
  out = subprocess.run([sys.executable, "-m", f"bigbigan_jax.{name}", "--help"],
                       capture_output=True, text=True, timeout=300)
  # absl's --help exits with status 1 after printing; what matters is what it printed.
  assert f"bigbigan_jax.{name}" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
  expected = ("--workdir" if name in ("tools.sample", "tools.collapse", "tools.conditioning")
              else "--out" if name == "tools.glyphs" else "--runs" if name == "tools.compare"
              else "--config")
  assert expected in out.stdout


def _with_and_without_entry_point_env(preamble: str, body: str, env: dict):
  """Runs `preamble` + `body` in two fresh interpreters: "ours" sets the entry points'
  environment between the two, "plain" does not. Returns (ours, plain), both succeeded."""
  script = (preamble + "if sys.argv[1] == 'ours':\n"
            "  from bigbigan_jax import environment\n"
            "  environment.set_entry_point_defaults()\n" + body)
  run = lambda which: subprocess.run([sys.executable, "-c", script, which], env=env,
                                     capture_output=True, text=True, timeout=300)
  ours, plain = run("ours"), run("plain")
  assert ours.returncode == 0 and plain.returncode == 0, ours.stderr[-2000:]
  return ours, plain


def test_entry_point_environment_keeps_tensorflows_start_up_lines_quiet(tmp_path):
  """With the entry points' environment, importing TensorFlow prints none of its C++ start-up
  lines, which TF 2.21 prints whatever TF_CPP_MIN_LOG_LEVEL says; without it, it does."""
  ours, plain = _with_and_without_entry_point_env(
      "import sys\n", "import tensorflow\n",
      {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert "oneDNN custom operations are on" in plain.stderr  # What the setting is for.
  assert "oneDNN" not in ours.stderr and "InitializeLog" not in ours.stderr, ours.stderr


def test_entry_point_xla_flags_are_appended_and_a_users_own_setting_wins():
  from bigbigan_jax import environment
  ynn = "--xla_cpu_experimental_ynn_fusion_type"
  assert environment.with_flag_defaults("", environment.XLA_CPU_FLAGS) == (
      f"{ynn}=-individual_convolution")
  assert environment.with_flag_defaults(
      " --xla_force_host_platform_device_count=8 ", environment.XLA_CPU_FLAGS).split() == [
          "--xla_force_host_platform_device_count=8", f"{ynn}=-individual_convolution"]
  assert environment.with_flag_defaults(f"{ynn}=", environment.XLA_CPU_FLAGS) == f"{ynn}="


@pytest.mark.slow
def test_entry_point_environment_sends_convolutions_to_xlas_own_kernels(tmp_path):
  """The entry points' XLA flag takes effect even set after `import jax` (as in main.py): the
  compiled convolution is XLA's own, where without it YNNPACK takes it."""
  ours, plain = _with_and_without_entry_point_env(
      "import sys, jax, jax.numpy as jnp\n",
      "conv = lambda x, w: jax.lax.conv_general_dilated(\n"
      "    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
      "hlo = jax.jit(conv).lower(jnp.zeros((8, 16, 16, 64)),\n"
      "                          jnp.zeros((3, 3, 64, 64))).compile().as_text()\n"
      "print('YNN' if '__ynn_fusion' in hlo else 'XLA', 'convolution(' in hlo)\n",
      {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"})
  assert plain.stdout.split()[-2:] == ["YNN", "True"], plain.stdout
  assert ours.stdout.split()[-2:] == ["XLA", "True"], ours.stdout


def test_a_mistyped_config_field_is_named_with_the_nearest_ones():
  from bigbigan_jax import overrides as overrides_lib
  message = overrides_lib.unknown_override(
      ["main.py", f"--config={ROOT}/configs/tiny.py", "--config.batch_size=8",
       "--config.optim.lrr=1"])
  assert message.startswith("--config.optim.lrr: config.optim has no field 'lrr'; did you "
                            "mean --config.optim.g_lr, --config.optim.e_lr, --config.optim.d_lr?")
  assert "microbatches" in message  # The valid fields are listed.
  assert "--config.optimm: config has no field 'optimm'; did you mean --config.optim?" in (
      overrides_lib.unknown_override([f"--config={ROOT}/configs/tiny.py:biggan", "--config.optimm.x",
                                   "1"]))
  assert overrides_lib.unknown_override(
      [f"--config={ROOT}/configs/digits.py:biggan", "--config.model.encoder.depth=26",
       "--config.optim.microbatches=2"]) is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ("main", "tools.plan"))
def test_a_mistyped_config_field_ends_in_one_line_not_a_traceback(name):
  out = subprocess.run([sys.executable, "-m", f"bigbigan_jax.{name}", "--config=configs/tiny.py",
                        "--config.optim.lrr=1", "--workdir=unused", "--topology=v4-8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "error: --config.optim.lrr: config.optim has no field 'lrr'" in out.stderr
