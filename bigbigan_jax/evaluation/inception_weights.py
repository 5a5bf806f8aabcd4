"""The FID Inception weights: converting pytorch-fid's file, and loading the result.

Nothing here downloads anything. Get pytorch-fid's public port of the TF weights,

  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

on a machine with network access, then convert it once (needs torch installed there; torch
is not a dependency of this package):

  python -m bigbigan_jax.evaluation.inception_weights \\
      --convert_from=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

`--convert_from` also takes an .npz holding the same state-dict keys, so a machine without
torch can finish the conversion. `load_inception("inception_fid.npz")` then returns the module
and its variables.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from bigbigan_jax.evaluation import inception

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth")

_HOW_TO_GET = (
    "Produce it from pytorch-fid's public weights (" + WEIGHTS_URL + ") with: python -m "
    "bigbigan_jax.evaluation.inception_weights --convert_from=pt_inception-2015-12-05-6726825d.pth "
    "--out=inception_fid.npz")


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(inception.NAME_SEP)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _check_names_and_shapes(flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                            source: str) -> None:
  """Raises a ValueError listing what is missing, unexpected or misshapen in `flat`."""
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  misshapen = sorted(f"{k}: {tuple(np.shape(flat[k]))} != expected {expected[k]}"
                     for k in set(flat) & set(expected)
                     if tuple(np.shape(flat[k])) != tuple(expected[k]))
  if missing or unexpected or misshapen:
    def show(items):
      return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
    problems = []
    if missing:
      problems.append(f"missing {show(missing)}")
    if unexpected:
      problems.append(f"unexpected {show(unexpected)}")
    if misshapen:
      problems.append(f"wrong shapes {show(misshapen)}")
    raise ValueError(f"{source} does not hold the FID Inception weights: "
                     + "; ".join(problems) + ". " + _HOW_TO_GET)


def load_inception(path: str | os.PathLike, *, logits_bias: bool = False,
                   precision: inception.PrecisionLike = jax.lax.Precision.HIGHEST,
                   ) -> tuple[inception.FIDInceptionV3, dict[str, Any]]:
  """Loads converted FID Inception weights from a local .npz file.

  Args:
    path: the .npz written by `python -m bigbigan_jax.evaluation.inception_weights --convert_from=...`.
    logits_bias: see `FIDInceptionV3.logits_bias`.
    precision: see `FIDInceptionV3.precision`.

  Returns:
    (module, variables), for `module.apply(variables, images)` → (pool3, logits).
    The variables are float32 numpy arrays; `make_inception_fn` puts them on devices.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not an .npz of exactly the expected variables and shapes.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID Inception weights not found at {path!r}. {_HOW_TO_GET}")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {name: np.asarray(data[name], np.float32) for name in data.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path!r} is not a readable .npz file ({e}). {_HOW_TO_GET}") from e
  module = inception.FIDInceptionV3(logits_bias=logits_bias, precision=precision)
  _check_names_and_shapes(flat, inception.variable_shapes(module), repr(path))
  return module, _unflatten(flat)


# pytorch-fid's BasicConv2d and Linear parameter names → (collection, flax leaf name).
_TORCH_LEAVES = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
}


def torch_key_to_flax(key: str) -> str | None:
  """Maps one pytorch-fid state-dict key to the flat flax variable name.

  Args:
    key: e.g. "Mixed_5b.branch1x1.conv.weight", "fc.bias".

  Returns:
    e.g. "params/Mixed_5b/branch1x1/conv/kernel"; None for keys that carry no weights
    (BatchNorm's `num_batches_tracked`).

  Raises:
    ValueError: a key of no known form.
  """
  parts = key.split(".")
  if parts[-1] == "num_batches_tracked":
    return None
  if parts[0] == "fc" and len(parts) == 2 and parts[1] in ("weight", "bias"):
    return inception.NAME_SEP.join(["params", "fc", "kernel" if parts[1] == "weight" else "bias"])
  if len(parts) >= 3 and tuple(parts[-2:]) in _TORCH_LEAVES:
    collection, leaf = _TORCH_LEAVES[tuple(parts[-2:])]
    return inception.NAME_SEP.join([collection, *parts[:-1], leaf])
  raise ValueError(f"unknown state-dict key {key!r}: not a pytorch-fid FID Inception weight")


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Converts pytorch-fid's FID Inception state dict to flat flax variables.

  Conv kernels go from torch's OIHW to flax's HWIO, the classifier from (out, in) to
  (in, out); everything else is copied. The result is checked against the network.

  Args:
    state_dict: key → array (numpy arrays, or anything `np.asarray` takes, e.g. CPU torch
      tensors).

  Returns:
    flat flax name → float32 numpy array, ready for `np.savez`.

  Raises:
    ValueError: a key is unknown, missing or of the wrong shape.
  """
  flat = {}
  for key, value in state_dict.items():
    name = torch_key_to_flax(key)
    if name is None:
      continue
    array = np.asarray(value, dtype=np.float32)
    if name.endswith("/conv/kernel"):
      if array.ndim != 4:
        raise ValueError(f"{key}: expected a 4-D OIHW conv weight, got shape {array.shape}")
      array = array.transpose(2, 3, 1, 0)
    elif name == inception.NAME_SEP.join(["params", "fc", "kernel"]):
      if array.ndim != 2:
        raise ValueError(f"{key}: expected a 2-D (out, in) weight, got shape {array.shape}")
      array = array.T
    flat[name] = np.ascontiguousarray(array)
  _check_names_and_shapes(flat, inception.variable_shapes(), "the state dict")
  return flat


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict from a torch .pth (needs torch) or an .npz of the same keys."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist. Download it from {WEIGHTS_URL}")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top  (only the converter needs it)
  except ImportError as e:
    raise ImportError(
        "Reading a .pth file needs torch (pip install torch), which bigbigan_jax does not "
        "depend on. Alternatively save the state dict as .npz where torch is available: "
        "np.savez('sd.npz', **{k: v.numpy() for k, v in torch.load(PTH).items()})") from e
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except TypeError:  # torch < 1.13 has no weights_only.
    state_dict = torch.load(path, map_location="cpu")
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def convert_file(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, np.ndarray]:
  """Converts pytorch-fid's weight file to the .npz `load_inception` reads.

  Args:
    src: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, or an .npz of its state dict.
    out: where to write the flax .npz.

  Returns:
    The converted flat variables (as written).
  """
  flat = convert_state_dict(_read_state_dict(os.fspath(src)))
  out = os.fspath(out)
  tmp = out + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, out)  # A half-written file never carries the final name.
  return flat


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: convert pytorch-fid's weights to this package's .npz."""
  parser = argparse.ArgumentParser(
      prog="python -m bigbigan_jax.evaluation.inception_weights",
      description="Convert pytorch-fid's FID Inception weights for bigbigan_jax.")
  parser.add_argument("--convert_from", required=True,
                      help="pt_inception-2015-12-05-6726825d.pth (or an .npz of its state dict)")
  parser.add_argument("--out", required=True, help="the .npz to write, e.g. inception_fid.npz")
  args = parser.parse_args(argv)
  flat = convert_file(args.convert_from, args.out)
  n = sum(v.size for k, v in flat.items() if k.startswith("params"))
  print(f"Wrote {args.out}: {len(flat)} arrays, {n:,} parameters.")


if __name__ == "__main__":
  main()
