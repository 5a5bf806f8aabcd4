"""BigBiGAN with a ResNet-v2-50 encoder (Donahue & Simonyan 2019, Table 1's ResNet-50 rows).

G and D at 128x128, E at 256x256, unconditional, global batch 2048, 500K steps on ImageNet.
Paper: linear probe top-1 55.4 (AvePool) / 56.6 (BN+CReLU); FID ~22.3 unconditional.
"""

from bigbigan_jax.config import base_config


def get_config():
  config = base_config()  # The base schema is this recipe (the paper's).
  # On TPU: bfloat16 activations, float32 parameters and optimiser state. On v3-128 the step's
  # cost-model utilisation goes from 39% to 47% (README); tests/test_scale_options.py bounds
  # the difference from float32 at the tiny config. --config.model.dtype=float32 restores it.
  config.model.dtype = "bfloat16"
  return config
