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

import os

from absl import logging
import jax
import ml_collections

from bigbigan_jax import config as config_lib
from bigbigan_jax import inference
from bigbigan_jax import storage
from bigbigan_jax.evaluation import fid_eval
from bigbigan_jax.evaluation import judge_eval
from bigbigan_jax.evaluation import probe_eval
from bigbigan_jax.reporting import curves
from bigbigan_jax.reporting import metric_writer
from bigbigan_jax.training import checkpoint as checkpoint_lib


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
      evaluators.append(probe_eval.LinearProbe(config))
    elif name == "judge":
      evaluators.append(judge_eval.JudgeEvaluator(config))
    else:
      try:
        evaluators.append(fid_eval.FidInceptionScore(config, workdir))
      except fid_eval.MissingInceptionWeights as error:
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
    storage.write_json(results_path(workdir, step), {"step": step, "results": results})


def check(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """What `evaluate` checks before any work (`--mode=eval --dry_run` stops here).

  Returns:
    (the evaluators' names, the evaluators).
  """
  config_lib.validate(config)
  names = tuple(config.evals) or default_evals(config)
  evaluators = build(config, workdir, names)
  checkpoint_lib.check_compatible(workdir, config)
  inference.read_config(workdir, step)  # No checkpoint, or none at `step`: names the fix.
  return names, evaluators


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
  names, evaluators = check(config, workdir, step)
  model = inference.load(workdir, step, batch_size=config.eval.batch_size)
  logging.info("Evaluating %s at step %d: %s.", workdir, model.step, ", ".join(names))
  results = run(evaluators, model)
  writer = metric_writer.MetricWriter(metric_writer.tensorboard_dir(config, workdir),
                                      enabled=jax.process_index() == 0)
  report(model.step, results, workdir, writer)
  return results


def sweep_steps(workdir: str, steps: str) -> list[int]:
  """The checkpoint steps `--steps` names ("all", or "N,M,..."), ascending.

  Raises:
    ValueError: a listed step has no checkpoint (the message lists those that do).
  """
  available = inference.checkpoint_steps(workdir)
  if steps.strip() == "all":
    return available
  try:
    wanted = sorted({int(s) for s in steps.split(",") if s.strip()})
  except ValueError:
    raise ValueError(f"--steps={steps!r}: give 'all' or step numbers, e.g. --steps=500,1000"
                     ) from None
  missing = [s for s in wanted if s not in available]
  if missing or not wanted:
    raise ValueError(f"--steps={steps}: no checkpoint at step(s) {missing or wanted} in "
                     f"{workdir}; it has {', '.join(map(str, available)) or 'none'}")
  return wanted


def evaluate_steps(config: ml_collections.ConfigDict, workdir: str,
                   steps: str) -> dict[int, dict[str, float]]:
  """`--mode=eval --steps=all|N,M`: `evaluate` on each named checkpoint that has no result in
  WORKDIR/eval/ yet, oldest first, then the learning curves redrawn.

  A result already there is not redone, and each is written as soon as it is computed, so a
  sweep that was stopped resumes where it stopped when run again.

  Returns:
    {step: results} of the steps evaluated now.
  """
  check(config, workdir)
  todo = [s for s in sweep_steps(workdir, steps)
          if not storage.exists(results_path(workdir, s))]
  logging.info("Evaluating %d checkpoint(s) without results in %s: %s.", len(todo), workdir,
               ", ".join(map(str, todo)) or "none")
  done = {}
  for step in todo:
    done[step] = evaluate(config, workdir, step)
  if jax.process_index() == 0:
    curves.plot(workdir)
  return done
