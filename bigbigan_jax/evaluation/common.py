"""What every evaluator reads: the real data of a split, as the evaluation pipeline gives it.

Every process reads the whole of the first N examples, in order, since each compiled call
spans all devices.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from bigbigan_jax.data import pipeline


def eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
  batches = pipeline.create_input_iter(eval_config(config), split=split, train=False,
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


def split_arrays(config, split: str, max_examples: int = 0):
  parts = list(real_batches(config, split, max_examples))
  if not parts:
    raise ValueError(f"config.data's split {split!r} has no examples")
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]).astype(np.int32))
