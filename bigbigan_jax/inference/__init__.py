"""Inference over a trained BigBiGAN or BigGAN: a Python API shaped like the TF-Hub modules.

    model = inference.load("/tmp/digits")              # newest checkpoint, EMA generator
    z = inference.sample_z(0, 16, model.z_dim, truncation=0.5)
    images = model.generate(z)                         # (16, R, R, 3) in [-1, 1]
    enc = model.encode(real_images)                    # z_mean, z_stdev, z_sample, avepool_feat,
                                                       # bn_crelu_feat (TF-Hub's `encode`)
    recon = model.reconstruct(real_images)             # generate(encode(x)["z_sample"])
    scores = model.discriminate(images, z)             # s_x, s_z, s_xz
    model.standing_stats(num_batches=64, truncation=0.5)  # the paper's evaluation BN stats

The API lives in four modules, and this package gathers their public names:

  latents   `sample_z` and the truncation methods ("resample", "scaled");
  model     `Model`: generate, encode, reconstruct, discriminate, standing_stats;
  loading   `load` (a workdir's checkpoint), `from_state` (an in-memory train state),
            `read_config`, `checkpoint_steps`, `image_files`, `load_images`;
  programs  the jitted programs behind `Model`, and `pooled_moments`.
"""

from bigbigan_jax.inference.latents import check_truncation
from bigbigan_jax.inference.latents import sample_z
from bigbigan_jax.inference.latents import truncated_latents
from bigbigan_jax.inference.latents import TRUNCATION_METHODS
from bigbigan_jax.inference.loading import checkpoint_steps
from bigbigan_jax.inference.loading import from_state
from bigbigan_jax.inference.loading import image_files
from bigbigan_jax.inference.loading import load
from bigbigan_jax.inference.loading import load_images
from bigbigan_jax.inference.loading import read_config
from bigbigan_jax.inference.model import Model
from bigbigan_jax.inference.programs import pooled_moments

__all__ = ["check_truncation", "sample_z", "TRUNCATION_METHODS", "truncated_latents",
           "checkpoint_steps", "from_state", "image_files", "load", "load_images", "read_config",
           "Model", "pooled_moments"]
