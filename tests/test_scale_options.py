"""The memory knobs the paper configs use on TPU pods change memory, not the math.

`model.remat` (recompute residual blocks in the backward pass) and `shard_params` (params and
optimiser state split over "data") must give the step a plain replicated run gives;
`model.dtype="bfloat16"` (activations only; params stay float32) must stay close to float32.
All on the tiny config's 16 px `lifecycle` variant (one D update a step, one-layer heads),
whose step compiles in about half the time and has every layer kind the options touch.
"""

import jax
import pytest
import jax.numpy as jnp
import numpy as np
from train_steps import flat
from train_steps import one_step

from bigbigan_jax import sharding
from bigbigan_jax.models import networks

pytestmark = pytest.mark.slow  # compiles the step three more ways (remat, shard_params, bf16).


def _tiny(load_config, variant="lifecycle", **model_overrides):
  config = load_config(f"tiny.py:{variant}")
  config.optim.d_steps = 1
  # Adam's first update is about lr * sign(grad): with eps=1e-8 a gradient that is ~0 either
  # way can flip sign under a different summation order and move a weight by 2 * lr (see
  # test_train.test_step_on_8_devices_equals_1_device). A larger eps keeps the comparison
  # about the step's math.
  config.optim.eps = 1e-4
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def _assert_same_step(a, b, rtol, atol):
  (state_a, metrics_a, _), (state_b, metrics_b, _) = a, b
  for name in state_a.params:
    np.testing.assert_allclose(flat(state_b.params[name]), flat(state_a.params[name]),
                               rtol=rtol, atol=atol, err_msg=name)
  np.testing.assert_allclose(flat(state_b.model_state), flat(state_a.model_state),
                             rtol=rtol, atol=atol)
  np.testing.assert_allclose(flat((state_b.opt_d, state_b.opt_ge)),
                             flat((state_a.opt_d, state_a.opt_ge)), rtol=rtol, atol=atol)
  for key in metrics_a:
    np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=rtol, atol=atol,
                               err_msg=key)


def test_remat_gives_the_plain_step(load_config):
  # nn.remat reruns the same forward ops in the backward pass: only float32 rounding may
  # differ (XLA fuses and orders the recomputed ops differently; seen: 5e-7 absolute on
  # params of order 1e-2 after one step), so the tolerance is shard_params' below.
  # On 8 devices, as the shard_params test's reference: the plain step compiles once.
  plain = one_step(_tiny(load_config), 8)
  remat = one_step(_tiny(load_config, remat=True), 8)
  _assert_same_step(plain, remat, rtol=1e-4, atol=1e-6)


def test_shard_params_gives_the_replicated_step(load_config):
  config = _tiny(load_config)
  replicated = one_step(config, 8)
  config.shard_params = True
  sharded = one_step(config, 8)
  # It really sharded something: some leaf is split 8 ways over "data".
  specs = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(sharded[2])]
  assert any(sharding.DATA in spec for spec in specs)
  # Sharded reductions sum in another order: float32 rounding, as in test_train's 8-vs-1.
  _assert_same_step(replicated, sharded, rtol=1e-4, atol=1e-6)


def _forward(config):
  """G(z), D's scores on real and fake pairs, and E's outputs, at shared init params,
  in training mode (batch statistics), as the train step runs them."""
  nets = networks.build(config.model)
  variables = jax.jit(lambda key: nets.init(key, batch=2))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  b, r = 16, nets.encoder_resolution
  z = jnp.asarray(rng.standard_normal((b, nets.z_dim)), jnp.float32)
  x = jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)), jnp.float32)

  def run(v):
    mutable = ["spectral", "batch_stats"]
    fake, _ = nets.generator.apply(v["generator"], z, train=True, mutable=mutable)
    enc, _ = nets.encoder.apply(v["encoder"], x, train=True, mutable=mutable,
                                rngs={"noise": jax.random.PRNGKey(2)})
    real_x = networks.pool_for_discriminator(x, nets.resolution)
    scores, _ = nets.discriminator.apply(
        v["discriminator"], jnp.concatenate([real_x, fake]),
        jnp.concatenate([enc["z_sample"], z]), train=True, mutable=mutable)
    return fake, scores, enc

  return jax.jit(run)(variables)


def test_bfloat16_activations_stay_close_to_float32(load_config):
  fake32, scores32, enc32 = _forward(_tiny(load_config))
  fake16, scores16, enc16 = _forward(_tiny(load_config, dtype="bfloat16"))
  # Params stay float32 either way: the knob touches activations only.
  nets = networks.build(_tiny(load_config, dtype="bfloat16").model)
  params = jax.eval_shape(lambda k: nets.init(k), jax.random.PRNGKey(0))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
  # Outputs leave the networks as float32 (tanh, pooled features and scores are upcast).
  assert fake16.dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in scores16.values())
  # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.2% per op); through ~20 layers
  # with batch norm the errors add up to a few percent of an output's scale. The bounds
  # below are 2-3x what this tiny network shows (mean error at most 0.008 of an output's
  # scale, worst element 0.057: one pixel in 49K), and far below the outputs' scale
  # (images in [-1, 1]; scores and z of order 1), so a dtype bug (e.g. bf16 parameters or
  # batch statistics) or a broken cast still fails.
  def close(a, b, scale, name):
    err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    print(f"{name}: mean {err.mean() / scale:.4f}, max {err.max() / scale:.4f} of scale")
    assert err.mean() <= 0.02 * scale, name
    assert err.max() <= 0.15 * scale, name
  close(fake16, fake32, 1.0, "images")
  for key in scores32:
    close(scores16[key], scores32[key], float(np.max(np.abs(scores32[key]))) + 1e-3, key)
  for key in ("z_mean", "z_stdev", "avepool_feat"):
    close(enc16[key], enc32[key], float(np.max(np.abs(enc32[key]))) + 1e-3, key)
