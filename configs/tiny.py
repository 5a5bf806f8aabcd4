"""The smallest networks that exercise every code path: for tests and quick checks.

`configs/tiny.py` is a BigBiGAN (E at 2x G's resolution, so D sees pooled images);
`configs/tiny.py:biggan` a class-conditional BigGAN. Trains on the embedded digits.
`configs/tiny.py:lifecycle` is the BigBiGAN at 16 px (G and D one block shorter, E at 32 px,
one-layer heads, one D update a step): for the tests of a run's life (preemption, resume,
lost hosts), which start the trainer many times; its step traces and loads in about half the
time.
"""

from bigbigan_jax.config import base_config


def get_config(variant: str = "bigbigan"):
  if variant not in ("bigbigan", "biggan", "lifecycle"):
    raise ValueError(f"configs/tiny.py has no variant {variant!r}: use bigbigan (default), "
                     "biggan or lifecycle")
  config = base_config()
  model = config.model
  model.kind = "biggan" if variant == "biggan" else "bigbigan"
  model.num_classes = 10 if variant == "biggan" else 0
  model.resolution = 32
  model.ch = 4  # Blocks of 16 channels; attention needs a multiple of 8.
  model.z_dim = 8
  model.shared_dim = 8
  model.g_attention_res = 16
  model.d_attention_res = 16
  model.encoder.depth = 14
  model.encoder.base_width = 4
  model.encoder.resolution = 64
  model.encoder.head_width = 16
  model.encoder.head_layers = 2
  model.joint.h_width = model.joint.j_width = 16
  model.joint.h_layers = model.joint.j_layers = 2

  config.data.source = "digits"
  config.data.augment = "none"
  config.data.random_flip = False
  config.data.shuffle_buffer = 64

  config.optim.d_steps = 2
  # Adam's eps at 1e-4, not BigGAN's 1e-8: Adam's first update is about lr * sign(grad), and
  # at 1e-8 the tiny nets' many near-zero gradients turn float rounding (another device count,
  # layout or CPU) into whole steps of +-lr, so runs that should agree would not.
  config.optim.eps = 1e-4
  config.ema.start_step = 2
  config.ema.decay = 0.9

  config.batch_size = 8
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.sample_every_steps = 2
  config.num_sample_images = 4

  if variant == "lifecycle":
    model.z_dim = 9  # 3 chunks: the first linear and 2 blocks.
    model.resolution = 16
    model.g_attention_res = model.d_attention_res = 8
    model.encoder.resolution = 32
    model.encoder.head_layers = 1
    model.joint.h_layers = model.joint.j_layers = 1
    config.optim.d_steps = 1
  return config
