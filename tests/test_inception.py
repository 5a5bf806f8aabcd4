"""The FID Inception port: converter coverage, loading, and a forward pass against numpy.

No real weights are available offline, so a fake state dict with pytorch-fid's keys and shapes
(written out below from the architecture) stands in for them. A numpy re-implementation of
pytorch-fid's forward pass, in torch's NCHW/OIHW layout and fed the UNconverted arrays, checks
the flax network, the key mapping and the kernel transposition together.
"""

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest

from bigbigan_jax.evaluation import inception
from bigbigan_jax.evaluation import inception_weights

# ----------------------------------------------------------------------------------------
# pytorch-fid's FID Inception as data: every BasicConv2d as (name, in, out, (kh, kw), stride,
# (pad_h, pad_w)). The block tables take the block's input channels.

STEM = [
    ("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
]


def block_a(cin, pool_features):
  return [("branch1x1", cin, 64, (1, 1), 1, (0, 0)),
          ("branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
          ("branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
          ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
          ("branch_pool", cin, pool_features, (1, 1), 1, (0, 0))]


def block_b(cin):
  return [("branch3x3", cin, 384, (3, 3), 2, (0, 0)),
          ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0))]


def block_c(cin, c7):
  return [("branch1x1", cin, 192, (1, 1), 1, (0, 0)),
          ("branch7x7_1", cin, c7, (1, 1), 1, (0, 0)),
          ("branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
          ("branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_1", cin, c7, (1, 1), 1, (0, 0)),
          ("branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
          ("branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
          ("branch_pool", cin, 192, (1, 1), 1, (0, 0))]


def block_d(cin):
  return [("branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
          ("branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
          ("branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
          ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
          ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
          ("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0))]


def block_e(cin):
  return [("branch1x1", cin, 320, (1, 1), 1, (0, 0)),
          ("branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
          ("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
          ("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
          ("branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
          ("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
          ("branch_pool", cin, 192, (1, 1), 1, (0, 0))]


BLOCKS = [
    ("Mixed_5b", block_a(192, 32)), ("Mixed_5c", block_a(256, 64)),
    ("Mixed_5d", block_a(288, 64)), ("Mixed_6a", block_b(288)),
    ("Mixed_6b", block_c(768, 128)), ("Mixed_6c", block_c(768, 160)),
    ("Mixed_6d", block_c(768, 160)), ("Mixed_6e", block_c(768, 192)),
    ("Mixed_7a", block_d(768)), ("Mixed_7b", block_e(1280)), ("Mixed_7c", block_e(2048)),
]

# name → (in, out, kernel, stride, padding) for every BasicConv2d, by its state-dict prefix.
CONVS = {name: spec for name, *spec in STEM}
CONVS.update({f"{block}.{name}": tuple(spec) for block, table in BLOCKS for name, *spec in table})


def torch_shapes():
  """pytorch-fid's state-dict keys and shapes (without num_batches_tracked)."""
  shapes = {}
  for prefix, (cin, cout, (kh, kw), _, _) in CONVS.items():
    shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.bn.{leaf}"] = (cout,)
  shapes["fc.weight"] = (1008, 2048)
  shapes["fc.bias"] = (1008,)
  return shapes


def fake_state_dict(seed=0):
  """Random weights of pytorch-fid's shapes, scaled so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in torch_shapes().items():
    if key.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif key == "fc.weight":
      value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    elif key.endswith(("running_var", "bn.weight")):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    sd[key] = value.astype(np.float32)
    if key.endswith("bn.running_var"):  # Saved by torch >= 0.4.1; carries no weights.
      sd[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  return sd


def flax_name(torch_key):
  """The expected flax name, written out independently of the module's mapping."""
  *prefix, layer, leaf = torch_key.split(".")
  collection, new_leaf = {
      ("conv", "weight"): ("params", "kernel"), ("bn", "weight"): ("params", "scale"),
      ("bn", "bias"): ("params", "bias"), ("bn", "running_mean"): ("batch_stats", "mean"),
      ("bn", "running_var"): ("batch_stats", "var"), ("fc", "weight"): ("params", "kernel"),
      ("fc", "bias"): ("params", "bias")}[(layer, leaf)]
  return "/".join([collection, *prefix, layer, new_leaf])


# ----------------------------------------------------------------------------------------
# A numpy reference of pytorch-fid's forward pass (NCHW, OIHW weights), one image at a time.


def torch_bilinear_resize(x, out_h, out_w):
  """torch F.interpolate(mode="bilinear", align_corners=False) on (C, H, W).

  Source positions in float32 with one fused multiply-add, as torch's kernel computes
  them; checked offline against torch 2.14's CPU output to ~1e-7.
  """
  def taps(n_in, n_out):
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * np.float64(dst) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(int), n_in - 1)  # Truncation = floor: src >= 0.
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float64)
    return i0, i1, frac
  h0, h1, fh = taps(x.shape[1], out_h)
  w0, w1, fw = taps(x.shape[2], out_w)
  rows = x[:, h0] * (1 - fh)[None, :, None] + x[:, h1] * fh[None, :, None]
  return rows[:, :, w0] * (1 - fw) + rows[:, :, w1] * fw


def np_conv(x, w, stride, pad):
  ph, pw = pad
  x = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
  windows = sliding_window_view(x, w.shape[2:], axis=(1, 2))[:, ::stride, ::stride]
  return np.tensordot(w, windows, axes=([1, 2, 3], [0, 3, 4]))


def np_pool(x, stride, pad, kind):
  fill = -np.inf if kind == "max" else 0.0
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=fill)
  windows = sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::stride, ::stride]
  if kind == "max":
    return windows.max(axis=(3, 4))
  ones = np.pad(np.ones(x.shape[1:]), pad)  # count_include_pad=False: real pixels only.
  counts = sliding_window_view(ones, (3, 3))[::stride, ::stride].sum(axis=(2, 3))
  return windows.sum(axis=(3, 4)) / counts


def reference_forward(sd, image_hwc):
  """pool3 and biasless logits of one [-1, 1] image, as pytorch-fid's network computes."""
  x = torch_bilinear_resize(np.transpose(image_hwc, (2, 0, 1)).astype(np.float64), 299, 299)

  def conv(prefix, x):
    _, _, _, stride, pad = CONVS[prefix]
    y = np_conv(x, sd[f"{prefix}.conv.weight"].astype(np.float64), stride, pad)
    bn = {k: sd[f"{prefix}.bn.{k}"][:, None, None].astype(np.float64)
          for k in ("weight", "bias", "running_mean", "running_var")}
    y = (y - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"]
    return np.maximum(y, 0.0)

  def seq(block, names, x):
    for name in names:
      x = conv(f"{block}.{name}", x)
    return x

  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = conv(name, x)
  x = np_pool(x, 2, 0, "max")
  x = conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x))
  x = np_pool(x, 2, 0, "max")
  for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = np.concatenate([
        seq(b, ["branch1x1"], x), seq(b, ["branch5x5_1", "branch5x5_2"], x),
        seq(b, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x),
        seq(b, ["branch_pool"], np_pool(x, 1, 1, "avg"))])
  b = "Mixed_6a"
  x = np.concatenate([seq(b, ["branch3x3"], x),
                      seq(b, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x),
                      np_pool(x, 2, 0, "max")])
  for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = np.concatenate([
        seq(b, ["branch1x1"], x), seq(b, [f"branch7x7_{i}" for i in (1, 2, 3)], x),
        seq(b, [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)], x),
        seq(b, ["branch_pool"], np_pool(x, 1, 1, "avg"))])
  b = "Mixed_7a"
  x = np.concatenate([seq(b, ["branch3x3_1", "branch3x3_2"], x),
                      seq(b, [f"branch7x7x3_{i}" for i in (1, 2, 3, 4)], x),
                      np_pool(x, 2, 0, "max")])
  for b, pool in (("Mixed_7b", "avg"), ("Mixed_7c", "max")):
    b3 = seq(b, ["branch3x3_1"], x)
    bd = seq(b, ["branch3x3dbl_1", "branch3x3dbl_2"], x)
    x = np.concatenate([
        seq(b, ["branch1x1"], x),
        seq(b, ["branch3x3_2a"], b3), seq(b, ["branch3x3_2b"], b3),
        seq(b, ["branch3x3dbl_3a"], bd), seq(b, ["branch3x3dbl_3b"], bd),
        seq(b, ["branch_pool"], np_pool(x, 1, 1, pool))])
  pool3 = x.mean(axis=(1, 2))
  return pool3, sd["fc.weight"].astype(np.float64) @ pool3


# ----------------------------------------------------------------------------------------


def test_architecture_matches_the_state_dict_layout():
  shapes = inception.variable_shapes()
  expected = {}
  for key, shape in torch_shapes().items():
    if key.endswith("conv.weight"):
      shape = (shape[2], shape[3], shape[1], shape[0])  # OIHW → HWIO.
    elif key == "fc.weight":
      shape = shape[::-1]
    expected[flax_name(key)] = shape
  assert shapes == expected
  assert len(CONVS) == 94
  # torchvision's inception_v3 has 27,161,264 parameters; less its aux head (3,326,696)
  # and plus 8 more classes (8 x 2049) gives the FID network's trainable count.
  n_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("params/"))
  assert n_params == 27_161_264 - 3_326_696 + 8 * 2049


def test_key_mapping_covers_every_key():
  for key in torch_shapes():
    assert inception_weights.torch_key_to_flax(key) == flax_name(key)
  assert inception_weights.torch_key_to_flax("Mixed_5b.branch1x1.bn.num_batches_tracked") is None
  with pytest.raises(ValueError, match="AuxLogits"):
    inception_weights.torch_key_to_flax("AuxLogits.fc.weight.extra")


@pytest.mark.slow
def test_convert_load_and_forward_match_numpy_reference(tmp_path):
  sd = fake_state_dict()
  sd_path, out_path = tmp_path / "pytorch_fid_state_dict.npz", tmp_path / "inception_fid.npz"
  np.savez(sd_path, **sd)
  inception_weights.main([f"--convert_from={sd_path}", f"--out={out_path}"])

  module, variables = inception_weights.load_inception(out_path)
  flat = {}
  for collection, tree in variables.items():
    flat.update(inception.flatten_variables(tree, collection))
  assert set(flat) == {flax_name(k) for k in torch_shapes()}
  for key in torch_shapes():
    source = sd[key]
    if key.endswith("conv.weight"):
      source = source.transpose(2, 3, 1, 0)
    elif key == "fc.weight":
      source = source.T
    np.testing.assert_array_equal(flat[flax_name(key)], source, err_msg=key)

  shapes = jax.eval_shape(module.apply, variables,
                          jax.ShapeDtypeStruct((3, 128, 128, 3), jnp.float32))
  assert [s.shape for s in shapes] == [(3, 2048), (3, 1008)]

  # Small real forward passes (one compile each): 3 images of 75x75, resized inside.
  images = np.random.default_rng(1).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
  pool3, logits = inception.make_inception_fn(module, variables)(images)
  assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
  assert pool3.dtype == jnp.float32 and logits.dtype == jnp.float32
  ref_pool3, ref_logits = reference_forward(sd, images[0])
  assert np.std(ref_pool3) > 1e-2  # The fake weights keep the signal alive to the end.
  # Agreement is ~1e-6 relative. The FID quirks are far coarser: counting the padding in the
  # average pools moves pool3 by ~7%, an average pool in Mixed_7c by ~25%.
  np.testing.assert_allclose(pool3[0], ref_pool3, rtol=1e-4, atol=1e-5 * np.abs(ref_pool3).max())
  np.testing.assert_allclose(logits[0], ref_logits, rtol=1e-4,
                             atol=1e-5 * np.abs(ref_logits).max())

  # The batch split over a 4-device mesh (3 images: one padding row) gives the same outputs.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  sharded = inception.make_inception_fn(module, variables, mesh=mesh)(images)
  for got, want in zip(sharded, (pool3, logits)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_logits_bias_switch():
  pool3 = np.random.default_rng(2).normal(size=(2, 2048)).astype(np.float32)
  kernel = np.random.default_rng(3).normal(size=(2048, 1008)).astype(np.float32)
  bias = np.arange(1008, dtype=np.float32)
  params = {"params": {"kernel": kernel, "bias": bias}}
  without = inception.Logits(use_bias=False).apply(params, pool3)
  with_bias = inception.Logits(use_bias=True).apply(params, pool3)
  np.testing.assert_allclose(without, pool3 @ kernel, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(with_bias - without, np.broadcast_to(bias, (2, 1008)), atol=1e-3)


def test_resize_matches_torch_bilinear():
  rng = np.random.default_rng(4)
  for size_in, size_out in ((7, 11), (23, 10), (75, 299), (512, 299), (299, 299)):
    x = rng.normal(size=(size_in, size_in + 3, 2)).astype(np.float32)
    got = np.asarray(inception.resize_bilinear(x[None], size_out))[0]
    want = torch_bilinear_resize(x.transpose(2, 0, 1), size_out, size_out).transpose(1, 2, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=f"{size_in}")
  x = rng.normal(size=(1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_allclose(inception.resize_bilinear(x), x, atol=1e-6)  # Same size: identity.


def test_pools_exclude_padding():
  x = np.random.default_rng(5).normal(size=(1, 5, 6, 3)).astype(np.float32)
  chw = x[0].transpose(2, 0, 1)
  np.testing.assert_allclose(inception.avg_pool_3x3_same(x)[0],
                             np_pool(chw, 1, 1, "avg").transpose(1, 2, 0), rtol=1e-5, atol=1e-6)
  # All negative: a zero-padded max pool would return 0 on the border.
  negative = -np.abs(x) - 1
  np.testing.assert_allclose(inception.max_pool_3x3(negative, 1, 1)[0],
                             np_pool(-np.abs(chw) - 1, 1, 1, "max").transpose(1, 2, 0))
  np.testing.assert_allclose(inception.max_pool_3x3(x, 2)[0],
                             np_pool(chw, 2, 0, "max").transpose(1, 2, 0))


def test_missing_or_wrong_weight_files_give_clear_errors(tmp_path):
  missing = tmp_path / "nowhere" / "inception_fid.npz"
  with pytest.raises(FileNotFoundError) as e:
    inception_weights.load_inception(missing)
  assert str(missing) in str(e.value) and "--convert_from" in str(e.value)
  assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value)

  shapes = inception.variable_shapes()
  flat = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  del flat["params/fc/bias"]
  flat["params/fc/kernel"] = np.zeros((2048, 1000), np.float32)
  bad = tmp_path / "bad.npz"
  np.savez(bad, **flat)
  with pytest.raises(ValueError) as e:
    inception_weights.load_inception(bad)
  message = str(e.value)
  assert str(bad) in message and "params/fc/bias" in message and "(2048, 1000)" in message

  not_npz = tmp_path / "garbage.npz"
  not_npz.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="garbage.npz"):
    inception_weights.load_inception(not_npz)

  sd = fake_state_dict()
  sd["fc.weight"] = sd["fc.weight"][:1000]  # torchvision's 1000 classes: the wrong network.
  with pytest.raises(ValueError, match="fc/kernel"):
    inception_weights.convert_state_dict(sd)
