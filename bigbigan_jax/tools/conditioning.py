r"""How much a class-conditional BigGAN's D and G use the label, checkpoint by checkpoint.

  python -m bigbigan_jax.main --config=configs/digits.py:biggan --workdir=/tmp/biggan \
      --config.checkpoint_every_steps=250 --config.keep_checkpoints=20
  python -m bigbigan_jax.tools.conditioning --workdir=/tmp/biggan

For every checkpoint in the workdir (the trained weights, not the EMA copy: the ones in the
game), on the same real training images and the same latents and labels:

D's score is u(x) + p(x, y): an unconditional term u = w·h(x) and the projection
p = <e_y, h(x)>, h being D's pooled features and e_y a row of its (spectrally normalised)
class table.
- `d_real_active`, `d_fake_active`: the fraction of real images scored below 1, and of G's
  images above -1: the only ones D's hinge learns from. Where D wins outright (both near 0),
  neither of its terms, the projection included, gets a gradient;
- `d_u_std`, `d_p_std`: how much each term varies over real and fake images together;
- `d_u_gap`, `d_p_gap`: how much each separates real from fake (mean on real images with
  their labels minus mean on G's images with the labels asked for);
- `d_class_accuracy`: the projection read as a classifier of real images, argmax_c p(x, c)
  against the label (0.1 is chance with 10 classes): has D learnt what each class looks like?
- `d_class_margin`: p(x, y) minus the mean of p(x, c) over c, on real images.

G's hinge loss is -D(G(z, y), y); its gradient, split by D's term it comes from:
- `g_grad_shared_from_p`, `g_grad_shared_from_u`: root-mean-square gradient per entry of G's
  shared class embedding, from -p and from -u;
- `g_grad_cbn_class_rows`, `g_grad_cbn_z_rows`: the same for the rows of the conditional
  BNs' gain and bias kernels that read the class embedding and that read the z chunk.

How loud the class is in G:
- `g_shared_norm`: the embedding's mean row norm, against `g_z_chunk_norm`, a z chunk's;
- `g_cbn_class_share`: in the conditional BNs' gains and biases, the spread over the batch
  of the class's part (W_class e_y) over that of the z chunk's part (W_z z), averaged over
  every gain and bias (0: G ignores the class; 1: as loud as the noise).

Writes WORKDIR/conditioning.json ({step: {measure: value}}) and WORKDIR/conditioning.png,
and prints a table. Checkpoints already measured are read back, not measured again.
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

FLAGS = flags.FLAGS

COLUMNS = ("d_real_active", "d_fake_active", "d_u_std", "d_p_std", "d_u_gap", "d_p_gap",
           "d_class_accuracy", "d_class_margin",
           "g_grad_shared_from_p", "g_grad_shared_from_u", "g_grad_cbn_class_rows",
           "g_grad_cbn_z_rows", "g_shared_norm", "g_z_chunk_norm", "g_cbn_class_share")


def define_flags():
  flags.DEFINE_string("workdir", None, "A class-conditional BigGAN run's directory.")
  flags.DEFINE_integer("num", 256, "Real images, and G's samples, measured at each step.")
  flags.DEFINE_integer("seed", 0, "The latents' and labels' seed.")
  flags.mark_flag_as_required("workdir")


def _sn(kernel, spectral, name):
  """The spectrally normalised weight, with the sigma the checkpoint holds."""
  return kernel / spectral["sn"][f"{name}/sigma"]


def _d_terms(nets, d_vars, images, labels):
  """(u (N,), p_all (N, C)) of D's unconditional term and projection onto every class."""
  out, inter = nets.discriminator.apply(
      d_vars, images, labels, train=False,
      capture_intermediates=lambda module, method: module.name == "trunk")
  h = inter["intermediates"]["trunk"]["__call__"][0]
  table = _sn(d_vars["params"]["embed"]["embed"]["embedding"], d_vars["spectral"]["embed"],
              "embed/embedding")
  p_all = h @ table.T
  return out - jnp.take_along_axis(p_all, labels[:, None], axis=1)[:, 0], p_all


def _cbn_layers(params):
  """[(block, cbn, gain|bias)] of G's conditional BNs, in order."""
  return [(b, c, k) for b in sorted(p for p in params if p.startswith("block_"))
          for c in sorted(params[b]) if c.startswith("cbn") for k in ("gain", "bias")]


def _measure(nets, g_vars, d_vars, images, labels, z, fake_labels):
  """Every measure of one checkpoint (see the module docstring), as scalars."""
  g_params, g_state = g_vars["params"], {k: v for k, v in g_vars.items() if k != "params"}
  chunk = nets.z_dim // nets.generator.num_chunks

  def generate(params):
    return nets.generator.apply({"params": params, **g_state}, z, fake_labels, train=True,
                                mutable=["batch_stats", "spectral"])[0]

  u_real, p_real_all = _d_terms(nets, d_vars, images, labels)
  p_real = jnp.take_along_axis(p_real_all, labels[:, None], axis=1)[:, 0]
  fakes = generate(g_params)
  u_fake, p_fake_all = _d_terms(nets, d_vars, fakes, fake_labels)
  p_fake = jnp.take_along_axis(p_fake_all, fake_labels[:, None], axis=1)[:, 0]

  def term_loss(params, which):
    u, p_all = _d_terms(nets, d_vars, generate(params), fake_labels)
    p = jnp.take_along_axis(p_all, fake_labels[:, None], axis=1)[:, 0]
    return -jnp.mean(p if which == "p" else u)

  grad_p = jax.grad(functools.partial(term_loss, which="p"))(g_params)
  grad_u = jax.grad(functools.partial(term_loss, which="u"))(g_params)
  rms = lambda a: jnp.sqrt(jnp.mean(jnp.square(a)))
  grad_all = jax.tree_util.tree_map(jnp.add, grad_p, grad_u)

  class_rows, z_rows, shares = [], [], []
  embedding = g_params["shared"]["embedding"]
  e = embedding[fake_labels]
  zs = jnp.split(z, nets.generator.num_chunks, axis=-1)
  for b, c, k in _cbn_layers(g_params):
    kernel = g_params[b][c][k]["dense"]["kernel"]
    g = grad_all[b][c][k]["dense"]["kernel"]
    z_rows.append(g[:chunk])
    class_rows.append(g[chunk:])
    z_part = zs[int(b.split("_")[1]) + 1] @ kernel[:chunk]
    class_part = e @ kernel[chunk:]
    shares.append(jnp.mean(jnp.std(class_part, axis=0)) / jnp.mean(jnp.std(z_part, axis=0)))
  return {
      "d_real_active": jnp.mean(u_real + p_real < 1),
      "d_fake_active": jnp.mean(u_fake + p_fake > -1),
      "d_u_std": jnp.std(jnp.concatenate([u_real, u_fake])),
      "d_p_std": jnp.std(jnp.concatenate([p_real, p_fake])),
      "d_u_gap": jnp.mean(u_real) - jnp.mean(u_fake),
      "d_p_gap": jnp.mean(p_real) - jnp.mean(p_fake),
      "d_class_accuracy": jnp.mean(jnp.argmax(p_real_all, axis=1) == labels),
      "d_class_margin": jnp.mean(p_real - jnp.mean(p_real_all, axis=1)),
      "g_grad_shared_from_p": rms(grad_p["shared"]["embedding"]),
      "g_grad_shared_from_u": rms(grad_u["shared"]["embedding"]),
      "g_grad_cbn_class_rows": rms(jnp.concatenate([r.ravel() for r in class_rows])),
      "g_grad_cbn_z_rows": rms(jnp.concatenate([r.ravel() for r in z_rows])),
      "g_shared_norm": jnp.mean(jnp.linalg.norm(embedding, axis=1)),
      "g_z_chunk_norm": jnp.mean(jnp.linalg.norm(zs[1], axis=1)),
      "g_cbn_class_share": jnp.mean(jnp.stack(shares)),
  }


def measure_workdir(workdir: str, num: int = 256, seed: int = 0,
                    done: dict[int, dict] | None = None) -> dict[int, dict[str, float]]:
  """{step: measures} for every checkpoint of `workdir` not already in `done`."""
  from bigbigan_jax.evaluation import common  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.inference import loading  # pylint: disable=g-import-not-at-top
  results = dict(done or {})
  steps = [s for s in loading.checkpoint_steps(workdir) if s not in results]
  if not steps:
    return results
  _, config = loading.read_config(workdir, steps[0])
  if config.model.kind != "biggan" or not config.model.num_classes:
    raise ValueError(f"{workdir} holds a {config.model.kind} run with "
                     f"{config.model.num_classes} classes: the conditioning measures are for "
                     "a class-conditional BigGAN (model.kind='biggan', model.num_classes > 0).")
  images, labels = common.split_arrays(config, config.eval.probe_train_split, num)
  images, labels = jnp.asarray(images[:num]), jnp.asarray(labels[:num])
  z_key, y_key = jax.random.split(jax.random.PRNGKey(seed))
  z = jax.random.normal(z_key, (len(labels), config.model.z_dim))
  fake_labels = jax.random.randint(y_key, (len(labels),), 0, config.model.num_classes)
  program = None
  for step in steps:
    model = loading.load(workdir, step, use_ema=False)
    if program is None:
      program = jax.jit(functools.partial(_measure, model.nets))
    values = program(jax.device_get(model.generator_variables),
                     jax.device_get(model.discriminator_variables), images, labels, z,
                     fake_labels)
    results[step] = {k: float(v) for k, v in values.items()}
    print(f"step {step}: " + ", ".join(f"{k} {results[step][k]:.4g}" for k in COLUMNS),
          flush=True)
  return results


def plot(results: dict[int, dict[str, float]], path: str, title: str = "") -> None:
  """Four panels of the measures against the step, as a PNG (any storage path)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.reporting import curves  # pylint: disable=g-import-not-at-top
  steps = sorted(results)
  series = lambda k: [results[s][k] for s in steps]
  fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
  panels = [
      ("D's terms: spread over real and fake", ("d_u_std", "d_p_std", "d_u_gap", "d_p_gap")),
      ("D: projection as a classifier of reals; hinge active", ("d_class_accuracy",
                                                                  "d_real_active",
                                                                  "d_fake_active")),
      ("G's gradient, RMS per entry", ("g_grad_shared_from_p", "g_grad_shared_from_u",
                                       "g_grad_cbn_class_rows", "g_grad_cbn_z_rows")),
      ("The class in G's CBNs: class part / z part", ("g_cbn_class_share",)),
  ]
  for ax, (name, keys) in zip(axes, panels):
    for k in keys:
      ax.plot(steps, series(k), marker=".", label=k)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  axes[2].set_yscale("log")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  curves.save_figure(fig, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigbigan_jax import storage  # pylint: disable=g-import-not-at-top
  out = storage.join(FLAGS.workdir, "conditioning.json")
  done = ({int(k): v for k, v in storage.read_json(out).items()}
          if storage.exists(out) else {})
  try:
    results = measure_workdir(FLAGS.workdir, FLAGS.num, FLAGS.seed, done)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if not results:
    sys.exit(f"error: {FLAGS.workdir} holds no checkpoint: train with "
             "--config.checkpoint_every_steps=N --config.keep_checkpoints=K to keep several.")
  storage.write_json(out, {str(k): v for k, v in sorted(results.items())})
  plot(results, storage.join(FLAGS.workdir, "conditioning.png"), FLAGS.workdir)
  print(f"{len(results)} checkpoints measured: {out} and conditioning.png beside it.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
