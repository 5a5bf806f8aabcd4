"""Value tests of the shared layers: spectral norm, (conditional, cross-replica) batch norm,
self-attention."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from bigbigan_jax.models import layers


def _converge_sn(module, variables, x, steps=60):
  """Runs `steps` training calls so the power iteration converges; returns the state."""
  apply = jax.jit(lambda v: module.apply(v, x, train=True, mutable=["spectral"])[1])
  for _ in range(steps):
    variables = {**variables, **apply(variables)}
  return variables


def test_spectral_norm_dense_top_singular_value_is_one():
  module = layers.SNDense(24, use_bias=False, eps=1e-12)
  x = jnp.eye(40)
  variables = module.init(jax.random.PRNGKey(0), x, train=False)
  # A kernel with a spread of singular values, so power iteration has work to do.
  kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (40, 24))) * np.linspace(
      0.2, 3.0, 24)
  variables = {"params": {"dense": {"kernel": jnp.asarray(kernel)}},
               "spectral": variables["spectral"]}
  variables = _converge_sn(module, variables, x)

  normalized = np.asarray(module.apply(variables, x, train=False))  # eye @ W/sigma
  top = np.linalg.svd(normalized, compute_uv=False)[0]
  assert abs(top - 1.0) < 1e-3
  sigma = float(variables["spectral"]["sn"]["dense/kernel/sigma"])
  np.testing.assert_allclose(sigma, np.linalg.svd(kernel, compute_uv=False)[0], rtol=1e-3)


def test_spectral_norm_conv_normalises_the_reshaped_kernel():
  module = layers.SNConv(8, 3, use_bias=False, eps=1e-12)
  x = jnp.ones((1, 6, 6, 5))
  variables = _converge_sn(module, module.init(jax.random.PRNGKey(0), x, train=False), x)
  kernel = np.asarray(variables["params"]["conv"]["kernel"])
  sigma = np.linalg.svd(kernel.reshape(-1, 8), compute_uv=False)[0]
  np.testing.assert_allclose(variables["spectral"]["sn"]["conv/kernel/sigma"], sigma, rtol=1e-3)
  # The layer's output equals a plain convolution with W / sigma.
  expected = jax.lax.conv_general_dilated(x, kernel / sigma, (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(module.apply(variables, x, train=False), expected, rtol=2e-3,
                             atol=1e-5)


def test_spectral_norm_state_frozen_in_eval_and_has_no_gradient():
  module = layers.SNDense(6)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 5))
  variables = module.init(jax.random.PRNGKey(0), x, train=False)
  _, new_state = module.apply(variables, x, train=False, mutable=["spectral"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, new_state["spectral"],
                         variables["spectral"])
  _, trained = module.apply(variables, x, train=True, mutable=["spectral"])
  assert not np.allclose(trained["spectral"]["sn"]["dense/kernel/u"],
                         variables["spectral"]["sn"]["dense/kernel/u"])

  def loss(spectral):
    return jnp.sum(module.apply({"params": variables["params"], "spectral": spectral}, x,
                                train=True, mutable=["spectral"])[0] ** 2)

  grads = jax.grad(loss)(variables["spectral"])
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(grads))


def test_conditional_bn_with_zero_projections_is_plain_bn():
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 8)) * 3.0 + 1.5
  cond = jax.random.normal(jax.random.PRNGKey(1), (6, 10))
  cbn = layers.ConditionalBatchNorm(eps=1e-5)
  variables = cbn.init(jax.random.PRNGKey(2), x, cond, train=False)
  params = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
  out, state = cbn.apply({**variables, "params": params}, x, cond, train=True,
                         mutable=["batch_stats", "spectral"])
  bn = layers.BatchNorm(eps=1e-5)
  bn_vars = bn.init(jax.random.PRNGKey(3), x, train=False)
  expected, bn_state = bn.apply(bn_vars, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out, expected, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         state["batch_stats"], bn_state["batch_stats"])
  # And both equal the textbook formula with the batch's biased variance.
  xn = np.asarray(x)
  ref = (xn - xn.mean((0, 1, 2))) / np.sqrt(xn.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-4)
  # The running statistics moved by (1 - momentum) towards the batch's.
  np.testing.assert_allclose(state["batch_stats"]["norm"]["mean"],
                             0.1 * xn.mean((0, 1, 2)), rtol=1e-5)


def test_conditional_bn_gain_is_one_plus_projection():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 8))
  cond = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  cbn = layers.ConditionalBatchNorm(eps=1e-5)
  variables = cbn.init(jax.random.PRNGKey(2), x, cond, train=False)
  out = cbn.apply(variables, x, cond, train=False)  # Running stats at init: mean 0, var 1.
  # Recover W_gamma c and W_beta c from the layer itself on a zero and a unit input.
  zero = cbn.apply(variables, jnp.zeros_like(x), cond, train=False)  # = W_beta c
  one = cbn.apply(variables, jnp.ones_like(x) * np.sqrt(1 + 1e-5), cond, train=False)
  gain = one - zero  # = 1 + W_gamma c
  np.testing.assert_allclose(out, x / np.sqrt(1 + 1e-5) * gain + zero, atol=1e-5)
  assert not np.allclose(gain, 1.0)


def _mesh8():
  return Mesh(np.array(jax.devices()[:8]), ("data",))


def test_cross_replica_bn_on_8_devices_equals_one_device():
  assert len(jax.devices()) >= 8, "conftest.py sets 8 CPU devices"
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 8)) * 2.0 + 0.5
  cond = jax.random.normal(jax.random.PRNGKey(1), (16, 5))
  cbn = layers.ConditionalBatchNorm()
  variables = cbn.init(jax.random.PRNGKey(2), x, cond, train=False)
  step = lambda v, a, c: cbn.apply(v, a, c, train=True, mutable=["batch_stats", "spectral"])
  single = jax.jit(step)(variables, x, cond)

  mesh = _mesh8()
  batch = NamedSharding(mesh, P("data"))
  sharded = jax.jit(step)(variables, jax.device_put(x, batch), jax.device_put(cond, batch))
  assert len(sharded[0].sharding.device_set) == 8
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         single, sharded)
  # Per-shard statistics would differ: the shards have different means.
  per_shard = np.asarray(x).reshape(8, 2, -1, 8).mean((1, 2))
  assert np.ptp(per_shard, axis=0).max() > 0.1


def test_batch_moments_with_axis_name_equals_global():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3, 3, 4)) + jnp.arange(16.)[:, None, None,
                                                                                None]
  mesh = _mesh8()
  local = jax.shard_map(lambda a: layers.batch_moments(a, "data"), mesh=mesh,
                        in_specs=P("data"), out_specs=P())
  np.testing.assert_allclose(local(x), layers.batch_moments(x), rtol=1e-5)


def test_batch_moments_one_pass_around_a_shift_matches_two_pass_in_float64():
  """E[(x - s)²] - E[x - s]² in float32 against the float64 two-pass variance: exact to
  float32 rounding when the shift is near the mean, even for a mean 1e4 standard deviations
  away from 0 (where s = 0, the naive one-pass formula, loses every digit). Gradients equal
  the two-pass formula's: s carries none."""
  rng = np.random.default_rng(0)
  x64 = rng.normal(1e4, 1.0, (64, 4, 4, 3)) * np.array([1.0, 0.5, 2.0])
  x = jnp.asarray(x64, jnp.float32)
  true_mean, true_var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  shift = jnp.asarray(true_mean + 3.0, jnp.float32)  # A running mean a few std off.
  mean, var = layers.batch_moments(x, shift=shift)
  np.testing.assert_allclose(mean, true_mean, rtol=1e-6)
  np.testing.assert_allclose(var, true_var, rtol=1e-3)
  _, naive_var = layers.batch_moments(x)
  assert np.max(np.abs(np.asarray(naive_var) / true_var - 1)) > 1e-2  # Why the shift.

  def two_pass(a):
    m = jnp.mean(a, (0, 1, 2))
    return jnp.mean(jnp.square(a - m), (0, 1, 2))

  small = jnp.asarray(rng.normal(0.3, 1.0, (8, 2, 2, 3)), jnp.float32)
  weights = jnp.asarray([1.0, -2.0, 0.5])
  near = jnp.full((3,), 0.2)
  grad = jax.grad(lambda a: jnp.sum(weights * layers.batch_moments(a, shift=near)[1]))(small)
  expected = jax.grad(lambda a: jnp.sum(weights * two_pass(a)))(small)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_attention_is_identity_at_init_and_matches_formula():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  attn = layers.SelfAttention(eps=1e-12)
  variables = attn.init(jax.random.PRNGKey(1), x, train=False)
  np.testing.assert_array_equal(attn.apply(variables, x, train=False), x)

  variables = _converge_sn(attn, variables, x)
  params = {**variables["params"], "gamma": jnp.asarray(0.7)}
  out = attn.apply({**variables, "params": params}, x, train=False)

  def w(name):  # The spectrally normalised 1x1 kernel as a (C_in, C_out) matrix.
    k = np.asarray(params[name]["conv"]["kernel"]).reshape(-1, np.shape(
        params[name]["conv"]["kernel"])[-1])
    return k / np.linalg.svd(k, compute_uv=False)[0]

  xn = np.asarray(x)
  pool = lambda a: a.reshape(2, 4, 2, 4, 2, -1).max((2, 4)).reshape(2, 16, -1)
  theta = (xn @ w("theta")).reshape(2, 64, -1)
  phi, g = pool(xn @ w("phi")), pool(xn @ w("g"))
  logits = theta @ phi.transpose(0, 2, 1)
  beta = np.exp(logits - logits.max(-1, keepdims=True))
  beta /= beta.sum(-1, keepdims=True)
  o = (beta @ g).reshape(2, 8, 8, -1) @ w("o")
  np.testing.assert_allclose(out, xn + 0.7 * o, rtol=2e-3, atol=2e-4)


def test_attention_rejects_narrow_inputs():
  with pytest.raises(ValueError, match="divisible by 8"):
    layers.SelfAttention().init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 12)), train=False)


def test_upsample_is_nearest_neighbour():
  x = jnp.arange(4.).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(layers.upsample2(x)[0, :, :, 0],
                                [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


@pytest.mark.parametrize("kh,kw", [(1, 1), (3, 3), (5, 5), (1, 3), (5, 3)])
def test_matmul_grad_conv_equals_xla_conv_in_value_and_gradients(kh, kw):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 7, 6))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (kh, kw, 6, 5))
  xla = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  np.testing.assert_allclose(layers.conv_same_matmul_grad(x, kernel), xla(x, kernel),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(layers.conv_same_matmul_grad), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(xla), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_sn_conv_weight_grad_choice_keeps_params_and_values():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  xla = layers.SNConv(8, 3, weight_grad="xla")
  matmul = layers.SNConv(8, 3, weight_grad="matmul")
  v = xla.init(jax.random.PRNGKey(2), x, train=False)
  v2 = matmul.init(jax.random.PRNGKey(2), x, train=False)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v2)
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v2)):
    np.testing.assert_array_equal(a, b)  # Same names, same initial values: checkpoints agree.
  f = lambda m: lambda p: jnp.sum(m.apply({**v, "params": p}, x, train=True,
                                          mutable=["spectral"])[0] ** 2)
  np.testing.assert_allclose(jax.grad(f(matmul))(v["params"])["conv"]["kernel"],
                             jax.grad(f(xla))(v["params"])["conv"]["kernel"], rtol=1e-4,
                             atol=1e-5)


def test_avg_pool_is_the_mean_of_each_2x2_window():
  x = jnp.arange(16.).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(layers.avg_pool2(x)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])


def _conv3(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("mode", ["up", "down"])
def test_fused_resampling_conv_equals_the_separate_ops_in_value_and_gradients(mode):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 8, 5))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 7))
  if mode == "up":
    fused, separate = layers.upsample_conv3x3, lambda x, w: _conv3(layers.upsample2(x), w)
  else:
    fused, separate = layers.conv3x3_avg_pool, lambda x, w: layers.avg_pool2(_conv3(x, w))
  np.testing.assert_allclose(fused(x, kernel), separate(x, kernel), rtol=1e-5, atol=1e-5)
  assert fused(x, kernel).shape == separate(x, kernel).shape
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  got = jax.grad(loss(fused), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(separate), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_fused_resampling_conv_rejects_what_it_cannot_compute():
  with pytest.raises(ValueError, match="3x3 kernel"):
    layers.upsample_conv3x3(jnp.ones((1, 4, 4, 2)), jnp.ones((5, 5, 2, 2)))
  with pytest.raises(ValueError, match="even map"):
    layers.conv3x3_avg_pool(jnp.ones((1, 5, 4, 2)), jnp.ones((3, 3, 2, 2)))


@pytest.mark.parametrize("resample", ["up", "down"])
def test_sn_conv_fused_resampling_keeps_params_and_values(resample):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  separate = layers.SNConv(8, 3, resample=resample)
  fused = layers.SNConv(8, 3, resample=resample, fused_resample=True)
  v = separate.init(jax.random.PRNGKey(2), x, train=False)
  v2 = fused.init(jax.random.PRNGKey(2), x, train=False)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v2)
  v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # A non-zero bias.
  np.testing.assert_allclose(fused.apply(v, x, train=False), separate.apply(v, x, train=False),
                             rtol=1e-5, atol=1e-5)
