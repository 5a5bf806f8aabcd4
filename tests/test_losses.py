"""Losses against numbers computed by hand, signs included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_steps import initial_state

from bigbigan_jax.training import losses


def test_biggan_hinge_values():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] → 5/6; relu(1 + fake) = [0, 1, 2] → 1.
  np.testing.assert_allclose(losses.d_hinge(real, fake), 5 / 6 + 1, rtol=1e-6)
  np.testing.assert_allclose(losses.g_hinge(fake), 1 / 3, rtol=1e-6)  # -mean([-2, 0, 1])
  # D lowers its loss by raising real and lowering fake scores; G by raising fake scores.
  d_real, d_fake = jax.grad(losses.d_hinge, argnums=(0, 1))(real, fake)
  assert np.all(d_real <= 0) and np.all(d_fake >= 0)
  assert np.all(jax.grad(losses.g_hinge)(fake) < 0)


ENC = {"s_x": jnp.array([1.5, -0.5]), "s_z": jnp.array([0.0, 2.0]),
       "s_xz": jnp.array([0.5, 3.0])}
GEN = {"s_x": jnp.array([-2.0, 0.5]), "s_z": jnp.array([1.0, -1.0]),
       "s_xz": jnp.array([-0.5, 0.0])}


def test_bigbigan_d_loss_values():
  # Per score: mean(relu(1 - enc)) + mean(relu(1 + gen)).
  # s_x: mean(0, 1.5) + mean(0, 1.5) = 1.5; s_z: mean(1, 0) + mean(2, 0) = 1.5;
  # s_xz: mean(0.5, 0) + mean(0.5, 1) = 1.0.
  loss, terms = losses.bigbigan_d_loss(ENC, GEN, reduction="sum")
  np.testing.assert_allclose([terms["d_s_x"], terms["d_s_z"], terms["d_s_xz"]], [1.5, 1.5, 1.0])
  np.testing.assert_allclose(loss, 4.0)
  np.testing.assert_allclose(losses.bigbigan_d_loss(ENC, GEN)[0], 4.0 / 3)  # "mean" (colab)
  loss, terms = losses.bigbigan_d_loss(ENC, GEN, unary_x=False, unary_z=False)
  assert set(terms) == {"d_s_xz"}
  np.testing.assert_allclose(loss, 1.0)
  np.testing.assert_allclose(losses.bigbigan_d_loss(ENC, GEN, unary_z=False)[0], 2.5 / 2)


def test_bigbigan_d_loss_matches_tf_hub_colab_formula():
  # The colab concatenates [s_xz, s_x, s_z] and takes one mean per pair type.
  enc = np.concatenate([ENC["s_xz"], ENC["s_x"], ENC["s_z"]])
  gen = np.concatenate([GEN["s_xz"], GEN["s_x"], GEN["s_z"]])
  colab = np.mean(np.maximum(0, 1 - enc)) + np.mean(np.maximum(0, 1 + gen))
  np.testing.assert_allclose(losses.bigbigan_d_loss(ENC, GEN)[0], colab, rtol=1e-6)
  loss, terms = losses.bigbigan_eg_loss(ENC, GEN)
  np.testing.assert_allclose(terms["e_loss"], np.mean(enc), rtol=1e-6)
  np.testing.assert_allclose(terms["g_loss"], -np.mean(gen), rtol=1e-6)


def test_bigbigan_eg_loss_values_and_signs():
  loss, terms = losses.bigbigan_eg_loss(ENC, GEN, reduction="sum")
  # enc means: 0.5 + 1.0 + 1.75 = 3.25; gen means: -0.75 + 0 - 0.25 = -1.0.
  np.testing.assert_allclose(terms["e_loss"], 3.25)
  np.testing.assert_allclose(terms["g_loss"], 1.0)
  np.testing.assert_allclose(loss, 4.25)
  g_enc, g_gen = jax.grad(lambda e, g: losses.bigbigan_eg_loss(e, g)[0], argnums=(0, 1))(ENC, GEN)
  # Descending the loss lowers every encoder-pair score and raises every generator-pair one.
  assert all(np.all(v > 0) for v in g_enc.values())
  assert all(np.all(v < 0) for v in g_gen.values())
  _, terms = losses.bigbigan_eg_loss(ENC, GEN, unary_x=False, reduction="sum")
  np.testing.assert_allclose(terms["e_loss"], 1.0 + 1.75)


def test_bad_reduction_is_rejected():
  with pytest.raises(ValueError, match="reduction"):
    losses.bigbigan_d_loss(ENC, GEN, reduction="max")


def _numpy_ortho(kernels, beta):
  total = 0.0
  for k in kernels:
    w = k.reshape(-1, k.shape[-1])
    m = w.T @ w
    total += np.sum((m * (1 - np.eye(len(m)))) ** 2)
  return beta * total


def test_orthogonal_regularizer_matches_numpy_and_skips_exempt_leaves():
  rng = np.random.default_rng(0)
  params = {
      "linear": {"dense": {"kernel": rng.normal(size=(5, 7)), "bias": rng.normal(size=7)}},
      "block": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 6))}},
      "shared": {"embedding": rng.normal(size=(10, 4))},
      "gamma": np.float32(2.0),
  }
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  expected = _numpy_ortho([np.asarray(params["linear"]["dense"]["kernel"]),
                           np.asarray(params["block"]["conv"]["kernel"])], 1e-4)
  np.testing.assert_allclose(losses.orthogonal_regularizer(params, 1e-4), expected, rtol=1e-5)


def test_orthogonal_regularizer_is_zero_for_orthogonal_kernels():
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(12, 5)))
  params = {"dense": {"kernel": jnp.asarray(q * 3.0, jnp.float32)}}  # Scale is not penalised.
  assert float(losses.orthogonal_regularizer(params, 1.0)) < 1e-8


def _direct_ortho(params, beta):
  """‖WᵀW ⊙ (1 - I)‖² with the out x out Gram always formed, as BigGAN writes it."""
  total = 0.0
  for leaf in jax.tree_util.tree_leaves(params):
    w = leaf.reshape(-1, leaf.shape[-1])
    gram = w.T @ w
    total = total + jnp.sum(jnp.square(gram * (1 - jnp.eye(gram.shape[0]))))
  return beta * total


def test_orthogonal_regularizer_wide_kernels_and_shares_keep_value_and_gradient():
  """fan_in < out (G's first layer) takes the fan_in x fan_in Gram, and the shares of 8
  devices (`sharding.sum_of_shares`, as the step splits it) add up to the same: value and
  gradient equal the out x out Gram computed whole, for every layout (wide, tall, an output
  count that 8 does not divide)."""
  from bigbigan_jax import sharding  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  params = {"wide": {"kernel": rng.normal(size=(6, 40))},
            "conv": {"kernel": rng.normal(size=(3, 3, 4, 16))},
            "out": {"kernel": rng.normal(size=(3, 3, 4, 3))}}
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  mesh = sharding.make_mesh((("data", -1),), jax.devices()[:8])
  assert sharding.data_size(mesh) == 8
  expected, expected_grad = jax.value_and_grad(_direct_ortho)(params, 1e-3)
  # Each share alone is a part of the whole, not all of it.
  share = losses.orthogonal_regularizer(params, 1e-3, part=3, parts=8)
  assert 0 < share < 0.5 * expected
  for split_over in (None, mesh):
    value, grad = jax.jit(jax.value_and_grad(lambda p, m=split_over: sharding.sum_of_shares(
        functools.partial(losses.orthogonal_regularizer, beta=1e-3), m, p)))(params)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for name in params:
      np.testing.assert_allclose(grad[name]["kernel"], expected_grad[name]["kernel"],
                                 rtol=1e-4, atol=1e-6, err_msg=name)


def test_latent_regression_adds_e_s_error_on_g_samples_and_no_gradient_to_g(load_config):
  """loss.latent_regression = λ adds λ · mean((E(G(z))_mean - z)²) to the E/G loss, where
  G(z) is resized to E's resolution; it trains E and sends G nothing, unless
  loss.latent_regression_trains_g."""
  from bigbigan_jax.models import networks  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.training import objectives  # pylint: disable=g-import-not-at-top

  config = load_config("tiny.py")
  nets = networks.build(config.model)
  state = initial_state(config)
  b, r, r_e = 4, nets.resolution, nets.encoder_resolution
  assert r_e > r  # The resize is exercised.
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  fake_x = jax.random.uniform(keys[0], (b, r, r, 3), minval=-1, maxval=1)
  z = jax.random.normal(keys[1], (b, nets.z_dim))
  real = objectives.RealPairs(fake_x[::-1], z[::-1], {}, {})
  # A stand-in for D that depends on both elements of each pair.
  score = lambda x, c: {s: jnp.sum(x, axis=(1, 2, 3)) * 0.01 + jnp.sum(c, -1)
                        for s in losses.SCORES}

  def eg_loss(weight, params, fake, trains_g=False):
    objective = objectives.BigBiGAN(nets, latent_regression=weight,
                                    latent_regression_trains_g=trains_g)
    return objective.eg_loss(score, real, fake, z, params, state.model_state, keys[2])

  plain, plain_terms = eg_loss(0.0, state.params, fake_x)
  assert "latent_regression" not in plain_terms
  with_term, terms = eg_loss(0.5, state.params, fake_x)
  resized = jax.image.resize(fake_x, (b, r_e, r_e, 3), "cubic")
  enc, _ = nets.encoder.apply({"params": state.params["encoder"], **state.model_state["encoder"]},
                              resized, train=True, rngs={"noise": keys[2]},
                              mutable=["batch_stats"])
  by_hand = np.mean((np.asarray(enc["z_mean"]) - np.asarray(z)) ** 2)
  np.testing.assert_allclose(terms["latent_regression"], by_hand, rtol=1e-5)
  np.testing.assert_allclose(with_term, plain + 0.5 * by_hand, rtol=1e-5)

  # Through G's samples, the gradient is the plain loss's: G learns nothing from the term.
  g_plain = jax.grad(lambda f: eg_loss(0.0, state.params, f)[0])(fake_x)
  g_with = jax.grad(lambda f: eg_loss(0.5, state.params, f)[0])(fake_x)
  np.testing.assert_array_equal(g_with, g_plain)
  # Unless asked: then G's samples get the term's gradient as well.
  g_trains = jax.grad(lambda f: eg_loss(0.5, state.params, f, trains_g=True)[0])(fake_x)
  assert float(jnp.max(jnp.abs(g_trains - g_plain))) > 1e-6
  # E does learn from it.
  e_grad = jax.grad(lambda p: eg_loss(0.5, {**state.params, "encoder": p}, fake_x)[0]
                    - eg_loss(0.0, {**state.params, "encoder": p}, fake_x)[0])(
                        state.params["encoder"])
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(e_grad)) > 0


def test_image_reconstruction_adds_g_of_e_error_and_trains_e_alone(load_config):
  """loss.image_reconstruction = λ adds λ · mean((G(E(x)) - x)²) to the E/G loss, G in
  training mode on the real pairs' E(x) sample; its gradient reaches E(x) and neither G's
  weights nor the images, unless loss.image_reconstruction_trains_g (then G's weights)."""
  from bigbigan_jax.models import networks  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.training import objectives  # pylint: disable=g-import-not-at-top

  config = load_config("tiny.py")
  nets = networks.build(config.model)
  state = initial_state(config)
  b, r = 4, nets.resolution
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  x = jax.random.uniform(keys[0], (b, r, r, 3), minval=-1, maxval=1)
  z = jax.random.normal(keys[1], (b, nets.z_dim))
  fake_x = jax.random.uniform(keys[2], (b, r, r, 3), minval=-1, maxval=1)
  score = lambda xs, c: {s: jnp.sum(xs, axis=(1, 2, 3)) * 0.01 + jnp.sum(c, -1)
                         for s in losses.SCORES}

  def eg_loss(weight, params, x_real, e_of_x, trains_g=False):
    objective = objectives.BigBiGAN(nets, image_reconstruction=weight,
                                    image_reconstruction_trains_g=trains_g)
    real = objectives.RealPairs(x_real, e_of_x, {}, {})
    return objective.eg_loss(score, real, fake_x, z[::-1], params, state.model_state,
                             keys[3])

  plain, plain_terms = eg_loss(0.0, state.params, x, z)
  assert "image_reconstruction" not in plain_terms
  with_term, terms = eg_loss(0.5, state.params, x, z)
  recon, _ = nets.generator.apply({"params": state.params["generator"],
                                   **state.model_state["generator"]}, z, None, train=True,
                                  mutable=["spectral", "batch_stats"])
  by_hand = np.mean((np.asarray(recon) - np.asarray(x)) ** 2)
  np.testing.assert_allclose(terms["image_reconstruction"], by_hand, rtol=1e-5)
  np.testing.assert_allclose(with_term, plain + 0.5 * by_hand, rtol=1e-5)

  # Gradients with respect to (params, images, E(x)), without and with the term.
  def grads(weight, trains_g=False):
    return jax.grad(lambda *a: eg_loss(weight, *a, trains_g=trains_g)[0],
                    argnums=(0, 1, 2))(state.params, x, z)
  (p_plain, x_plain, z_plain), (p_with, x_with, z_with) = grads(0.0), grads(0.5)
  # G's weights and the images get exactly the plain loss's gradient: the term trains E only.
  leaves = jax.tree_util.tree_leaves
  for a, b_ in zip(leaves(p_with["generator"]), leaves(p_plain["generator"])):
    np.testing.assert_array_equal(a, b_)
  np.testing.assert_array_equal(x_with, x_plain)
  # E(x) does get the term's gradient.
  assert float(jnp.max(jnp.abs(z_with - z_plain))) > 1e-6
  # And G's weights do too when asked (image_reconstruction_trains_g).
  p_trains = grads(0.5, trains_g=True)[0]
  assert max(float(jnp.max(jnp.abs(a - b_))) for a, b_ in zip(
      leaves(p_trains["generator"]), leaves(p_plain["generator"]))) > 1e-6


@pytest.mark.parametrize("field", ["latent_regression", "image_reconstruction"])
def test_e_only_terms_are_refused_for_biggan(load_config, field):
  from bigbigan_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  config = load_config("tiny.py:biggan")
  config.loss[field] = 1.0
  with pytest.raises(ValueError, match=f"loss.{field}.*has no E"):
    config_lib.validate(config)


def test_wrong_label_ranking_pairs_real_images_with_other_labels_and_ranks_them(load_config):
  """loss.wrong_label_ranking = λ: D also scores every real image with a label drawn from
  the other classes, and adds λ · mean(relu(1 - (D(x, y) - D(x, y')))) to its hinge."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from bigbigan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.training import objectives  # pylint: disable=g-import-not-at-top

  nets = SimpleNamespace(num_classes=5)
  b = 400
  x = jnp.arange(b, dtype=jnp.float32).reshape(b, 1, 1, 1)
  labels = jnp.arange(b, dtype=jnp.int32) % 5
  real = objectives.RealPairs(x, labels, {}, {})
  fake_x, fake_c = -x, jnp.zeros(b, jnp.int32)
  key = jax.random.PRNGKey(0)
  plain = objectives.BigGAN(nets)
  px, pc = plain.d_inputs(real, fake_x, fake_c, key)
  assert px.shape[0] == pc.shape[0] == 2 * b  # Off: the real pairs, then the fake ones.
  ranked = objectives.BigGAN(nets, wrong_label_ranking=0.5)
  rx, rc = ranked.d_inputs(real, fake_x, fake_c, key)
  np.testing.assert_array_equal(rx[:2 * b], px)
  np.testing.assert_array_equal(rc[:2 * b], pc)
  np.testing.assert_array_equal(rx[2 * b:], x)  # The same real images...
  wrong = np.asarray(rc[2 * b:])
  assert np.all(wrong != np.asarray(labels)) and wrong.min() >= 0 and wrong.max() < 5
  # ...with each of the other four classes about as often (400 draws: 100 each expected).
  offsets = np.bincount((wrong - np.asarray(labels)) % 5, minlength=5)
  assert offsets[0] == 0 and offsets[1:].min() > 60, offsets

  real_s = jnp.array([2.0, 0.5, -1.0])
  fake_s = jnp.array([-2.0, 0.0, 1.0])
  wrong_s = jnp.array([0.0, 1.0, -3.0])
  loss, metrics = ranked.d_loss(jnp.concatenate([real_s, fake_s, wrong_s]), 3)
  # The hinge (5/6 + 1, as above) plus 0.5 * mean(relu(1 - [2, -0.5, 2])) = 0.5 * 1.5 / 3.
  np.testing.assert_allclose(loss, 5 / 6 + 1 + 0.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["d_label_accuracy"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(plain.d_loss(jnp.concatenate([real_s, fake_s]), 3)[0], 5 / 6 + 1,
                             rtol=1e-6)
  # Only D's projection separates (x, y) from (x, y'): the ranking's gradient moves the
  # scores of the two pairs in opposite directions.
  d_real, d_wrong = jax.grad(lambda r, w: ranked.d_loss(jnp.concatenate([r, fake_s, w]), 3)[0],
                             argnums=(0, 1))(real_s, wrong_s)
  assert float(d_wrong[1]) > 0 and float(d_real[1]) < 0

  config = load_config("tiny.py")  # BigBiGAN: no labels to rank.
  config.loss.wrong_label_ranking = 1.0
  with pytest.raises(ValueError, match="loss.wrong_label_ranking.*class-conditional BigGAN"):
    config_lib.validate(config)


def test_translate_shifts_each_image_by_its_own_offset_and_keeps_the_gradient(load_config):
  """loss.translate = t: every image D sees (real, G's, in both updates) moves by its own
  offset in [-t, t] on each axis, zeros filling the border; G's gradient passes through."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from bigbigan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.training import objectives  # pylint: disable=g-import-not-at-top

  b, r = 200, 9
  images = jnp.zeros((b, r, r, 1)).at[:, 4, 4, 0].set(1.0)  # One bright pixel, centred.
  shifted = objectives.BigGAN(SimpleNamespace(num_classes=3), translate=2)._augment(
      images, jax.random.PRNGKey(0))
  rows, cols = np.nonzero(np.asarray(shifted[..., 0]).reshape(b, -1) == 1.0)
  assert np.array_equal(rows, np.arange(b))  # Each image keeps its one pixel...
  dy, dx = cols // r - 4, cols % r - 4  # ...moved by at most 2 each way, all 25 offsets seen.
  assert np.abs(dy).max() == 2 and np.abs(dx).max() == 2
  assert len(set(zip(dy, dx))) == 25
  np.testing.assert_array_equal(np.asarray(shifted).sum(axis=(1, 2, 3)), 1.0)
  off = objectives.BigGAN(SimpleNamespace(num_classes=3))
  np.testing.assert_array_equal(off._augment(images, jax.random.PRNGKey(0)), images)
  # G's loss sees the shifted samples and its gradient reaches every sample's pixels.
  score = lambda x, c: jnp.sum(x * jnp.arange(r * r, dtype=jnp.float32).reshape(1, r, r, 1),
                               axis=(1, 2, 3))
  on = objectives.BigGAN(SimpleNamespace(num_classes=3), translate=2)
  grad = jax.grad(lambda x: on.eg_loss(score, None, x, None, None, None,
                                       jax.random.PRNGKey(1))[0])(images)
  assert np.all(np.abs(np.asarray(grad)).reshape(b, -1).sum(axis=1) > 0)
  config = load_config("tiny.py")  # BigBiGAN: refused.
  config.loss.translate = 2
  with pytest.raises(ValueError, match="loss.translate.*BigGAN only"):
    config_lib.validate(config)


def test_cutout_blanks_a_square_of_each_image_where_its_own_key_puts_it(load_config):
  """loss.cutout = f: each image D sees loses a square of side round(f · H), at a place of its
  own that may hang over an edge; what is outside the square is untouched, and G's gradient
  stops inside it only."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from bigbigan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.training import objectives  # pylint: disable=g-import-not-at-top

  b, r = 400, 8
  images = jnp.full((b, r, r, 1), 2.0)
  cut = objectives.BigGAN(SimpleNamespace(num_classes=3), cutout=0.5)
  out = np.asarray(cut._augment(images, jax.random.PRNGKey(0)))[..., 0]
  assert set(np.unique(out)) == {0.0, 2.0}
  for image in out:  # The blanked pixels of each image form one axis-aligned block...
    rows, cols = np.nonzero(image == 0)
    assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
  blanked = (out == 0).sum(axis=(1, 2))  # ...of 4x4 when inside, less over an edge.
  assert blanked.max() == 16 and blanked.min() >= 4 and np.mean(blanked == 16) > 0.3
  assert np.all((out == 0).any(axis=0))  # Every pixel is blanked in some image.
  grad = np.asarray(jax.grad(lambda x: jnp.sum(cut._augment(x, jax.random.PRNGKey(0))))(
      images))[..., 0]
  np.testing.assert_array_equal(grad, (out != 0).astype(np.float32))
  config = load_config("tiny.py")  # BigBiGAN: refused.
  config.loss.cutout = 0.5
  with pytest.raises(ValueError, match="loss.cutout.*BigGAN only"):
    config_lib.validate(config)
  config = load_config("tiny.py:biggan")
  config.loss.cutout = 1.0
  with pytest.raises(ValueError, match="loss.cutout.*below 1"):
    config_lib.validate(config)


def test_lecam_pulls_scores_to_the_other_sides_anchor_and_the_anchors_follow(load_config):
  """loss.lecam = μ: D's loss gains μ · (mean(relu(D(x) - a_fake)²) + mean(relu(a_real -
  D(G(z)))²));
  the anchors start at 0, each moves 1% of the way to its batch's mean score a D update, and
  the train step carries them in D's state (test_train's entry-point test)."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from bigbigan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.training import objectives  # pylint: disable=g-import-not-at-top

  real_s, fake_s = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
  scores = jnp.concatenate([real_s, fake_s])
  plain = objectives.BigGAN(SimpleNamespace(num_classes=3))
  reg = objectives.BigGAN(SimpleNamespace(num_classes=3), lecam=0.5)
  assert plain.extra_d_state() == {} and plain.next_d_state(scores, 3, {}) == {}
  state = reg.extra_d_state()
  assert float(state["lecam"]["real"]) == float(state["lecam"]["fake"]) == 0.0
  state = {"lecam": {"real": jnp.float32(1.0), "fake": jnp.float32(-1.0)}}
  loss, metrics = reg.d_loss(scores, 3, state)
  # mean(([2, 0.5, -1] + 1)²) = (9 + 2.25 + 0) / 3; mean(([-2, 0, 1] - 1)²) = (9 + 1 + 0) / 3.
  lecam = 11.25 / 3 + 10 / 3
  np.testing.assert_allclose(metrics["d_lecam"], lecam, rtol=1e-6)
  np.testing.assert_allclose(loss, plain.d_loss(scores, 3)[0] + 0.5 * lecam, rtol=1e-6)
  # Its gradient pulls each real score towards a_fake and each fake one towards a_real.
  grad = jax.grad(lambda s: reg.d_loss(s, 3, state)[0] - plain.d_loss(s, 3)[0])(scores)
  np.testing.assert_allclose(grad, 0.5 * 2 / 3 * np.array([3.0, 1.5, 0.0, -3.0, -1.0, 0.0]),
                             rtol=1e-5)
  # Only a real score above a_fake, or a fake one below a_real, is pulled.
  apart = {"lecam": {"real": jnp.float32(-5.0), "fake": jnp.float32(5.0)}}
  assert float(reg.d_loss(scores, 3, apart)[1]["d_lecam"]) == 0.0
  moved = reg.next_d_state(scores, 3, state)["lecam"]
  np.testing.assert_allclose(moved["real"], 0.99 * 1.0 + 0.01 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(moved["fake"], 0.99 * -1.0 + 0.01 * -1 / 3, rtol=1e-6)

  config = load_config("tiny.py")  # BigBiGAN: not available.
  config.loss.lecam = 0.3
  with pytest.raises(ValueError, match="loss.lecam.*BigGAN only"):
    config_lib.validate(config)


def test_mode_seeking_pairs_g_labels_and_pushes_each_pairs_images_apart(load_config):
  """loss.mode_seeking = ν, from step loss.mode_seeking_from on: G's own update draws samples
  2q and 2q + 1 with one label, and its loss gains
  ν / (mean|G(z_2q) - G(z_2q+1)| / mean|z_2q - z_2q+1| + 1e-5); before that step, and in
  BigBiGAN, labels and loss are as they were."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from bigbigan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from bigbigan_jax.training import objectives  # pylint: disable=g-import-not-at-top

  nets = SimpleNamespace(num_classes=10)
  plain = objectives.BigGAN(nets)
  seeking = objectives.BigGAN(nets, mode_seeking=0.5, mode_seeking_from=3)
  before, on = jnp.int32(2), jnp.int32(3)
  labels = jnp.array([3, 7, 1, 1, 9, 0, 4])
  np.testing.assert_array_equal(plain.g_labels(labels, on), labels)
  np.testing.assert_array_equal(seeking.g_labels(labels, before), labels)
  np.testing.assert_array_equal(seeking.g_labels(labels, on), [3, 3, 1, 1, 9, 9, 4])
  assert seeking.g_labels(None, on) is None  # An unconditional G has no labels to pair.
  assert plain.g_regulariser(None, None, on) == (0.0, {})

  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  x = jax.random.uniform(keys[0], (7, 4, 4, 3), minval=-1, maxval=1)
  z = jax.random.normal(keys[1], (7, 5))
  ratio = (np.mean(np.abs(np.asarray(x[0:6:2] - x[1:6:2])))  # The unpaired 7th is left out.
           / np.mean(np.abs(np.asarray(z[0:6:2] - z[1:6:2]))))
  loss, terms = seeking.g_regulariser(x, z, on)
  np.testing.assert_allclose(terms["g_diversity"], ratio, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 / (ratio + 1e-5), rtol=1e-5)
  off, off_terms = seeking.g_regulariser(x, z, before)  # Measured, not yet applied.
  assert float(off) == 0.0 and float(off_terms["g_diversity"]) == float(terms["g_diversity"])
  # Its gradient moves each pair's images apart: a small step downhill raises every pair's
  # distance.
  grad = jax.grad(lambda xs: seeking.g_regulariser(xs, z, on)[0])(x)
  stepped = x - 1e-3 * grad
  for q in range(3):
    gap = lambda xs: float(jnp.sum(jnp.abs(xs[2 * q] - xs[2 * q + 1])))
    assert gap(stepped) > gap(x)
  assert float(jnp.abs(grad[6]).max()) == 0.0

  config = load_config("tiny.py")  # BigBiGAN: not available.
  config.loss.mode_seeking = 0.3
  with pytest.raises(ValueError, match="loss.mode_seeking.*BigGAN only"):
    config_lib.validate(config)
  config = load_config("tiny.py:biggan")
  config.loss.mode_seeking_from = -1
  with pytest.raises(ValueError, match="loss.mode_seeking_from.*integer >= 0"):
    config_lib.validate(config)
