r"""Prints each network's trainable parameter count and input/output shapes for a config.

Everything goes through `jax.eval_shape`, so nothing is compiled or allocated: the full
ImageNet models take seconds on a laptop.

  python -m bigbigan_jax.tools.summary --config=configs/biggan_128.py
  python -m bigbigan_jax.tools.summary --config=configs/bigbigan_resnet50.py --json
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from bigbigan_jax import overrides as overrides_lib
from bigbigan_jax import environment
from bigbigan_jax.models import networks

FLAGS = flags.FLAGS


def define_flags():
  """Registers the command-line flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/biggan_128.py (a variant after ':').",
      lock_config=True)
  flags.DEFINE_bool(
      "json", False, 'Print only {"generator": N, "encoder": N, "discriminator": N} '
      "(trainable parameters; null for a network the config does not have).")


NETWORKS = ("generator", "encoder", "discriminator")


def summarize(model_config, batch: int = 2) -> dict:
  """Shapes and trainable parameter counts of every network, from abstract evaluation.

  Returns:
    {name: {"params": int, "state": {collection: int}, "inputs": [shapes],
    "outputs": shape or {key: shape}}} for each network the config has.
  """
  nets = networks.build(model_config)
  variables = jax.eval_shape(lambda key: nets.init(key, batch), jax.random.PRNGKey(0))
  inputs = nets.example_inputs(batch)
  out = {}
  for name, module in nets.modules().items():
    outputs = jax.eval_shape(
        lambda v, args, m=module: m.apply(v, *args, train=False,
                                          rngs={"noise": jax.random.PRNGKey(0)}),
        variables[name], inputs[name])
    out[name] = {
        "params": networks.count_params(variables[name]),
        "state": {c: networks.count_params(v) for c, v in variables[name].items()
                  if c != "params"},
        "inputs": [None if a is None else tuple(a.shape) for a in inputs[name]],
        "outputs": jax.tree_util.tree_map(lambda s: tuple(s.shape), outputs),
    }
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/biggan_128.py")
  info = summarize(FLAGS.config.model)
  if FLAGS.json:
    print(json.dumps({n: info[n]["params"] if n in info else None for n in NETWORKS}))
    return
  for name in NETWORKS:
    if name not in info:
      print(f"{name}: none in this config")
      continue
    net = info[name]
    state = ", ".join(f"{c} {n:,}" for c, n in net["state"].items())
    print(f"{name}: {net['params']:,} trainable parameters (state, not trained: {state})")
    print(f"  inputs:  {net['inputs']}")
    print(f"  outputs: {net['outputs']}")


if __name__ == "__main__":
  environment.set_entry_point_defaults()
  overrides_lib.exit_on_unknown_override()
  define_flags()
  app.run(main)
