"""The direction of learning, on the tiny BigBiGAN: D's updates make it tell the pairs apart
better, D's gradient is that of the paper's loss on pairs built by hand, and one E/G update
lowers the encoder pairs' scores and raises the generator pairs'. (Every other step test
compares two layouts of the same step, which a sign error would pass.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_steps import flat
from train_steps import initial_state

from bigbigan_jax.models import networks
from bigbigan_jax.training import step as step_lib

pytestmark = pytest.mark.slow  # Three compiles of the train step.


def _setup(load_config, **optim):
  # The 16 px tiny BigBiGAN (its step compiles in about half the time), with 2 D updates a
  # step unless told otherwise, and all three scores hinged.
  config = load_config("tiny.py:lifecycle")
  # BigGAN's Adam eps (the tiny configs' is 1e-4): Adam's first update is then -lr · sign(g)
  # for all but the smallest gradients, which the sign check below counts on.
  config.optim.update({"d_steps": 2, "eps": 1e-8, **optim})
  nets = networks.build(config.model)
  state = initial_state(config)
  rng = np.random.default_rng(0)
  r, d, b = nets.encoder_resolution, config.optim.d_steps, config.batch_size
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (d, b, r, r, 3)), jnp.float32),
           "label": jnp.zeros((d, b), jnp.int32)}
  step = jax.jit(functools.partial(step_lib.train_step, nets=nets, config=config))
  return config, nets, state, batch, step


def test_d_updates_with_g_and_e_frozen_raise_ds_accuracy(load_config):
  config, _, state, batch, step = _setup(load_config, g_lr=0.0, e_lr=0.0, d_lr=1e-3)
  accuracy, loss = [], []
  g0, e0 = flat(state.params["generator"]), flat(state.params["encoder"])
  for _ in range(5):  # 10 D updates on the same real images.
    state, metrics = step(state, batch)
    accuracy.append(float(metrics["d_accuracy"]))
    loss.append(float(metrics["d_loss"]))
  # Each step draws fresh z (and E's noise), so the last steps' mean is what is compared.
  assert np.mean(accuracy[-3:]) >= accuracy[0] + 0.25, accuracy
  assert np.mean(loss[-3:]) < loss[0], loss
  # G and E did not move (a learning rate of 0: Adam's update is exactly 0).
  np.testing.assert_array_equal(flat(state.params["generator"]), g0)
  np.testing.assert_array_equal(flat(state.params["encoder"]), e0)
  assert config.loss.unary_x and config.loss.unary_z  # The tiny config hinges all three.


def test_d_gradient_is_the_gradient_of_the_hinge_on_pairs_built_by_hand(load_config):
  config, nets, state, batch, step = _setup(load_config, d_steps=1)
  batch = {k: v[:1] for k, v in batch.items()}
  new_state, metrics = step(state, batch)

  # The pairs, built here from the step's documented randomness: step s draws from
  # fold_in(rng, s); the D update from fold_in(., 0), split into (latents, E's noise).
  step_key = jax.random.fold_in(state.rng, state.step)
  latent_key, noise_key = jax.random.split(jax.random.split(jax.random.fold_in(step_key, 0),
                                                            1)[0])
  images = batch["image"][0]

  @jax.jit  # One program: eager, each operation would be compiled on its own.
  def hinge_gradient(state):
    z = jax.random.normal(jax.random.split(latent_key)[0], (config.batch_size, nets.z_dim))
    g_vars = {"params": state.params["generator"], **state.model_state["generator"]}
    fake = nets.generator.apply(g_vars, z, None, train=True,
                                mutable=["spectral", "batch_stats"])[0]
    e_vars = {"params": state.params["encoder"], **state.model_state["encoder"]}
    e_z = nets.encoder.apply(e_vars, images, train=True, rngs={"noise": noise_key},
                             mutable=["batch_stats"])[0]["z_sample"]
    x = jnp.concatenate([networks.pool_for_discriminator(images, nets.resolution), fake])
    c = jnp.concatenate([e_z, z])
    y = jnp.concatenate([jnp.ones(config.batch_size), -jnp.ones(config.batch_size)])

    def hinge(d_params):
      scores = nets.discriminator.apply(
          {"params": d_params, **state.model_state["discriminator"]}, x, c, train=True,
          mutable=["spectral"])[0]
      # Encoder pairs y=+1, generator pairs y=-1; each score hinged, averaged over the three.
      return sum(jnp.mean(jax.nn.relu(1 - y[:config.batch_size] * s[:config.batch_size]))
                 + jnp.mean(jax.nn.relu(1 - y[config.batch_size:] * s[config.batch_size:]))
                 for s in (scores["s_x"], scores["s_z"], scores["s_xz"])) / 3

    return jax.grad(hinge)(state.params["discriminator"])

  grads = hinge_gradient(state)
  g = flat(grads)
  np.testing.assert_allclose(metrics["grad_norm/d"], np.linalg.norm(g), rtol=1e-4)
  # Adam's first update with β1 = 0 is -lr · g / (|g| + eps): D moved against the gradient.
  moved = flat(new_state.params["discriminator"]) - flat(state.params["discriminator"])
  big = np.abs(g) > 100 * config.optim.eps
  assert big.mean() > 0.5
  np.testing.assert_array_equal(np.sign(moved[big]), -np.sign(g[big]))


def test_one_eg_update_lowers_encoder_pair_scores_and_raises_generator_pair_scores(
    load_config):
  # D frozen; a small step, so that the update's first-order effect is what is measured.
  config, nets, state, batch, step = _setup(load_config, d_lr=0.0, g_lr=1e-5, e_lr=1e-5)
  new_state, _ = step(state, batch)

  # The E/G update's own latents and noise: fold_in(fold_in(rng, step), 1).
  latent_key, noise_key = jax.random.split(
      jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1))
  z = jax.random.normal(jax.random.split(latent_key)[0], (config.batch_size, nets.z_dim))
  images = batch["image"][-1]
  d_vars = {"params": state.params["discriminator"], **state.model_state["discriminator"]}

  @jax.jit
  def pair_scores(s):
    e_vars = {"params": s.params["encoder"], **state.model_state["encoder"]}
    g_vars = {"params": s.params["generator"], **state.model_state["generator"]}
    e_z = nets.encoder.apply(e_vars, images, train=True, rngs={"noise": noise_key},
                             mutable=["batch_stats"])[0]["z_sample"]
    fake = nets.generator.apply(g_vars, z, None, train=True,
                                mutable=["spectral", "batch_stats"])[0]
    x_real = networks.pool_for_discriminator(images, nets.resolution)
    enc = nets.discriminator.apply(d_vars, x_real, e_z, train=False)
    gen = nets.discriminator.apply(d_vars, fake, z, train=False)
    total = lambda d: sum(jnp.mean(v) for v in d.values())
    return total(enc), total(gen)

  scores = lambda s: tuple(map(float, pair_scores(s)))

  enc_before, gen_before = scores(state)
  enc_after, gen_after = scores(new_state)
  assert enc_after < enc_before, (enc_before, enc_after)
  assert gen_after > gen_before, (gen_before, gen_after)
