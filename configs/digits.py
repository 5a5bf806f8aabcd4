"""A small BigBiGAN that trains on a CPU in minutes, on scikit-learn's embedded digits.

1,797 real 8x8 handwritten digits (no download), upscaled to 32x32. G/D are BigGAN's
32x32 CIFAR layout at ch=8, E a ResNet-v2-14 at base width 8, H and J two-layer MLPs.
`configs/digits.py:biggan` trains a class-conditional BigGAN on the same data instead.
"""

from bigbigan_jax.config import base_config


def get_config(variant: str = "bigbigan"):
  config = base_config()
  model = config.model
  model.kind = variant
  model.num_classes = 10 if variant == "biggan" else 0
  model.resolution = 32
  model.ch = 8
  model.z_dim = 64  # 4 chunks of 16: one for the first linear, one per block.
  model.shared_dim = 32
  model.g_attention_res = 16
  model.d_attention_res = 16
  model.encoder.depth = 14
  model.encoder.base_width = 8
  model.encoder.resolution = 32
  model.encoder.head_width = 256
  model.encoder.head_layers = 2
  model.joint.h_width = model.joint.j_width = 256
  model.joint.h_layers = model.joint.j_layers = 2

  config.data.source = "digits"
  config.data.augment = "none"  # 8x8 digits have no room for crops, and flips change them.
  config.data.random_flip = False

  config.optim.g_lr = 2e-4
  config.optim.e_lr = 2e-4
  config.optim.d_lr = 2e-4
  config.optim.d_steps = 1
  config.ema.decay = 0.99  # Averages the last ~100 steps: a short run must not lag behind.
  config.ema.start_step = 100

  # Sized to train in about 6 minutes on a 2-core CPU (0.3 s a step).
  config.batch_size = 32
  config.num_train_steps = 1_000
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.sample_every_steps = 250
  config.num_sample_images = 64
  # The judge (a classifier trained on the 1,500 "train" digits) scores G(E(x)) of the 297
  # held out and 1,000 samples.
  config.evals = ("judge",)
  if variant == "bigbigan":
    # The paper's benchmark: a linear probe on E's frozen features of the 1,500 "train"
    # digits, top-1 on the 297 held out, beside raw pixels and a random E.
    config.evals = ("linear_probe", "judge")
    config.eval.probe_baselines = True
  return config
