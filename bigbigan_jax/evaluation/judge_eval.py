"""The "judge" evaluator: a classifier trained on the real data scores reconstructions and
samples.

The judge (`judge.py`) learns `eval.probe_train_split`; it labels G(E(x)) of
`eval.probe_test_split` (recon/class_keep: does the reconstruction keep the class?) and G's
samples (classifier IS and FID; per-class accuracy of a class-conditional G). It needs no
download: for small datasets it is what Inception is for ImageNet.
"""

from __future__ import annotations

from absl import logging
import ml_collections
import numpy as np

from bigbigan_jax import inference
from bigbigan_jax.data import pipeline
from bigbigan_jax.evaluation import common
from bigbigan_jax.evaluation import judge as judge_lib
from bigbigan_jax.evaluation import metrics as metrics_lib
from bigbigan_jax.models import networks


class JudgeEvaluator:
  """Scores G(E(x)) and G's samples with a classifier trained on the real data (judge.py).

  Results: BigBiGAN: recon/class_keep, recon/judge_accuracy; every model:
  samples/classifier_is, samples/classifier_fid; class-conditional G:
  samples/class_accuracy and samples/class_accuracy/<class>.
  """

  name = "judge"

  def __init__(self, config: ml_collections.ConfigDict):
    pipeline.check_disjoint_splits(config, config.eval.probe_train_split,
                                         config.eval.probe_test_split, "the judge")
    self.config = config
    self._data = None  # (judge, held-out images, labels, real feature statistics).

  def _prepare(self):
    if self._data is None:
      e = self.config.eval
      train_x, train_y = common.split_arrays(self.config, e.probe_train_split, e.probe_max_examples)
      test_x, test_y = common.split_arrays(self.config, e.probe_test_split, e.probe_max_examples)
      num_classes = self.config.model.num_classes or int(max(train_y.max(), test_y.max())) + 1
      res = self.config.model.resolution
      # The judge sees images as D does: average-pooled to G's resolution.
      pool = lambda x: np.asarray(networks.pool_for_discriminator(x, res))
      judge = judge_lib.train_judge(pool(train_x), train_y, num_classes, steps=e.judge_steps,
                                    seed=e.seed)
      real_stats = metrics_lib.feature_stats(judge.outputs(pool(train_x))[1])
      logging.info("Judge trained on %d real images of %r; %d held out in %r.", len(train_y),
                   e.probe_train_split, len(test_y), e.probe_test_split)
      self._data = (judge, test_x, test_y, real_stats)
    return self._data

  def run(self, model: inference.Model) -> dict[str, float]:
    judge, test_x, test_y, real_stats = self._prepare()
    e = self.config.eval
    truncation = e.truncation or None
    if e.standing_stats_batches:
      model.standing_stats(e.standing_stats_batches, truncation=truncation,
                           method=self.config.sample.truncation, seed=e.seed + 1)
    results = {}
    try:
      held_out = np.asarray(networks.pool_for_discriminator(test_x, model.resolution))
      accuracy = judge.accuracy(held_out, test_y)
      if model.is_bigbigan:
        recon = model.reconstruct(test_x, seed=e.seed)
        results["recon/class_keep"] = float(np.mean(judge.predict(recon) == test_y))
        results["recon/judge_accuracy"] = accuracy
      else:
        results["samples/judge_accuracy"] = accuracy
      n = e.judge_num_samples
      z = inference.sample_z(e.seed, n, model.z_dim, truncation, self.config.sample.truncation)
      asked = np.arange(n) % model.num_classes if model.num_classes else None
      probs, feats = judge.outputs(model.generate(z, asked))
    finally:
      if e.standing_stats_batches:
        model.set_batch_stats(None)
    results["samples/classifier_is"] = judge_lib.classifier_score(probs)
    results["samples/classifier_fid"] = metrics_lib.fid_from_stats(
        *metrics_lib.feature_stats(feats), *real_stats)
    if asked is not None:
      overall, per_class = judge_lib.per_class_accuracy(np.argmax(probs, -1), asked,
                                                        model.num_classes)
      results["samples/class_accuracy"] = overall
      results.update({f"samples/class_accuracy/{c}": float(a)
                      for c, a in enumerate(per_class)})
    return results
