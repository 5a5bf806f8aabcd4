"""Evaluators of a trained model: the linear probe of E's features, and FID / Inception Score.

Each evaluator is built once from the config (checking what it needs before any work) and
then run on an `inference.Model` as often as wanted: `run(model)` returns {name: float}.
`config.evals` picks them by name (config.EVALUATORS):

- "linear_probe" (BigBiGAN): E's frozen `avepool_feat` and `bn_crelu_feat` (eval mode) of
  config.data's `eval.probe_train_split` train a softmax classifier (`linear_probe`), scored
  top-1/top-5 on `eval.probe_test_split`, as the paper's representation-learning numbers.
  With `eval.probe_baselines`, also raw pixels and a freshly initialised E of the same
  architecture, its BN statistics estimated on the probe's train split: what E's training
  adds.
- "judge": a small classifier trained on the real `eval.probe_train_split` (judge.py)
  labels G(E(x)) of `eval.probe_test_split` (recon/class_keep: does the reconstruction keep
  the class?) and G's samples (classifier IS and FID; per-class accuracy of a
  class-conditional G). Needs no download: what Inception is for ImageNet.
- "fid": `eval.num_samples` images of the EMA generator, their FID Inception pool3 features
  against the statistics of `eval.fid_reference_examples` real images (computed once, then
  cached as .npz), and the Inception Score over `eval.is_splits` splits. The weights come from
  the local file `eval.inception_path`; nothing is downloaded.

The trainer runs them every `eval_every_steps` and at the end (`run_on_state`); `evaluate` is
`python -m bigbigan_jax.main --mode=eval`: the workdir's checkpoint, every result to the
console, TensorBoard, and WORKDIR/eval/step_<step>.json.

Every process runs every evaluator on the same data (each reads the whole of the first N
examples, in order), since each compiled call spans all devices; only process 0 writes.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from bigbigan_jax import checkpoint as checkpoint_lib
from bigbigan_jax import config as config_lib
from bigbigan_jax import inception as inception_lib
from bigbigan_jax import inference
from bigbigan_jax import input_pipeline
from bigbigan_jax import judge as judge_lib
from bigbigan_jax import linear_probe
from bigbigan_jax import metric_writer
from bigbigan_jax import metrics as metrics_lib
from bigbigan_jax import models
from bigbigan_jax import sharding as sharding_lib

PIXELS_MAX_SIDE = 32  # The pixel baseline's images are average-pooled to at most this side.


class MissingInceptionWeights(FileNotFoundError):
  """FID/IS were asked for, but `config.eval.inception_path` names no file."""


# ---------------------------------------------------------------------------------------------
# Real data.
# ---------------------------------------------------------------------------------------------


def _eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with the evaluation batch size: the input pipeline batches by config.batch_size."""
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.batch_size = config.eval.batch_size
  return copy


def real_batches(config: ml_collections.ConfigDict, split: str, max_examples: int = 0):
  """Yields (images, labels) of config.data's `split` in order, padding dropped.

  Images are at the input pipeline's resolution (E's for BigBiGAN), float32 in [-1, 1]. Every
  process reads the whole split (see the module docstring). `max_examples` > 0 stops after
  the first that many.
  """
  batches = input_pipeline.create_input_iter(_eval_config(config), split=split, train=False,
                                             process_index=0, process_count=1)
  seen = 0
  for batch in batches:
    mask = batch["mask"]
    images, labels = batch["image"][mask], batch["label"][mask]
    if max_examples:
      images, labels = images[:max_examples - seen], labels[:max_examples - seen]
    seen += len(labels)
    if len(labels):
      yield images, labels
    if max_examples and seen >= max_examples:
      return


# ---------------------------------------------------------------------------------------------
# Linear probe.
# ---------------------------------------------------------------------------------------------


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
    input_pipeline.check_disjoint_splits(config, config.eval.probe_train_split,
                                         config.eval.probe_test_split, "the linear probe")
    self.config = config

  def features(self, encoders: dict[str, inference.Model], split: str
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of one split: {f"{encoder}/{feature}": (N, F)} (plus "pixels" with the
    baselines) and the (N,) labels."""
    e = self.config.eval
    parts: dict[str, list] = {}
    labels = []
    for images, y in real_batches(self.config, split, e.probe_max_examples):
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
          real_batches(self.config, e.probe_train_split, e.probe_max_examples))
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


# ---------------------------------------------------------------------------------------------
# FID and Inception Score.
# ---------------------------------------------------------------------------------------------


def _copy_to_local(path: str, directory: str) -> str:
  local = os.path.join(directory, os.path.basename(path))
  tf.io.gfile.copy(path, local, overwrite=True)
  return local


class FidInceptionScore:
  """FID of G's samples against real data's Inception statistics, and their Inception Score."""

  name = "fid"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    """Checks that the Inception weights exist (loads nothing yet).

    Raises:
      MissingInceptionWeights: eval.inception_path is empty or names no file.
    """
    path = config.eval.inception_path
    if not path or not tf.io.gfile.exists(path):
      where = ("config.eval.inception_path is empty" if not path
               else f"config.eval.inception_path={path!r} names no file")
      raise MissingInceptionWeights(
          f"FID/IS need the FID Inception-v3 weights, but {where}. Convert pytorch-fid's "
          f"public weights ({inception_lib.WEIGHTS_URL}) once, on a machine with torch: "
          "`python -m bigbigan_jax.inception --convert_from=pt_inception-2015-12-05-6726825d.pth"
          " --out=inception_fid.npz` (see bigbigan_jax/inception.py), then pass "
          "--config.eval.inception_path=inception_fid.npz; or drop 'fid' from config.evals.")
    self.config, self.workdir = config, workdir
    self._inception = None  # (module, variables), loaded at the first run.
    self._fns = {}  # Per mesh: the jitted Inception.
    self._reference = None  # (mu, sigma).

  # --- Inception. ----------------------------------------------------------------------------

  def _inception_fn(self, mesh):
    if self._inception is None:
      path = self.config.eval.inception_path
      with tempfile.TemporaryDirectory() as tmp:
        local = path if os.path.isfile(path) else _copy_to_local(path, tmp)
        self._inception = inception_lib.load_inception(local)
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
    if tf.io.gfile.exists(path):
      with tempfile.TemporaryDirectory() as tmp:
        local = path if os.path.isfile(path) else _copy_to_local(path, tmp)
        mu, sigma, meta = metrics_lib.load_stats(local, with_meta=True)
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
    for images, _ in real_batches(self.config, e.fid_reference_split, e.fid_reference_examples):
      images = np.asarray(models.pool_for_discriminator(images, self.config.model.resolution))
      pools.append(self.inception_outputs(images, mesh)[0])
    pools = np.concatenate(pools)
    mu, sigma = metrics_lib.feature_stats(pools)
    if jax.process_index() == 0:
      tf.io.gfile.makedirs(os.path.dirname(path) or ".")
      with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "stats.npz")
        metrics_lib.save_stats(local, mu, sigma, num_examples=len(pools), **self._stats_meta())
        tf.io.gfile.copy(local, path, overwrite=True)
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


# ---------------------------------------------------------------------------------------------
# The judge: reconstructions keep the class, samples look like the classes.
# ---------------------------------------------------------------------------------------------


def _split_arrays(config, split: str, max_examples: int = 0):
  parts = list(real_batches(config, split, max_examples))
  if not parts:
    raise ValueError(f"config.data's split {split!r} has no examples")
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]).astype(np.int32))


class JudgeEvaluator:
  """Scores G(E(x)) and G's samples with a classifier trained on the real data (judge.py).

  Results: BigBiGAN: recon/class_keep, recon/judge_accuracy; every model:
  samples/classifier_is, samples/classifier_fid; class-conditional G:
  samples/class_accuracy and samples/class_accuracy/<class>.
  """

  name = "judge"

  def __init__(self, config: ml_collections.ConfigDict):
    input_pipeline.check_disjoint_splits(config, config.eval.probe_train_split,
                                         config.eval.probe_test_split, "the judge")
    self.config = config
    self._data = None  # (judge, held-out images, labels, real feature statistics).

  def _prepare(self):
    if self._data is None:
      e = self.config.eval
      train_x, train_y = _split_arrays(self.config, e.probe_train_split, e.probe_max_examples)
      test_x, test_y = _split_arrays(self.config, e.probe_test_split, e.probe_max_examples)
      num_classes = self.config.model.num_classes or int(max(train_y.max(), test_y.max())) + 1
      res = self.config.model.resolution
      # The judge sees images as D does: average-pooled to G's resolution.
      pool = lambda x: np.asarray(models.pool_for_discriminator(x, res))
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
      held_out = np.asarray(models.pool_for_discriminator(test_x, model.resolution))
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


# ---------------------------------------------------------------------------------------------
# Building, running, reporting.
# ---------------------------------------------------------------------------------------------


def default_evals(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What `--mode=eval` runs when config.evals is empty: every evaluator that applies."""
  names = ("linear_probe",) if config.model.kind == "bigbigan" else ()
  return names + ("judge",) + (("fid",) if config.eval.inception_path else ())


def build(config: ml_collections.ConfigDict, workdir: str, names=None, *,
          skip_unavailable: bool = False) -> list:
  """The evaluators `names` (default: config.evals), each checked for what it needs.

  Args:
    config: the experiment config (validated here).
    workdir: where FID reference statistics are cached by default.
    names: evaluator names from config.EVALUATORS.
    skip_unavailable: log a warning and leave out "fid" when its Inception weights are missing
      (the trainer's choice), instead of raising.

  Raises:
    ValueError: an unknown name, or an evaluator that does not apply to the model.
    MissingInceptionWeights: "fid" without weights, unless skip_unavailable.
  """
  names = tuple(config.evals if names is None else names)
  config_lib.validate(config)
  for name in names:
    if name not in config_lib.EVALUATORS:
      raise ValueError(f"unknown evaluator {name!r}; allowed values are "
                       + ", ".join(repr(a) for a in config_lib.EVALUATORS))
  evaluators = []
  for name in names:
    if name == "linear_probe":
      evaluators.append(LinearProbe(config))
    elif name == "judge":
      evaluators.append(JudgeEvaluator(config))
    else:
      try:
        evaluators.append(FidInceptionScore(config, workdir))
      except MissingInceptionWeights as error:
        if not skip_unavailable:
          raise
        logging.warning("Skipping the 'fid' evaluator: %s", error)
  return evaluators


def run(evaluators, model: inference.Model) -> dict[str, float]:
  """Every evaluator on `model`; their results merged, as Python floats."""
  results = {}
  for evaluator in evaluators:
    results.update({k: float(v) for k, v in evaluator.run(model).items()})
  return results


def run_on_state(evaluators, nets, state, config) -> dict[str, float]:
  """`run` on an in-memory train state (the trainer's periodic evaluation)."""
  model = inference.from_state(nets, state, config, batch_size=config.eval.batch_size)
  return run(evaluators, model)


def results_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "eval", f"step_{step:07d}.json")


def report(step: int, results: dict[str, float], workdir: str,
           writer: metric_writer.MetricWriter) -> None:
  """Logs results, writes them to TensorBoard (as eval/<name>) and to results_path (JSON)."""
  for name, value in sorted(results.items()):
    logging.info("eval step %d | %s %.4f", step, name, value)
  writer.scalars(step, {f"eval/{k}": v for k, v in results.items()})
  writer.flush()
  if jax.process_index() == 0:
    path = results_path(workdir, step)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump({"step": step, "results": results}, f, indent=2, sort_keys=True)


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict[str, float]:
  """`--mode=eval`: runs config.evals (or `default_evals`) on a workdir's checkpoint.

  Everything that can fail on bad input (config, missing Inception weights, no checkpoint, a
  checkpoint of another model) fails before any evaluation work.

  Args:
    config: the experiment config; its model must match the checkpoint's.
    workdir: a training run's directory.
    step: the checkpoint's step; None for the newest.

  Returns:
    {name: value}, also logged, written to TensorBoard and to WORKDIR/eval/step_<step>.json.
  """
  config_lib.validate(config)
  names = tuple(config.evals) or default_evals(config)
  evaluators = build(config, workdir, names)
  checkpoint_lib.check_compatible(workdir, config)
  model = inference.load(workdir, step, batch_size=config.eval.batch_size)
  logging.info("Evaluating %s at step %d: %s.", workdir, model.step, ", ".join(names))
  results = run(evaluators, model)
  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)
  report(model.step, results, workdir, writer)
  return results
