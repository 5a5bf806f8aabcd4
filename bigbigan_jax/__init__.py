"""bigbigan_jax: BigBiGAN and BigGAN in JAX/Flax, data-parallel over a device mesh."""

__version__ = "0.1.0"
