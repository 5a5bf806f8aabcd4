"""Linear-probe evaluation: a softmax classifier trained on frozen features.

The BigBiGAN paper's representation-learning numbers are the accuracy of a linear classifier
on frozen encoder features (`avepool_feat`, `bn_crelu_feat`). This module trains one with
optax on any (N, D) feature array and reports held-out top-1/top-5 accuracy:

- features are standardised with the TRAIN split's per-dimension mean and std, and the test
  split gets the same transform (its own statistics would leak test information);
- Adam with decoupled weight decay on the weights (not the bias), cosine-decayed learning rate,
  full-batch by default or minibatches of `batch_size`;
- the step is jitted with the batch sharded over the "data" axis of a 1-D device mesh
  (`NamedSharding`), parameters replicated; batches are zero-padded to a multiple of the
  number of devices and the padding carries zero weight in the loss, so the result does not
  depend on the device count beyond float rounding.

Weights start at zero: the problem is convex, so the start only affects rounding, and zeros
make runs reproducible across device counts.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from bigbigan_jax import sharding as sharding_lib

_PRECISION = jax.lax.Precision.HIGHEST  # TPUs would otherwise multiply in one bf16 pass.

Params = dict[str, jax.Array]


def standardize(train_feats: np.ndarray, *others: np.ndarray, eps: float = 1e-6
                ) -> tuple[np.ndarray, ...]:
  """Standardises features with the train split's statistics.

  Args:
    train_feats: (N, D) training features; their mean and std define the transform.
    *others: further (M, D) arrays transformed the same way.
    eps: dimensions whose std is below this are only centred (they carry no signal).

  Returns:
    float32 arrays: the standardised train features, then each of `others`.
  """
  train = np.asarray(train_feats, np.float64)
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  std = np.where(std < eps, 1.0, std)
  return tuple(((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
               for x in (train, *others))


def default_mesh() -> Mesh:
  """A 1-D mesh over every device, its axis named "data"."""
  return Mesh(np.asarray(jax.devices()), (sharding_lib.DATA,))


def _loss(params: Params, x: jax.Array, y: jax.Array, weight: jax.Array) -> jax.Array:
  logits = jnp.dot(x, params["kernel"], precision=_PRECISION) + params["bias"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def train_step(tx: optax.GradientTransformation, params: Params, opt_state: Any,
               x: jax.Array, y: jax.Array, weight: jax.Array
               ) -> tuple[Params, Any, jax.Array]:
  """One optimiser step on the weighted mean cross-entropy.

  Args:
    tx: the optimiser (bound with functools.partial before jitting).
    params: {"kernel": (D, C), "bias": (C,)}.
    opt_state: tx's state.
    x: (B, D) standardised features.
    y: (B,) int labels.
    weight: (B,) 1 for real rows, 0 for padding.

  Returns:
    (new params, new opt_state, loss before the step).
  """
  loss, grads = jax.value_and_grad(_loss)(params, x, y, weight)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def predict_topk(params: Params, x: jax.Array, k: int) -> jax.Array:
  """The k highest-scoring classes of each row, best first: (B, k) int32."""
  logits = jnp.dot(x, params["kernel"], precision=_PRECISION) + params["bias"]
  return jax.lax.top_k(logits, k)[1]


def _accuracy(predict, params: Params, mesh: Mesh, feats: np.ndarray, labels: np.ndarray,
              chunk: int) -> tuple[float, float]:
  """(top-1, top-k) accuracy, evaluated in device-sharded chunks."""
  hits1 = hitsk = 0
  for start in range(0, feats.shape[0], chunk):
    x = feats[start:start + chunk]
    rows = x.shape[0]
    top = np.asarray(predict(params, sharding_lib.put_rows(mesh, x, sharding_lib.round_up(rows, sharding_lib.data_size(mesh)))))
    top, y = top[:rows], labels[start:start + chunk, None]
    hits1 += int(np.sum(top[:, :1] == y))
    hitsk += int(np.sum(np.any(top == y, axis=1)))
  n = max(feats.shape[0], 1)
  return hits1 / n, hitsk / n


def _check_split(name: str, feats: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  if feats.ndim != 2 or labels.shape != (feats.shape[0],):
    raise ValueError(f"{name}: expected features (N, D) and labels (N,), got "
                     f"{feats.shape} and {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]")


def train_linear_probe(train_feats: np.ndarray, train_labels: np.ndarray,
                       test_feats: np.ndarray, test_labels: np.ndarray, *,
                       num_classes: int, steps: int = 500, lr: float = 1e-2,
                       weight_decay: float = 1e-4, batch_size: int | None = None,
                       seed: int = 0, mesh: Mesh | None = None,
                       eval_batch_size: int = 8192) -> dict[str, float]:
  """Trains a linear softmax classifier on frozen features and scores held-out features.

  Args:
    train_feats: (N, D) training features.
    train_labels: (N,) int labels in [0, num_classes).
    test_feats: (M, D) held-out features.
    test_labels: (M,) int labels.
    num_classes: number of classes C.
    steps: optimiser steps.
    lr: peak learning rate of AdamW, cosine-decayed to 0 over `steps`.
    weight_decay: decoupled weight decay on the weights (not the bias).
    batch_size: global minibatch size, drawn without replacement each epoch (padded with
      zero-weight rows to a multiple of the device count); None or >= N: full batch.
    seed: seeds the minibatch order (the weights start at zero).
    mesh: the device mesh, with an axis "data" to shard batches over; None: every device.
    eval_batch_size: rows per evaluation chunk.

  Returns:
    {"top1", "top5", "train_top1", "train_loss"}: held-out top-1 and top-min(5, C) accuracy,
    training-set top-1, and the training loss of the last step, as Python floats.
  """
  train_labels = np.asarray(train_labels).astype(np.int32)
  test_labels = np.asarray(test_labels).astype(np.int32)
  train_x, test_x = standardize(train_feats, test_feats)
  _check_split("train", train_x, train_labels, num_classes)
  _check_split("test", test_x, test_labels, num_classes)
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"train has {train_x.shape[1]} feature dims, test {test_x.shape[1]}")
  if train_x.shape[0] == 0:
    raise ValueError("no training features")

  mesh = mesh if mesh is not None else default_mesh()
  shards = sharding_lib.data_size(mesh)
  replicated = NamedSharding(mesh, P())

  n, dim = train_x.shape
  schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
  tx = optax.adamw(schedule, weight_decay=weight_decay,
                   mask={"kernel": True, "bias": False})
  params = jax.device_put({"kernel": jnp.zeros((dim, num_classes), jnp.float32),
                           "bias": jnp.zeros((num_classes,), jnp.float32)}, replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  step_fn = jax.jit(functools.partial(train_step, tx), out_shardings=replicated,
                    donate_argnums=(0, 1))

  full_batch = batch_size is None or batch_size >= n
  rows = sharding_lib.round_up(n if full_batch else batch_size, shards)

  def put(index: np.ndarray | slice):
    count = len(train_labels[index])
    weight = np.ones((count,), np.float32)
    return (sharding_lib.put_rows(mesh, train_x[index], rows), sharding_lib.put_rows(mesh, train_labels[index], rows),
            sharding_lib.put_rows(mesh, weight, rows))

  rng = np.random.default_rng(seed)
  batch = put(slice(None)) if full_batch else None
  order, cursor = np.empty((0,), np.int64), 0
  loss = jnp.zeros(())
  for _ in range(steps):
    if not full_batch:
      if cursor + batch_size > order.size:
        # Epochs without replacement. The remainder that cannot fill a batch is dropped;
        # each epoch's fresh order drops different rows.
        order, cursor = rng.permutation(n), 0
      batch = put(order[cursor:cursor + batch_size])
      cursor += batch_size
    params, opt_state, loss = step_fn(params, opt_state, *batch)
    # One step in flight at a time: with fake CPU devices on few cores, queued steps'
    # all-reduces can starve one another's threads and deadlock. A probe step is tiny, so
    # the lost pipelining costs nothing that matters.
    loss.block_until_ready()

  k = min(5, num_classes)
  predict = jax.jit(functools.partial(predict_topk, k=k), out_shardings=replicated)
  chunk = sharding_lib.round_up(max(eval_batch_size, 1), shards)
  top1, topk = _accuracy(predict, params, mesh, test_x, test_labels, chunk)
  train_top1, _ = _accuracy(predict, params, mesh, train_x, train_labels, chunk)
  return {"top1": top1, "top5": topk, "train_top1": train_top1, "train_loss": float(loss)}
