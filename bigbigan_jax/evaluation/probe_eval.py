"""The "linear_probe" evaluator: a linear classifier on E's frozen features, and its baselines.

E's `avepool_feat` and `bn_crelu_feat` (eval mode) of `eval.probe_train_split` train a softmax
classifier (`linear_probe`), scored top-1/top-5 on `eval.probe_test_split`: the paper's
representation-learning numbers. With `eval.probe_baselines`, the same probe on raw pixels and
on a random E of the same architecture whose BN statistics are estimated on the probe's train
split (docs/design.md, "Evaluation choices"): what E's training adds.
"""

from __future__ import annotations

import functools

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from bigbigan_jax import inference
from bigbigan_jax import sharding as sharding_lib
from bigbigan_jax.data import pipeline
from bigbigan_jax.evaluation import common
from bigbigan_jax.evaluation import judge as judge_lib
from bigbigan_jax.evaluation import linear_probe

PIXELS_MAX_SIDE = 32  # The pixel baseline's images are average-pooled to at most this side.


def _with_encoder(model: inference.Model, encoder_variables) -> inference.Model:
  """The same model with other E weights (G and D shared, nothing copied)."""
  g = model.generator_variables
  return inference.Model(
      model.nets, model.config, generator_params=g["params"],
      generator_state={k: v for k, v in g.items() if k != "params"},
      discriminator_variables=model.discriminator_variables,
      encoder_variables=encoder_variables, step=model.step, use_ema=model.use_ema,
      mesh=model.mesh, batch_size=model.batch_size)


@functools.lru_cache(maxsize=8)
def _encoder_moments_fn(encoder):
  """jit'd (E variables, images) → this batch's BN statistics of every E layer."""
  def moments(variables, images):
    # Momentum 0: a training-mode pass writes exactly this batch's statistics.
    _, new = encoder.clone(bn_momentum=0.0).apply(
        variables, images, train=True, rngs={"noise": jax.random.PRNGKey(0)},
        mutable=["batch_stats"])
    return new["batch_stats"]
  return jax.jit(moments)


def encoder_standing_stats(encoder, variables: dict, batches) -> dict:
  """E's BN statistics re-estimated on real images, pooled over batches of any sizes.

  Args:
    encoder: the Encoder module.
    variables: E's {"params", "batch_stats"}.
    batches: iterable of (images, labels) at E's resolution.

  Returns:
    `variables` with batch_stats replaced: per layer, the count-weighted mean of the batch
    means and the variance of every activation seen (law of total variance).
  """
  fn = _encoder_moments_fn(encoder)
  counts, passes = [], []
  for images, _ in batches:
    counts.append(len(images))
    passes.append(flax.traverse_util.flatten_dict(jax.device_get(fn(variables, images))))
  if not passes:
    raise ValueError("no images to estimate the encoder's BN statistics on")
  pooled = {}
  for path in passes[0]:
    if path[-1] != "mean":
      continue
    var_path = path[:-1] + ("var",)
    pooled[path], pooled[var_path] = inference.pooled_moments(
        [p[path] for p in passes], [p[var_path] for p in passes], counts)
  return {**variables, "batch_stats": flax.traverse_util.unflatten_dict(pooled)}


def random_encoder(model: inference.Model, seed: int, batches=None) -> inference.Model:
  """`model` with a freshly initialised E of the same architecture.

  Args:
    model: the trained model (its G and D are shared, not copied).
    seed: the initialisation's seed.
    batches: real (images, labels) batches to estimate the random E's BN statistics on (the
      fair baseline: with the initial statistics, mean 0 and variance 1, every BN layer in
      evaluation mode is a no-op and the network is a different, un-normalised one); None
      keeps the initial statistics.
  """
  nets = model.nets
  r = nets.encoder_resolution
  params_key, noise_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = nets.encoder.init({"params": params_key, "noise": noise_key},
                                np.zeros((2, r, r, 3), np.float32), train=False)
  if batches is not None:
    variables = encoder_standing_stats(nets.encoder, variables, batches)
  variables = jax.device_put(variables, sharding_lib.replicated(model.mesh))
  return _with_encoder(model, variables)


class LinearProbe:
  """Top-1/top-5 of a linear classifier on frozen E features (BigBiGAN only)."""

  name = "linear_probe"

  def __init__(self, config: ml_collections.ConfigDict):
    if config.model.kind != "bigbigan":
      raise ValueError("the linear probe needs an encoder: model.kind must be 'bigbigan', "
                       f"not {config.model.kind!r}")
    pipeline.check_disjoint_splits(config, config.eval.probe_train_split,
                                         config.eval.probe_test_split, "the linear probe")
    self.config = config

  def features(self, encoders: dict[str, inference.Model], split: str
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of one split: {f"{encoder}/{feature}": (N, F)} (plus "pixels" with the
    baselines) and the (N,) labels."""
    e = self.config.eval
    parts: dict[str, list] = {}
    labels = []
    for images, y in common.real_batches(self.config, split, e.probe_max_examples):
      labels.append(y)
      for prefix, model in encoders.items():
        out = model.encode(images)
        for feature in e.probe_features:
          parts.setdefault(prefix + feature, []).append(out[feature])
      if e.probe_baselines:
        pixels = judge_lib.pool_to_side(images, PIXELS_MAX_SIDE)
        parts.setdefault("pixels", []).append(pixels.reshape(len(pixels), -1))
    if not labels:
      raise ValueError(f"config.data's split {split!r} has no examples to probe")
    return ({k: np.concatenate(v) for k, v in parts.items()},
            np.concatenate(labels).astype(np.int32))

  def run(self, model: inference.Model) -> dict[str, float]:
    """Probes `model`'s E; returns {"probe/<features>/top1" | "top5" | "train_top1": ...}."""
    e = self.config.eval
    encoders = {"": model}
    if e.probe_baselines:
      encoders["random_encoder/"] = random_encoder(
          model, self.config.seed + 1,
          common.real_batches(self.config, e.probe_train_split, e.probe_max_examples))
    train_feats, train_labels = self.features(encoders, e.probe_train_split)
    test_feats, test_labels = self.features(encoders, e.probe_test_split)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    logging.info("Linear probe: %d train and %d test examples, %d classes, features %s.",
                 len(train_labels), len(test_labels), num_classes, ", ".join(train_feats))
    results = {}
    for name in train_feats:
      scores = linear_probe.train_linear_probe(
          train_feats[name], train_labels, test_feats[name], test_labels,
          num_classes=num_classes, steps=e.probe_steps, lr=e.probe_lr,
          weight_decay=e.probe_weight_decay, batch_size=e.probe_batch_size or None,
          seed=e.seed, mesh=model.mesh)
      for key in ("top1", "top5", "train_top1"):
        results[f"probe/{name}/{key}"] = scores[key]
    return results
