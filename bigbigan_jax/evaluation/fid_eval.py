"""The "fid" evaluator: FID and Inception Score of the EMA generator's samples.

`eval.num_samples` images, their FID Inception pool3 features against the statistics of
`eval.fid_reference_examples` real images (computed once, then cached as .npz), and the
Inception Score over `eval.is_splits` splits. The weights come from the local file
`eval.inception_path`; nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from bigbigan_jax import inference
from bigbigan_jax import storage
from bigbigan_jax.evaluation import common
from bigbigan_jax.evaluation import inception as inception_lib
from bigbigan_jax.evaluation import inception_weights
from bigbigan_jax.evaluation import metrics as metrics_lib
from bigbigan_jax.models import networks


class MissingInceptionWeights(FileNotFoundError):
  """FID/IS were asked for, but `config.eval.inception_path` names no file."""


class FidInceptionScore:
  """FID of G's samples against real data's Inception statistics, and their Inception Score."""

  name = "fid"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    """Checks that the Inception weights exist (loads nothing yet).

    Raises:
      MissingInceptionWeights: eval.inception_path is empty or names no file.
    """
    path = config.eval.inception_path
    if not path or not storage.exists(path):
      where = ("config.eval.inception_path is empty" if not path
               else f"config.eval.inception_path={path!r} names no file")
      raise MissingInceptionWeights(
          f"FID/IS need the FID Inception-v3 weights, but {where}. Convert pytorch-fid's "
          f"public weights ({inception_weights.WEIGHTS_URL}) once, on a machine with torch: "
          "`python -m bigbigan_jax.evaluation.inception_weights --convert_from=pt_inception-2015-12-05-6726825d.pth"
          " --out=inception_fid.npz` (see bigbigan_jax/evaluation/inception_weights.py), then pass "
          "--config.eval.inception_path=inception_fid.npz; or drop 'fid' from config.evals.")
    self.config, self.workdir = config, workdir
    self._inception = None  # (module, variables), loaded at the first run.
    self._fns = {}  # Per mesh: the jitted Inception.
    self._reference = None  # (mu, sigma).

  # --- Inception. ----------------------------------------------------------------------------

  def _inception_fn(self, mesh):
    if self._inception is None:
      path = self.config.eval.inception_path
      with storage.local_copy(path) as local:
        self._inception = inception_weights.load_inception(local)
    if mesh not in self._fns:
      self._fns[mesh] = inception_lib.make_inception_fn(*self._inception, mesh=mesh)
    return self._fns[mesh]

  def inception_outputs(self, images: np.ndarray, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(pool3, logits) of images, in chunks of eval.batch_size padded to one shape (one
    compile)."""
    fn = self._inception_fn(mesh)
    chunk = self.config.eval.batch_size
    pools, logits = [], []
    for start in range(0, len(images), chunk):
      part = images[start:start + chunk]
      n = len(part)
      if n < chunk:
        part = np.concatenate([part, np.zeros((chunk - n, *part.shape[1:]), part.dtype)])
      pool3, logit = jax.device_get(fn(part))
      pools.append(pool3[:n])
      logits.append(logit[:n])
    return np.concatenate(pools), np.concatenate(logits)

  # --- Reference statistics. -----------------------------------------------------------------

  def stats_path(self) -> str:
    """Where the reference statistics are cached."""
    if self.config.eval.fid_stats_path:
      return self.config.eval.fid_stats_path
    data = self.config.data
    source = {"tfds": data.name, "digits": "digits",
              "folder": os.path.basename(os.path.normpath(data.folder))}[data.source]
    n = self.config.eval.fid_reference_examples or "all"
    name = (f"fid_reference_{source}_{self.config.eval.fid_reference_split}_"
            f"{self.config.model.resolution}px_{n}.npz")
    return os.path.join(self.workdir, "eval", name.replace("/", "_"))

  def _stats_meta(self) -> dict[str, Any]:
    return {"split": self.config.eval.fid_reference_split,
            "resolution": self.config.model.resolution,
            "inception_weights": os.path.basename(self.config.eval.inception_path)}

  def reference_stats(self, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of real images at G's resolution: from the cache, else computed and cached.

    Real images are average-pooled to G's resolution as D sees them, then go through the same
    Inception resize as the samples.
    """
    if self._reference is not None:
      return self._reference
    path = self.stats_path()
    if storage.exists(path):
      mu, sigma, meta = metrics_lib.load_stats(path, with_meta=True)
      stale = {k: (meta[k], v) for k, v in self._stats_meta().items()
               if k in meta and meta[k] != v}
      if not stale:
        logging.info("FID reference statistics from %s.", path)
        self._reference = (mu, sigma)
        return self._reference
      logging.warning("FID reference statistics in %s were made with other settings %s "
                      "(file, wanted); recomputing them.", path, stale)
    e = self.config.eval
    pools = []
    for images, _ in common.real_batches(self.config, e.fid_reference_split, e.fid_reference_examples):
      images = np.asarray(networks.pool_for_discriminator(images, self.config.model.resolution))
      pools.append(self.inception_outputs(images, mesh)[0])
    pools = np.concatenate(pools)
    mu, sigma = metrics_lib.feature_stats(pools)
    if jax.process_index() == 0:
      metrics_lib.save_stats(path, mu, sigma, num_examples=len(pools), **self._stats_meta())
    logging.info("FID reference statistics of %d real images written to %s.", len(pools), path)
    self._reference = (mu, sigma)
    return self._reference

  # --- Samples. ------------------------------------------------------------------------------

  def sample_outputs(self, model: inference.Model) -> tuple[np.ndarray, np.ndarray]:
    """(pool3, logits) of eval.num_samples images of `model`'s G, generated in chunks."""
    e = self.config.eval
    truncation = e.truncation or None
    z = inference.sample_z(e.seed, e.num_samples, model.z_dim, truncation,
                           self.config.sample.truncation)
    labels = None
    if model.num_classes:
      labels = np.random.default_rng(e.seed).integers(0, model.num_classes, e.num_samples)
    if e.standing_stats_batches:
      model.standing_stats(e.standing_stats_batches, truncation=truncation,
                           method=self.config.sample.truncation, seed=e.seed + 1)
    pools, logits = [], []
    try:
      for start in range(0, e.num_samples, e.batch_size):
        images = model.generate(z[start:start + e.batch_size],
                                None if labels is None else labels[start:start + e.batch_size])
        pool3, logit = self.inception_outputs(images, model.mesh)
        pools.append(pool3)
        logits.append(logit)
    finally:
      if e.standing_stats_batches:
        model.set_batch_stats(None)
    return np.concatenate(pools), np.concatenate(logits)

  def run(self, model: inference.Model) -> dict[str, float]:
    """Returns {"fid", "inception_score", "inception_score_std"}."""
    reference = self.reference_stats(model.mesh)
    pools, logits = self.sample_outputs(model)
    is_mean, is_std = metrics_lib.inception_score(logits, self.config.eval.is_splits,
                                                  from_logits=True)
    return {"fid": metrics_lib.fid_from_stats(*metrics_lib.feature_stats(pools), *reference),
            "inception_score": is_mean, "inception_score_std": is_std}
