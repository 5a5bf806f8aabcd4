"""Every file the trainer writes to or reads from a workdir, local or on a bucket, goes
through here (orbax's checkpoints through orbax, which uses the same library).

Built on `etils.epath`, the library orbax uses for the checkpoint folders of the same
workdir, so both sides of a workdir take one backend for a path:
  - a local path: the os module;
  - `gs://` with TensorFlow installed (every install of this package): TensorFlow's GCS
    filesystem, the client TPU pod jobs have long used;
  - `gs://` with `EPATH_USE_TF=false`: fsspec's gcsfs, which honours `STORAGE_EMULATOR_HOST`.
    TensorFlow's GCS client has its endpoint compiled in, so this is how the test suite runs a
    whole training life against a GCS emulator (tests/test_storage.py).
TensorBoard's event files are the one exception: `tf.summary` writes them through
TensorFlow's own filesystem (`reporting/metric_writer.py`).

Object stores have no folders: a "folder" exists once an object is under it, `makedirs` may
write nothing, and a rename is a copy and a delete per object. The functions below are
written for that (no rename into a folder that must exist first, no reliance on empty
folders), and the same code then serves a local disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, Iterator

from etils import epath


def is_local(path: str) -> bool:
  """Whether `path` is on this machine's filesystem (no `scheme://`)."""
  return "://" not in str(path)


def absolute(path: str) -> str:
  """A local path made absolute (orbax refuses relative ones); a URL unchanged."""
  return os.path.abspath(path) if is_local(path) else str(path)


def join(*parts: str) -> str:
  """os.path.join, which keeps `gs://bucket/...` whole on every platform this runs on."""
  return os.path.join(*map(str, parts))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
  """The names in a folder (no trailing "/", whichever backend), sorted; [] if none."""
  if not isdir(path):
    return []
  return sorted(p.name for p in epath.Path(path).iterdir())


def glob(folder: str, pattern: str) -> list[str]:
  """Paths of the entries of `folder` whose names match `pattern`, sorted."""
  return sorted(str(p) for p in epath.Path(folder).glob(pattern))


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def open_file(path: str, mode: str = "r") -> Iterator[Any]:
  """A file object on any backend; writing creates the parent folders first."""
  if mode[0] in "wa":
    makedirs(os.path.dirname(str(path)) or ".")
  with epath.Path(path).open(mode) as f:
    yield f


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` whole (creating parent folders) and returns `path`.

  An object store shows an object only once its upload completes, so a reader never sees
  half of one; locally the bytes go to a temporary name first and are renamed over `path`.
  """
  if is_local(path):
    makedirs(os.path.dirname(path) or ".")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  else:
    with open_file(path, "wb") as f:
      f.write(data)
  return path


def read_json(path: str) -> Any:
  return json.loads(read_bytes(path).decode("utf-8"))


def write_json(path: str, value: Any) -> str:
  return write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def move(src: str, dst: str) -> None:
  """Moves a file or a folder (all its files) to `dst`, which must not exist.

  On an object store each object is copied (by the backend's copy: streamed, or done by the
  store itself) and deleted, so a folder's move is not atomic; this is used for moving
  damaged checkpoints aside, where that is harmless.
  """
  if exists(dst):
    raise FileExistsError(f"{dst} already exists; not moving {src} onto it")
  if is_local(src):
    makedirs(os.path.dirname(dst) or ".")
    os.rename(src, dst)
    return
  source = epath.Path(src)
  if not source.is_dir():
    epath.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    source.rename(dst)
    return
  for relative in _files_under(source):
    (source / relative).copy(epath.Path(join(dst, relative)))
  source.rmtree()


def _files_under(folder: epath.Path, prefix: str = "") -> Iterator[str]:
  """The files under `folder`, as paths relative to it (epath's walk gives fsspec's roots
  without their `gs://`, so it is not used)."""
  for entry in sorted(folder.iterdir()):
    name = join(prefix, entry.name) if prefix else entry.name
    if entry.is_dir():
      yield from _files_under(entry, name)
    else:
      yield name


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local file holding `path`'s bytes, for readers that need one (numpy's loaders): the
  file itself when it is local, else a temporary copy, deleted afterwards."""
  if is_local(path):
    yield path
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    with open(local, "wb") as f:
      f.write(read_bytes(path))
    yield local


def save_npz(path: str, **arrays) -> str:
  """numpy's savez to any backend, written whole."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return write_bytes(path, buffer.getvalue())
