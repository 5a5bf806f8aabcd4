"""Builds the networks an experiment needs from its `config.model`, and initialises them.

BigBiGAN: unconditional G, encoder E, joint discriminator D(x, z).
BigGAN: class-conditional G and D, no E.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from bigbigan_jax import config as config_lib
from bigbigan_jax.models.discriminator import Discriminator
from bigbigan_jax.models.discriminator import JointDiscriminator
from bigbigan_jax.models.encoder import Encoder
from bigbigan_jax.models.generator import Generator

# The networks' names: keys of the train state's params, model_state and optimisers.
G, E, D = "generator", "encoder", "discriminator"


@dataclasses.dataclass(frozen=True)
class Networks:
  """The modules of one experiment and the input shapes they expect."""

  generator: Generator
  discriminator: Discriminator | JointDiscriminator
  encoder: Encoder | None
  resolution: int  # G's output, D's input.
  encoder_resolution: int  # E's input (= resolution for BigGAN, which has no E).
  z_dim: int
  num_classes: int

  @property
  def is_bigbigan(self) -> bool:
    return self.encoder is not None

  def example_inputs(self, batch: int):
    """Zero inputs of each network's shapes, for `init` and `jax.eval_shape`."""
    z = jnp.zeros((batch, self.z_dim), jnp.float32)
    labels = jnp.zeros((batch,), jnp.int32)
    x = jnp.zeros((batch, self.resolution, self.resolution, 3), jnp.float32)
    inputs = {G: (z, labels if self.num_classes else None)}
    if self.is_bigbigan:
      inputs[D] = (x, z)
      inputs[E] = (jnp.zeros(
          (batch, self.encoder_resolution, self.encoder_resolution, 3), jnp.float32),)
    else:
      inputs[D] = (x, labels)
    return inputs

  def modules(self) -> dict:
    mods = {G: self.generator, D: self.discriminator}
    if self.encoder is not None:
      mods[E] = self.encoder
    return mods

  def init(self, rng: jax.Array, batch: int = 2) -> dict:
    """Variables of every network: {name: {"params", "spectral", "batch_stats"}}."""
    inputs = self.example_inputs(batch)
    out = {}
    for (name, module), key in zip(self.modules().items(), jax.random.split(rng, 3)):
      params_key, noise_key = jax.random.split(key)
      out[name] = module.init({"params": params_key, "noise": noise_key}, *inputs[name],
                              train=False)
    return out


def pool_for_discriminator(images: jax.Array, resolution: int) -> jax.Array:
  """Average-pools E-resolution images down to D's resolution (identity when equal)."""
  b, h, w, c = images.shape
  f = h // resolution
  if f == 1:
    return images
  return images.reshape(b, resolution, f, resolution, f, c).mean(axis=(2, 4))


def for_backend(model: ml_collections.ConfigDict, backend: str) -> ml_collections.ConfigDict:
  """A copy of `model` with its "auto" computation choices made for `backend` ("cpu", "tpu",
  "gpu"). On the CPU: the convolutions' kernel gradient as matmuls (15x faster there, see
  layers.conv_same_matmul_grad), and G's up-sampling + conv and D's conv + average pool each
  as one convolution (2.25x fewer FLOPs, layers.upsample_conv3x3). Elsewhere XLA's own
  gradient and the separate ops, the program the ahead-of-time TPU figures describe. Both
  choices keep the parameters and the values (to float rounding)."""
  model = ml_collections.ConfigDict(model.to_dict())
  cpu = backend == "cpu"
  if model.conv_weight_grad == "auto":
    model.conv_weight_grad = "matmul" if cpu else "xla"
  if model.resample_convs == "auto":
    model.resample_convs = "fused" if cpu else "separate"
  return model


def build(model: ml_collections.ConfigDict) -> Networks:
  """Validates `config.model` and builds the networks it describes (no arrays yet)."""
  config_lib.validate_model(model)
  model = for_backend(model, jax.default_backend())
  dtype = jnp.dtype(model.dtype)
  common = dict(sn_eps=model.sn_eps, dtype=dtype, remat=model.remat,
                weight_grad=model.conv_weight_grad,
                fused_resample=model.resample_convs == "fused")
  bigbigan = model.kind == "bigbigan"
  num_classes = 0 if bigbigan else model.num_classes
  generator = Generator(
      resolution=model.resolution, ch=model.ch, z_dim=model.z_dim, num_classes=num_classes,
      shared_dim=model.shared_dim, class_constant_stddev=model.class_constant_stddev,
      shared_init_scale=model.shared_init_scale,
      attention_res=model.g_attention_res,
      bn_momentum=model.bn_momentum, bn_eps=model.bn_eps, **common)
  encoder = None
  if bigbigan:
    enc, joint = model.encoder, model.joint
    discriminator = JointDiscriminator(
        resolution=model.resolution, ch=model.ch, attention_res=model.d_attention_res,
        h_width=joint.h_width, h_layers=joint.h_layers, j_width=joint.j_width,
        j_layers=joint.j_layers, j_fx_pool=joint.j_fx_pool, **common)
    encoder = Encoder(
        z_dim=model.z_dim, arch=enc.arch, stem=enc.stem, depth=enc.depth,
        width_multiplier=enc.width_multiplier, base_width=enc.base_width,
        head_width=enc.head_width, head_layers=enc.head_layers, min_stdev=enc.min_stdev,
        stochastic=enc.stochastic,
        bn_momentum=model.bn_momentum, bn_eps=model.bn_eps, dtype=dtype, remat=model.remat)
  else:
    discriminator = Discriminator(
        resolution=model.resolution, ch=model.ch, num_classes=num_classes,
        attention_res=model.d_attention_res, **common)
  return Networks(
      generator=generator, discriminator=discriminator, encoder=encoder,
      resolution=model.resolution,
      encoder_resolution=model.encoder.resolution if bigbigan else model.resolution,
      z_dim=model.z_dim, num_classes=num_classes)


def count_params(variables) -> int:
  """Trainable parameters only: spectral-norm vectors and BN statistics are state."""
  params = variables["params"] if "params" in variables else variables
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
