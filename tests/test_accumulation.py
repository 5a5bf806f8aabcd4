"""Gradient accumulation (`optim.microbatches`): the step with k micro-batches applies the mean
of the k micro-batch gradients, threads the spectral-norm and batch-norm state through them in
order, takes the orthogonal regulariser, the optimiser and the EMA once per update, and the
two loop forms agree. Resume and multiple hosts with k > 1: test_faults.py, test_multihost.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import tiny
from train_steps import flat
from train_steps import initial_state

from bigbigan_jax import sharding
from bigbigan_jax.models import networks
from bigbigan_jax.models.networks import D
from bigbigan_jax.models.networks import G
from bigbigan_jax.training import losses
from bigbigan_jax.training import objectives
from bigbigan_jax.training import state as state_lib
from bigbigan_jax.training import step as step_lib

pytestmark = pytest.mark.slow  # compiles the train step.

K = 2


def _recording_optimizer():
  """Applies no update and keeps the gradient it was given as its state: after a step,
  opt_d and opt_ge hold exactly the gradients the optimiser saw."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree_util.tree_map(jnp.zeros_like, params),
      update=lambda grads, _, params=None: (jax.tree_util.tree_map(jnp.zeros_like, grads),
                                            grads))


def _batch(config, nets, seed=0):
  rng = np.random.default_rng(seed)
  r, d, b = nets.encoder_resolution, config.optim.d_steps, config.batch_size
  return {"image": jnp.asarray(rng.uniform(-1, 1, (d, b, r, r, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, (d, b)), jnp.int32)}


def _microbatch(tree, j):
  """Micro-batch j of K: rows j, j + K, ... (the step's split)."""
  return jax.tree_util.tree_map(lambda x: x[j::K], tree)


def _assert_close(got, want, what):
  got, want = flat(got), flat(want)
  scale = max(np.abs(want).max(), 1e-12)
  # The step is one program, the reference another per micro-batch: float rounding differs by
  # up to ~1e-3 relative where gradients pass through G, E and D in turn (one weight of 47,938
  # in the BigBiGAN case). A mistake (a sum for a mean, another micro-batch's examples, the
  # regulariser counted twice) moves them by far more.
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4 * scale, err_msg=what)


@pytest.mark.parametrize("variant,loss", [
    # Every term of BigBiGAN's E/G loss (the 16 px BigBiGAN): the three scores, latent
    # regression and image reconstruction (both through G), and the orthogonal regulariser.
    ("lifecycle", {"latent_regression": 1.0, "latent_regression_trains_g": True,
                   "image_reconstruction": 1.0, "image_reconstruction_trains_g": True}),
    ("biggan", {}),
])
def test_step_applies_the_mean_of_the_microbatch_gradients(monkeypatch, variant, loss):
  # A regulariser 1e4 x BigGAN's, so that counting it per micro-batch would show.
  config = tiny(variant, optim__d_steps=1, optim__microbatches=K, loss__ortho_beta=1.0)
  config.loss.update(loss)
  nets = networks.build(config.model)
  objective = objectives.build(nets, config.loss)
  # PRNGKey(0)'s init by the program other tests run (the optimiser's state aside), with the
  # recording optimiser's state in place of Adam's: zeros shaped as what each one updates.
  state = initial_state(config)
  zeros = lambda tree: jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), tree)
  state = state.replace(opt_d=zeros(state.params[D]), opt_ge=zeros(
      {name: state.params[name] for name in objective.eg_networks}))
  monkeypatch.setattr(state_lib, "make_optimizers",
                      lambda _: (_recording_optimizer(), _recording_optimizer()))
  batch = _batch(config, nets)
  new_state, metrics = jax.jit(functools.partial(step_lib.train_step, nets=nets,
                                                 config=config))(state, batch)

  # The reference: each micro-batch on its own, as the step documents it. The latents are
  # drawn for the whole batch and split; E's noise is fold_in(key, j); the state carries on.
  step_key = jax.random.fold_in(state.rng, state.step)
  latent_key, noise_key = jax.random.split(
      jax.random.split(jax.random.fold_in(step_key, 0), 1)[0])
  z, fake_labels = step_lib.sample_latents(latent_key, nets, config.batch_size)
  inputs = {"images": batch["image"][0], "labels": batch["label"][0], "z": z,
            "fake_labels": fake_labels}
  d_microbatch = jax.jit(functools.partial(step_lib.d_microbatch, nets=nets,
                                           objective=objective))
  d_state, d_grads, d_metrics = state.model_state[D], [], []
  for j in range(K):
    d_state, (g, m) = d_microbatch(
        state.params[D], d_state, _microbatch(inputs, j), jax.random.fold_in(noise_key, j),
        state=state)
    d_grads.append(g)
    d_metrics.append(m)
  mean = lambda trees: jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)
  _assert_close(new_state.opt_d, mean(d_grads), "D's gradient")
  _assert_close(new_state.model_state[D], d_state, "D's spectral state after K micro-batches")
  for key, value in mean(d_metrics).items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

  latent_key, noise_key = jax.random.split(jax.random.fold_in(step_key, 1))
  regression_key = jax.random.fold_in(step_key, 2)
  z, fake_labels = step_lib.sample_latents(latent_key, nets, config.batch_size)
  inputs = {"images": batch["image"][-1], "labels": batch["label"][-1], "z": z,
            "fake_labels": fake_labels}
  ge_params = {name: state.params[name] for name in objective.eg_networks}
  ortho = functools.partial(losses.orthogonal_regularizer, beta=config.loss.ortho_beta,
                            part=0, parts=1)

  @jax.jit
  def eg_microbatch(ge_params, model_state, mb, keys, state, d_vars):
    score = lambda x, c: nets.discriminator.apply(d_vars, x, c, train=False)
    return step_lib.eg_microbatch(ge_params, model_state, mb, keys, state=state, score=score,
                                  nets=nets, objective=objective, ortho_fn=ortho)

  d_vars = {"params": state.params[D], **d_state}  # No update was applied to D.
  model_state, eg_grads, eg_metrics = state.model_state, [], []
  for j in range(K):
    # Each micro-batch's whole loss, regulariser included: the mean of these gradients is
    # what one update of the full batch would take.
    model_state, (g, m) = eg_microbatch(
        ge_params, model_state, _microbatch(inputs, j),
        (jax.random.fold_in(noise_key, j), jax.random.fold_in(regression_key, j)), state,
        d_vars)
    eg_grads.append(g)
    eg_metrics.append(m)
  _assert_close(new_state.opt_ge, mean(eg_grads), "E/G's gradient")
  for name in objective.eg_networks:  # Each network's gradient is non-trivial.
    assert np.abs(flat(new_state.opt_ge[name])).max() > 0, name
  for name in set(model_state) - {D}:  # G's and E's, threaded through the micro-batches.
    _assert_close(new_state.model_state[name], model_state[name], f"{name}'s state")
  expected = mean(eg_metrics)
  assert {"eg_loss", "ortho_loss"} <= set(expected)
  if variant == "lifecycle":
    assert {"latent_regression", "image_reconstruction"} <= set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  assert float(metrics["ortho_loss"]) > 0


def test_loop_forms_agree_on_8_devices_and_the_ema_and_adam_step_once_per_update():
  # The scan (TPU/GPU's form) and the unrolled program (the CPU's) compute the same update,
  # with the micro-batches sharded over 8 devices.
  config = tiny("lifecycle", optim__microbatches=K, optim__eps=1e-4, ema__start_step=0,
                ema__decay=0.5, optim__d_steps=2)
  nets = networks.build(config.model)
  mesh = sharding.make_mesh((("data", 8),), jax.devices()[:8])
  config.batch_size = 16  # 2 examples a device, one per micro-batch.
  results = {}
  for loop in ("unrolled", "scan"):
    config.optim.microbatch_loop = loop
    abstract = state_lib.abstract_train_state(nets, config, mesh)
    state = state_lib.make_init_fn(nets, config, abstract)(jax.random.PRNGKey(0))
    step = step_lib.make_train_step(nets, config, mesh, abstract)
    batch = jax.device_get(_batch(config, nets))
    init = jax.device_get(state)  # Before the step, which donates it.
    results[loop] = jax.device_get(step(state, step_lib.to_global(batch, config, nets, mesh)))
  (unrolled, m_unrolled), (scanned, m_scanned) = results["unrolled"], results["scan"]
  for name in unrolled.params:
    _assert_close(scanned.params[name], unrolled.params[name], name)
  _assert_close(scanned.model_state, unrolled.model_state, "model state")
  for key in m_unrolled:
    np.testing.assert_allclose(m_scanned[key], m_unrolled[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)

  # Once per update: the EMA (from start_step 0, ema = decay * ema + (1 - decay) * params)
  # and Adam's step count (one per D update, d_steps of them, and one for E/G), whatever K.
  np.testing.assert_allclose(flat(unrolled.ema_params),
                             0.5 * flat(init.ema_params) + 0.5 * flat(unrolled.params[G]),
                             rtol=1e-5, atol=1e-7)
  counts = lambda opt: {int(x) for x in jax.tree_util.tree_leaves(opt)
                        if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)}
  assert counts(unrolled.opt_d) == {config.optim.d_steps}
  assert counts(unrolled.opt_ge) == {1}


def test_microbatches_that_do_not_split_each_device_are_refused():
  config = tiny(optim__microbatches=3)  # 8 examples on 8 devices: 1 each.
  with pytest.raises(ValueError, match=r"optim.microbatches=3 does not divide the 1 "
                                       r"examples each of the 8 devices"):
    state_lib.setup(config)
  with pytest.raises(ValueError, match="optim.microbatch_loop='while'"):
    state_lib.setup(tiny(optim__microbatch_loop="while"))
