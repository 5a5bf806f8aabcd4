"""Class-conditional BigGAN at 128x128 on ImageNet (Brock et al. 2018).

ch 96, z 120 split hierarchically, shared 128-d class embedding, projection D, attention at
64x64, global batch 2048, G lr 5e-5 / D lr 2e-4, 2 D steps per G step, EMA of G from 20K.
Paper: IS 166.5 / FID 7.4. Parameters: G 70,433,988, D 87,982,370.
"""

from bigbigan_jax.config import base_config


def get_config():
  config = base_config()
  config.model.dtype = "bfloat16"  # As configs/bigbigan_resnet50.py: bf16 activations on TPU.
  config.model.kind = "biggan"
  config.model.num_classes = 1000
  # BigGAN trains on centre crops of the long edge, without flips.
  config.data.augment = "center"
  config.data.random_flip = False
  config.num_train_steps = 250_000
  return config
