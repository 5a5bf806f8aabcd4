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
if num_processes > 1:
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
