"""BigBiGAN with a RevNet-50 x4 encoder (8192-d AvePool features).

Paper: linear probe top-1 60.8 (AvePool) / 61.3 (BN+CReLU).
"""

from bigbigan_jax.config import base_config


def get_config():
  config = base_config()
  config.model.dtype = "bfloat16"  # As configs/bigbigan_resnet50.py: bf16 activations on TPU.
  config.model.encoder.arch = "revnet"
  config.model.encoder.width_multiplier = 4
  return config
