"""One process of the multi-host tests (test_multihost.py).

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES LOCAL_DEVICES PORT WORKDIR OUT \
      [FIELD=VALUE ...]

Trains configs/tiny.py:lifecycle (the tiny BigBiGAN at 16 px; 2 steps unless a FIELD=VALUE
override says otherwise, e.g. num_train_steps=40) with the real trainer, input pipeline included: each process reads and
feeds only its own slice of the global batch. Process 0 writes the final parameters to OUT
(.npz).
"""

import ast
import os
import sys

process_id, num_processes, local_devices, port = map(int, sys.argv[1:5])
workdir, out = sys.argv[5:7]
overrides = [arg.split("=", 1) for arg in sys.argv[7:]]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={local_devices}").strip()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _let_every_process_write_the_compile_cache():
  """jax writes persistent-cache entries from process 0 only (a pod's hosts would contend for
  one bucket), and process 1's programs have keys of their own (the CPU topology each
  process sees enters the key: jaxlib 0.10.2, same StableHLO), so without this process 1
  compiles the init and the step again in every two-host run of the suite: ~2 minutes of
  CPU. Here both "hosts" share one local disk and write different keys. Test harness only,
  through a private name: if jax renames it, process 1 compiles as before."""
  from jax._src import compiler  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  write = getattr(compiler, "_cache_write", None)
  if write is None or not hasattr(distributed.global_state, "process_id"):
    return

  def write_as_process_0(*args, **kwargs):
    real, distributed.global_state.process_id = distributed.global_state.process_id, 0
    try:
      return write(*args, **kwargs)
    finally:
      distributed.global_state.process_id = real

  compiler._cache_write = write_as_process_0  # pylint: disable=protected-access


if num_processes > 1:
  _let_every_process_write_the_compile_cache()
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id)

from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

from bigbigan_jax import config as config_lib  # noqa: E402
from bigbigan_jax import train  # noqa: E402

logging.use_absl_handler()  # The trainer's console lines, as `python -m bigbigan_jax.main`.
logging.set_verbosity(logging.INFO)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config = config_lib.load(os.path.join(ROOT, "configs", "tiny.py:lifecycle"))
config.optim.eps = 1e-4  # See test_train.test_step_on_8_devices_equals_1_device.
config.num_train_steps = 2
config.sample_every_steps = 100  # Previews are not what this test compares.
for field, value in overrides:
  config.update_from_flattened_dict({field: ast.literal_eval(value)})
assert jax.device_count() == 4 and jax.process_count() == num_processes

state = train.train_and_evaluate(config, workdir)
leaves = jax.tree_util.tree_leaves_with_path(state.params)
arrays = {jax.tree_util.keystr(path): np.asarray(jax.device_get(x)) for path, x in leaves}
if jax.process_index() == 0:
  np.savez(out, **arrays)
print(f"process {process_id}: done", flush=True)
