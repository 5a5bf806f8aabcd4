"""A workdir on a bucket: the trainer's whole life against a GCS emulator, and TensorBoard's
event files on TensorFlow's in-process filesystem.

The emulator is gcp-storage-emulator (the `test` extra), a local server speaking the GCS
JSON API, with the generation header TensorStore needs (tests/gcs_emulator.py). What reaches it: bigbigan_jax/storage.py and orbax's folders through etils.epath
with `EPATH_USE_TF=false` (fsspec's gcsfs, which honours STORAGE_EMULATOR_HOST), and orbax's
arrays through TensorStore's GCS driver (TENSORSTORE_GCS_HTTP_URL). TensorFlow's own GCS
client has its endpoint compiled in, so `tf.summary` cannot be pointed at the emulator:
those runs write TensorBoard to a local folder (config.tensorboard_dir), and the last test
writes and reads event files on `ram://`, which TensorFlow's filesystem takes as it takes
gs://. docs/storage.md has the table of every file and where it is tested.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import numpy as np
import pytest
from processes import free_port
from processes import stopped_at
from processes import wait_for
from test_faults import FLAGS
from test_faults import STEPS
from test_faults import _config
from test_faults import _final_params
from test_faults import uninterrupted  # noqa: F401  (a fixture: the reference run)

from bigbigan_jax.reporting import metric_writer
from bigbigan_jax.tools import collapse

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATOR = pathlib.Path(__file__).resolve().parent / "gcs_emulator.py"
BUCKET = "bigbigan-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """A GCS emulator on a free local port, its bucket created; yields (url, environment
  for the processes that should use it)."""
  port = free_port()
  url = f"http://localhost:{port}"
  log = tmp_path_factory.mktemp("emulator") / "emulator.log"
  with open(log, "w") as out:
    server = subprocess.Popen(
        [sys.executable, str(EMULATOR), "start", "--host=localhost",
         f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
        stdout=out, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).read()
      break
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, log.read_text()
      time.sleep(0.2)
  # gcsfs's check for zonal buckets calls a gRPC API the emulator does not serve.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "EPATH_USE_TF": "false",
         "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_CLOUD_PROJECT": "bigbigan-test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  yield url, env
  server.terminate()
  server.wait(timeout=30)


def _bucket(url):
  """The emulator's bucket, seen from this process (gcsfs pointed at it directly: this
  process's etils has already chosen TensorFlow for gs://)."""
  from gcsfs import core  # pylint: disable=g-import-not-at-top  (not the zonal-bucket subclass)
  return core.GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)


def _python(env, code, timeout=300):
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def test_storage_layer_on_a_gcs_emulator(emulator):
  """Each storage function on gs://, including those that object stores make tricky: a folder
  that exists only through its objects, a folder's move, numpy files read through a local
  copy (the FID statistics cache)."""
  url, env = emulator
  root = f"gs://{BUCKET}/layer-{uuid.uuid4().hex[:8]}"
  _python(env, f"""
      import numpy as np
      from bigbigan_jax import storage
      from bigbigan_jax.evaluation import metrics
      root = {root!r}
      assert not storage.exists(root) and storage.listdir(root) == []
      storage.write_json(root + "/eval/step_0000002.json", {{"step": 2}})
      storage.write_bytes(root + "/eval/step_0000010.json", b'{{"step": 10}}')
      storage.write_bytes(root + "/ckpt/7/state/d/0", b"abc")
      storage.write_bytes(root + "/ckpt/7/meta", b"m")
      assert storage.isdir(root + "/eval") and storage.listdir(root) == ["ckpt", "eval"]
      assert [p.rsplit("/", 1)[1] for p in storage.glob(root + "/eval", "step_*.json")] == [
          "step_0000002.json", "step_0000010.json"]
      assert storage.read_json(root + "/eval/step_0000002.json") == {{"step": 2}}
      storage.move(root + "/ckpt/7", root + "/damaged/7")
      assert not storage.exists(root + "/ckpt/7")
      assert storage.read_bytes(root + "/damaged/7/state/d/0") == b"abc"
      try:
        storage.move(root + "/eval", root + "/damaged")
        raise SystemExit("moved onto an existing folder")
      except FileExistsError:
        pass
      mu, sigma = np.arange(3.0), np.eye(3)
      metrics.save_stats(root + "/eval/fid.npz", mu, sigma, split="train", resolution=16)
      m, s, meta = metrics.load_stats(root + "/eval/fid.npz", with_meta=True)
      assert (m == mu).all() and (s == sigma).all() and meta["split"] == "train", meta
      with storage.local_copy(root + "/eval/fid.npz") as local:
        assert not local.startswith("gs://") and np.load(local)["mu"].tolist() == [0, 1, 2]
      print("ok")
  """)
  names = _bucket(url).find(root)
  assert f"{root[5:]}/damaged/7/state/d/0" in names and f"{root[5:]}/eval/fid.npz" in names


def _main(env, log, *flags):
  with open(log, "a") as out:
    return subprocess.Popen([sys.executable, "-m", "bigbigan_jax.main", *flags], cwd=ROOT,
                            env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_training_life_on_a_gcs_emulator(emulator, tmp_path, uninterrupted):  # noqa: F811
  """The tiny run of test_faults with its workdir on the emulator: trained with evaluations,
  sample grids, kept checkpoints and learning curves; stopped by SIGTERM and resumed; a
  damaged checkpoint moved aside; evaluated afterwards (`--mode=eval --steps=all`); sampled
  (`tools.sample`, through `inference.load`). It ends on the uninterrupted run's parameters."""
  url, env = emulator
  bucket = _bucket(url)
  workdir = f"gs://{BUCKET}/run-{uuid.uuid4().hex[:8]}"
  key = workdir[len("gs://"):]
  probe = ("--config.evals=('linear_probe',)", "--config.eval.probe_max_examples=32",
           "--config.eval.probe_steps=20", "--config.eval.batch_size=16")
  flags = (f"--config={ROOT}/configs/tiny.py:lifecycle", f"--workdir={workdir}", *FLAGS,
           f"--config.tensorboard_dir={tmp_path / 'tensorboard'}", *probe,
           "--config.checkpoint_every_steps=4", "--config.sample_every_steps=4",
           "--config.keep_checkpoints=1", "--config.keep_best=1",
           "--config.keep_best_metric=probe/avepool_feat/top1")

  # To step 8: evaluated at 8, grids at 4 and 8, checkpoints at 4 and 8, of which 4 is then
  # rotated away (neither the newest nor the best evaluated).
  log = tmp_path / "first.log"
  proc = _main(env, log, *flags, "--config.num_train_steps=8", "--config.eval_every_steps=8")
  assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
  files = set(bucket.find(key))
  for name in ("config.json", "eval/step_0000008.json", "learning_curves.png",
               "samples/step_0000004.png", "reconstructions/step_0000008.png",
               "checkpoints/8/meta/metadata"):
    assert f"{key}/{name}" in files, (name, sorted(files))
  assert not [f for f in files if "/checkpoints/4/" in f]
  assert os.listdir(tmp_path / "tensorboard")

  # Resumed towards STEPS, stopped by SIGTERM: it saves the step it is at and exits 0.
  log = tmp_path / "stopped.log"
  proc = _main(env, log, *flags, "--config.eval_every_steps=1000")
  wait_for(log, "First step done", [proc])
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
  stopped = stopped_at(log)
  assert bucket.exists(f"{key}/checkpoints/{stopped}/meta/metadata")

  # That checkpoint damaged on the bucket (its array files deleted): the next run falls back
  # to step 8, moves the damaged step aside (on the bucket: an object copy and delete each),
  # and trains to the end.
  arrays = [f for f in bucket.find(f"{key}/checkpoints/{stopped}/state") if "/d/" in f]
  assert arrays
  bucket.rm(arrays)
  log = tmp_path / "resumed.log"
  proc = _main(env, log, *flags)
  assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
  text = log.read_text()
  assert "Damaged checkpoint(s)" in text and "Resuming from step 8" in text.split(
      "Damaged checkpoint(s)")[1], text[-4000:]
  assert bucket.exists(f"{key}/damaged_checkpoints/{stopped}/meta/metadata")

  # Evaluated afterwards: the kept checkpoints without a result (and the curves redrawn).
  kept = sorted(int(p.rsplit("/", 1)[1]) for p in bucket.ls(f"{key}/checkpoints")
                if p.rsplit("/", 1)[1].isdigit())
  assert STEPS in kept
  bucket.rm(f"{key}/eval/step_{STEPS:07d}.json")
  out = subprocess.run([sys.executable, "-m", "bigbigan_jax.main", "--mode=eval",
                        "--steps=all", *flags], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  for step in kept:
    assert bucket.exists(f"{key}/eval/step_{step:07d}.json"), (step, bucket.ls(f"{key}/eval"))

  # The collapse rules replayed over the run: its config and evaluations from the bucket.
  out = subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.collapse",
                        f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  results = [p for p in bucket.ls(f"{key}/eval") if p.endswith(".json")]
  assert out.returncode == 0, out.stderr[-4000:]
  assert f"{len(results)} evaluations" in out.stdout, out.stdout

  # Sampled: tools.sample restores with inference.load and writes its grid to the bucket.
  out = subprocess.run([sys.executable, "-m", "bigbigan_jax.tools.sample",
                        f"--workdir={workdir}", "--num=4"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert bucket.exists(f"{key}/inference/samples_step{STEPS}.png"), bucket.find(key)

  # The checkpoint on the bucket, copied here, holds the uninterrupted run's parameters.
  local = tmp_path / "copy"
  bucket.get(f"{key}/checkpoints/{STEPS}", str(local / "checkpoints" / str(STEPS)),
             recursive=True)
  finals = [_final_params(w, _config()) for w in (local, uninterrupted)]
  assert [step for step, _ in finals] == [STEPS, STEPS]
  np.testing.assert_array_equal(finals[0][1], finals[1][1])


def test_tensorboard_events_on_tensorflows_in_memory_filesystem(load_config):
  """tf.summary's files through TensorFlow's filesystem at a non-local path (ram://, as
  gs:// would be), read back by tools.collapse."""
  config = load_config("tiny.py")
  config.tensorboard_dir = f"ram://tensorboard-{uuid.uuid4().hex[:8]}"
  logdir = metric_writer.tensorboard_dir(config, "gs://unused/run")
  assert logdir == config.tensorboard_dir
  writer = metric_writer.MetricWriter(logdir)
  writer.scalars(100, {"d_loss": 1.25, "g_loss": 2.5})
  writer.images(100, {"samples": np.zeros((8, 8, 3), np.uint8)})
  writer.text(100, "collapse", "a rule fired")
  writer.flush()
  assert collapse.read_stream(logdir) == {100: {"d_loss": 1.25, "g_loss": 2.5}}
  config.tensorboard_dir = ""
  assert metric_writer.tensorboard_dir(config, "gs://b/run") == "gs://b/run/tensorboard"
