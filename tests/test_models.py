"""The networks' wiring, checked by value on the tiny configs, and config validation."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_steps import initial_state

from bigbigan_jax import config as config_lib
from bigbigan_jax.models import encoder as encoder_lib
from bigbigan_jax.models import networks

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@functools.lru_cache(maxsize=None)
def _tiny(variant):
  """The networks of configs/tiny.py:VARIANT and their variables: the initial train state's
  (the init program the step tests compile), as {network: {"params", "spectral", ...}}."""
  config = config_lib.load(str(CONFIGS / f"tiny.py:{variant}"))
  nets = networks.build(config.model)
  state = initial_state(config)
  return nets, {name: {"params": params, **state.model_state[name]}
                for name, params in state.params.items()}


@pytest.mark.slow
def test_generator_hierarchical_z_reaches_only_its_block():
  nets, variables = _tiny("bigbigan")
  g = nets.generator
  gen = jax.jit(lambda v, z: g.apply(v, z, train=False))
  z = jax.random.normal(jax.random.PRNGKey(1), (4, nets.z_dim))
  chunk = nets.z_dim // g.num_chunks
  base = gen(variables["generator"], z)
  assert base.shape == (4, 32, 32, 3) and base.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(base))) <= 1.0

  def bump(i):  # z with only chunk i changed
    return z.at[:, i * chunk:(i + 1) * chunk].add(1.0)

  for i in range(g.num_chunks):
    assert not np.allclose(gen(variables["generator"], bump(i)), base), f"chunk {i} unused"

  # Chunk 2 conditions only block 1: with block 1's CBN projections zeroed it has no effect,
  # while chunk 1 (block 0) still does.
  params = variables["generator"]["params"]
  block1 = dict(params["block_1"])
  for name in ("cbn1", "cbn2"):
    block1[name] = jax.tree_util.tree_map(jnp.zeros_like, block1[name])
  zero_block1 = {**variables["generator"], "params": {**params, "block_1": block1}}
  ref = gen(zero_block1, z)
  np.testing.assert_allclose(gen(zero_block1, bump(2)), ref, atol=1e-6)
  assert not np.allclose(gen(zero_block1, bump(1)), ref)


@pytest.mark.slow
def test_class_conditional_generator_and_discriminator_use_labels():
  nets, variables = _tiny("biggan")
  z = jax.random.normal(jax.random.PRNGKey(1), (4, nets.z_dim))
  y0, y1 = jnp.zeros(4, jnp.int32), jnp.arange(4, dtype=jnp.int32)
  gen = lambda y: nets.generator.apply(variables["generator"], z, y, train=False)
  assert not np.allclose(gen(y0)[1:], gen(y1)[1:])
  np.testing.assert_allclose(gen(y0)[0], gen(y1)[0], atol=1e-6)  # Row 0 has label 0 in both.
  x = gen(y0)
  dis = lambda y: nets.discriminator.apply(variables["discriminator"], x, y, train=False)
  assert dis(y0).shape == (4,)
  assert not np.allclose(dis(y0)[1:], dis(y1)[1:])
  with pytest.raises(ValueError, match="class-conditional"):
    nets.generator.apply(variables["generator"], z, train=False)


def test_unconditional_generator_has_a_learned_constant_not_an_embedding():
  nets, variables = _tiny("bigbigan")
  params = variables["generator"]["params"]
  assert "shared" not in params
  assert params["class_constant"].shape == (8,)


def test_joint_discriminator_scores_respond_to_their_inputs():
  nets, variables = _tiny("bigbigan")
  d = jax.jit(lambda x, z: nets.discriminator.apply(variables["discriminator"], x, z,
                                                    train=False))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.PRNGKey(2), (4, nets.z_dim))
  a, b = d(x, z), d(x, z + 1.0)
  assert set(a) == {"s_x", "s_z", "s_xz"} and all(v.shape == (4,) for v in a.values())
  np.testing.assert_array_equal(a["s_x"], b["s_x"])  # s_x sees x only
  assert not np.allclose(a["s_z"], b["s_z"])
  assert not np.allclose(a["s_xz"], b["s_xz"])  # the joint score changes with z alone
  c = d(x * 0.5, z)
  np.testing.assert_array_equal(a["s_z"], c["s_z"])  # s_z sees z only
  assert not np.allclose(a["s_xz"], c["s_xz"])


@pytest.mark.slow
def test_encoder_outputs_and_positive_stdev():
  nets, variables = _tiny("bigbigan")
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 64, 3), minval=-1, maxval=1)
  enc = lambda v, key: nets.encoder.apply(v, x, train=False, rngs={"noise": key})
  out = enc(variables["encoder"], jax.random.PRNGKey(2))
  assert out["avepool_feat"].shape == (4, 128) and out["bn_crelu_feat"].shape == (4, 256)
  # z_sample = z_mean + z_stdev * eps with eps drawn from the "noise" stream alone.
  eps = lambda o: (o["z_sample"] - o["z_mean"]) / o["z_stdev"]
  other_x = nets.encoder.apply(variables["encoder"], x[::-1] * 0.3, train=False,
                               rngs={"noise": jax.random.PRNGKey(2)})
  np.testing.assert_allclose(eps(out), eps(other_x), rtol=1e-4, atol=1e-4)
  assert not np.allclose(eps(out), eps(enc(variables["encoder"], jax.random.PRNGKey(3))))
  # bn_crelu = [relu(a_hat), relu(-a_hat)]: the halves never overlap, their difference is a_hat.
  pos, neg = np.split(np.asarray(out["bn_crelu_feat"]), 2, axis=-1)
  assert np.all(pos * neg == 0)
  # Even a huge negative pre-activation leaves the stdev positive.
  params = variables["encoder"]["params"]
  bias = params["z_params"]["bias"].at[nets.z_dim:].set(-1e4)
  crushed = {**variables["encoder"],
             "params": {**params, "z_params": {**params["z_params"], "bias": bias}}}
  stdev = enc(crushed, jax.random.PRNGKey(2))["z_stdev"]
  assert np.all(np.asarray(stdev) > 0)
  assert np.all(np.asarray(out["z_stdev"]) > 0)


def test_revnet_unit_is_reversible():
  unit = encoder_lib.ReversibleUnit(width=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
  variables = unit.init(jax.random.PRNGKey(1), x, False)
  y = unit.apply(variables, x, False)
  assert not np.allclose(y, x)
  np.testing.assert_allclose(unit.apply(variables, y, method="inverse"), x, atol=1e-5)


@pytest.mark.slow
def test_revnet_encoder_shapes():
  model = config_lib.base_config().model
  model.encoder.arch, model.encoder.width_multiplier = "revnet", 4
  nets = networks.build(model)
  shapes = jax.eval_shape(nets.init, jax.random.PRNGKey(0))
  out = jax.eval_shape(
      lambda v, x: nets.encoder.apply(v, x, train=False, rngs={"noise": jax.random.PRNGKey(0)}),
      shapes["encoder"], *nets.example_inputs(2)["encoder"])
  assert out["avepool_feat"].shape == (2, 8192)
  assert out["bn_crelu_feat"].shape == (2, 16384)


@pytest.mark.parametrize("field,value,message", [
    ("resolution", 48, "model.resolution=48"),
    ("z_dim", 121, "multiple of 6"),
    ("ch", 0, "model.ch=0"),
    ("kind", "vae", "model.kind"),
    ("g_attention_res", 24, "model.g_attention_res"),
    ("encoder.arch", "vgg", "'resnet_v2', 'revnet'"),
    ("encoder.depth", 101, "model.encoder.depth"),
    ("encoder.resolution", 192, "model.encoder.resolution"),
])
def test_invalid_model_settings_raise_before_init(field, value, message):
  model = config_lib.base_config().model
  target = model
  *parents, leaf = field.split(".")
  for p in parents:
    target = target[p]
  target[leaf] = value
  with pytest.raises(ValueError, match=message) as error:
    networks.build(model)
  assert "config.model." in str(error.value)  # names the field to fix


def test_biggan_needs_classes():
  model = config_lib.base_config().model
  model.kind = "biggan"
  with pytest.raises(ValueError, match="num_classes"):
    networks.build(model)


def _tiny_with(**model_fields):
  config = config_lib.load(str(CONFIGS / "tiny.py"))
  for key, value in model_fields.items():
    node = config.model
    *path, last = key.split("__")
    for part in path:
      node = node[part]
    node[last] = value
  nets = networks.build(config.model)
  return nets, nets.init(jax.random.PRNGKey(0), 4)


@pytest.mark.slow
def test_deterministic_encoder_outputs_its_mean():
  nets, variables = _tiny_with(encoder__stochastic=False)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 64, 3), minval=-1, maxval=1)
  out = nets.encoder.apply(variables["encoder"], x, train=False,
                           rngs={"noise": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(out["z_sample"], out["z_mean"])
  np.testing.assert_array_equal(out["z_stdev"], 0.0)
  stochastic, v2 = _tiny_with()
  assert (jax.tree_util.tree_structure(v2["encoder"]["params"])
          == jax.tree_util.tree_structure(variables["encoder"]["params"]))


def test_small_stem_keeps_e_at_full_resolution_into_stage_0():
  nets, variables = _tiny_with(encoder__stem="small")
  kernel = variables["encoder"]["params"]["trunk"]["stem"]["kernel"]
  assert kernel.shape[:2] == (3, 3)
  x = jnp.zeros((4, 64, 64, 3))
  out = nets.encoder.apply(variables["encoder"], x, train=False,
                           rngs={"noise": jax.random.PRNGKey(2)})
  assert out["avepool_feat"].shape == (4, 32 * 4)


def test_zero_class_constant_starts_every_cbn_as_plain_bn():
  nets, variables = _tiny_with(class_constant_stddev=0.0)
  np.testing.assert_array_equal(variables["generator"]["params"]["class_constant"], 0.0)
  _, default = _tiny_with()
  assert float(jnp.std(default["generator"]["params"]["class_constant"])) > 0.3


def test_mean_pooled_fx_changes_only_the_joint_score():
  nets_sum, variables = _tiny_with()
  nets_mean, _ = _tiny_with(joint__j_fx_pool="mean")
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.PRNGKey(2), (4, nets_sum.z_dim))
  a = nets_sum.discriminator.apply(variables["discriminator"], x, z, train=False)
  b = nets_mean.discriminator.apply(variables["discriminator"], x, z, train=False)
  np.testing.assert_array_equal(a["s_x"], b["s_x"])
  np.testing.assert_array_equal(a["s_z"], b["s_z"])
  assert not np.allclose(a["s_xz"], b["s_xz"])


def test_new_model_fields_are_validated():
  config = config_lib.load(str(CONFIGS / "tiny.py"))
  for field, value, message in (("encoder.stem", "big", "model.encoder.stem"),
                                ("joint.j_fx_pool", "max", "model.joint.j_fx_pool"),
                                ("class_constant_stddev", -1.0, "model.class_constant_stddev"),
                                ("conv_weight_grad", "fast", "model.conv_weight_grad"),
                                ("resample_convs", "yes", "model.resample_convs")):
    bad = config_lib.load(str(CONFIGS / "tiny.py"))
    node = bad.model
    *path, last = field.split(".")
    for part in path:
      node = node[part]
    node[last] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate(bad)
  config_lib.validate(config)


def test_config_of_an_earlier_version_gets_the_new_fields_at_their_defaults():
  config = config_lib.load(str(CONFIGS / "tiny.py"))
  stored = config.to_dict()
  del stored["model"]["conv_weight_grad"], stored["model"]["encoder"]["stem"]
  del stored["model"]["resample_convs"]
  restored = config_lib.with_defaults(stored)
  assert restored.model.encoder.stem == "imagenet"
  assert restored.model.conv_weight_grad == "auto"
  assert restored.model.resample_convs == "auto"
  assert restored.model.ch == config.model.ch


@pytest.mark.slow
def test_resolution_16_is_the_32_px_net_less_its_first_block():
  # For data with little more than 8x8 of detail: G 4→8→16 (2 blocks, z in 3 chunks), D
  # 16→8 then two blocks at 8, E at 32 px with D seeing its input average-pooled to 16.
  config = config_lib.load(str(CONFIGS / "tiny.py"))
  config.model.resolution, config.model.z_dim = 16, 9
  config.model.g_attention_res = config.model.d_attention_res = 8
  config.model.encoder.resolution = 32
  nets = networks.build(config.model)
  variables = jax.jit(nets.init, static_argnums=1)(jax.random.PRNGKey(0), 4)
  assert nets.generator.num_chunks == 3
  assert sorted(k for k in variables["generator"]["params"] if k.startswith("block")) == [
      "block_0", "block_1"]
  z = jax.random.normal(jax.random.PRNGKey(1), (4, 9))
  x = nets.generator.apply(variables["generator"], z, train=False)
  assert x.shape == (4, 16, 16, 3)
  scores = nets.discriminator.apply(variables["discriminator"], x, z, train=False)
  assert {k: v.shape for k, v in scores.items()} == {k: (4,) for k in ("s_x", "s_z", "s_xz")}
  config.model.z_dim = 8
  with pytest.raises(ValueError, match="multiple of 3"):
    config_lib.validate_model(config.model)


def test_auto_computation_choices_are_made_for_the_backend_and_explicit_ones_kept():
  model = config_lib.load(str(CONFIGS / "tiny.py")).model
  cpu, tpu = networks.for_backend(model, "cpu"), networks.for_backend(model, "tpu")
  assert (cpu.conv_weight_grad, cpu.resample_convs) == ("matmul", "fused")
  assert (tpu.conv_weight_grad, tpu.resample_convs) == ("xla", "separate")
  assert (model.conv_weight_grad, model.resample_convs) == ("auto", "auto")  # Not changed.
  model.conv_weight_grad, model.resample_convs = "xla", "separate"
  cpu = networks.for_backend(model, "cpu")
  assert (cpu.conv_weight_grad, cpu.resample_convs) == ("xla", "separate")
