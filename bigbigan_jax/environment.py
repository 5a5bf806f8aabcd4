"""The process environment every command-line entry point sets before TensorFlow loads.

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
"""

import os

ENTRY_POINT_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0",
                        "TF_USE_LEGACY_KERAS": "1"}


def set_entry_point_defaults() -> None:
  for key, value in ENTRY_POINT_DEFAULTS.items():
    os.environ.setdefault(key, value)
