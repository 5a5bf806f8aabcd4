"""The process environment every command-line entry point sets before TensorFlow and JAX's
backends load.

Entry points call `set_entry_point_defaults()` under `if __name__ == "__main__":` (importing a
module of this package changes no environment). Each value is a default: one the user set
wins.

  TF_CPP_MIN_LOG_LEVEL=2  TensorFlow's C++ INFO lines are not for the user; its warnings and
                          errors still show.
  TF_ENABLE_ONEDNN_OPTS=0 TensorFlow 2.21 prints "oneDNN custom operations are on" (and, before
                          it, "All log messages before absl::InitializeLog()") at import
                          whatever TF_CPP_MIN_LOG_LEVEL says, twice a process. Its oneDNN
                          rewrites serve TF's own matmuls and convolutions, which this package
                          does not run: TF only reads, decodes and resizes images here, and
                          those batches are the same bit for bit either way (the digits and a
                          folder of JPEGs, checked when this was set).
  TF_USE_LEGACY_KERAS=1   `import tensorflow` eagerly imports Keras 3 (and through it
                          scikit-learn, SciPy and IPython): 3-5 of its 13-14 s on a 2-core CPU,
                          paid by every process, though this package uses only tf.data,
                          tf.io and tf.summary. This value points TF at the `tf_keras`
                          package instead, which is not installed, so TF skips the import;
                          only `tf.keras` would fail (it is never used here).

XLA:CPU flags, appended to XLA_FLAGS unless it already names the flag (XLA reads XLA_FLAGS
when JAX first starts a backend, so after `import jax` is still in time):

  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
                          Convolutions go to XLA:CPU's own (Eigen) kernels instead of
                          YNNPACK's; element-wise work and reductions stay with YNNPACK. On this
                          project's 2-core AVX-512 host, jaxlib 0.10.2, the BigGAN train step at
                          32 px took 4% less time at 32 channels and batch 32, and 10% less at
                          64 channels and batch 16, and the digits demo's step was unchanged
                          (docs/experiments.md, "CPU speed against BigGAN-PyTorch"); a 3x3
                          128→128 conv on 64 32x32 maps runs at 282 GFLOP/s against YNNPACK's
                          202. Only CPU compiles read it. Set only for jaxlib >= 0.10, where it
                          was measured (older XLA may not know the flag, and an unknown flag
                          aborts).
"""

import os

ENTRY_POINT_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0",
                        "TF_USE_LEGACY_KERAS": "1"}


XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
_XLA_CPU_FLAGS_SINCE = (0, 10)  # The jaxlib release they were measured on.


def set_entry_point_defaults() -> None:
  for key, value in ENTRY_POINT_DEFAULTS.items():
    os.environ.setdefault(key, value)
  if _jaxlib_version() >= _XLA_CPU_FLAGS_SINCE:
    os.environ["XLA_FLAGS"] = with_flag_defaults(os.environ.get("XLA_FLAGS", ""), XLA_CPU_FLAGS)


def with_flag_defaults(xla_flags: str, defaults) -> str:
  """`xla_flags` with each of `defaults` appended unless it already sets that flag."""
  names = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  extra = [flag for flag in defaults if flag.split("=", 1)[0] not in names]
  return " ".join([xla_flags.strip(), *extra]).strip()


def _jaxlib_version() -> tuple:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return (0, 0)
