"""The README is a user's guide whose commands are true.

It opens with the two commands (install and run the demo; install and run this suite, which
.ci/run runs verbatim) and stays short (the details live in docs/). Every command in its bash
blocks is accounted for here: those that finish in seconds run as written, the long ones
(training, evaluation, TPU compiles) go through their `--dry_run`, which checks the flags,
the config, the data and the workdir without compiling, and the pod launcher's print what they
would run. The Python block runs as written. A command this file does not know fails the
test, so a new one cannot slip in unchecked.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from bigbigan_jax import config as config_lib

from test_aot import needs_libtpu
from test_launch import REFUSING_GCLOUD
from train_steps import save_initial_state

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAX_LINES = 250


def _blocks(language: str) -> list[str]:
  return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def _commands() -> list[str]:
  """Every command of the README's bash blocks: continuations joined, comments dropped,
  `a && b` as two."""
  commands = []
  for block in _blocks("bash"):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+#.*$", "", line).strip()
      for part in line.split(" && ") if line else ():
        commands.append(re.sub(r"\s+", " ", part))
  return commands


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
  lines = README.splitlines()
  assert lines[0].startswith("# ") and lines[2] == "```bash", lines[:3]
  first = _blocks("bash")[0].splitlines()
  assert len(first) == 2, first
  demo, suite = first
  assert demo.startswith("python3 -m pip install . && python3 -m bigbigan_jax.main ")
  assert "--config=configs/digits.py" in demo
  assert suite.endswith("python3 -m pytest tests")
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
  assert ci[-1] == suite, (ci[-1], suite)


def test_readme_is_a_short_guide_with_an_index_of_the_docs():
  lines = README.splitlines()
  assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"
  sections = [line[3:] for line in lines if line.startswith("## ")]
  for needed in ("The digits demo", "Your own images", "Training on a TPU pod slice",
                 "On a single TPU in Colab", "Evaluation", "Documentation"):
    assert any(s.startswith(needed) for s in sections), (needed, sections)
  index = README[README.index("## Documentation"):]
  pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
  for page in pages:
    assert f"| {page} |" in index, f"{page} is not in the README's index of docs/"
  for link in re.findall(r"docs/[\w/.-]+\.(?:md|png)", README):
    assert (ROOT / link).exists(), link


# How each README command is checked: (pattern, kind). "run": as written, in seconds;
# "dry_run" (and "_tpu"): as written plus --dry_run; "pod": the launcher's --dry_run after the
# README's exports. Not run here: the installs (the suite runs installed) and the suite itself
# (the opening test checks that CI runs it verbatim).
KINDS = (
    (r"^python3 -m pip install ", "install"),
    (r"^python3 -m pytest tests$", "suite"),
    (r"^python3? -m bigbigan_jax\.main ", "dry_run"),
    (r"^python3? -m bigbigan_jax\.tools\.plan ", "dry_run_tpu"),
    (r"^python3? -m bigbigan_jax\.tools\.(summary|sample) ", "run"),
    (r"^launch/tpu_pod\.sh ", "pod"),
    (r"^export BIGBIGAN_\w+=", "export"),
)


def _kind(command: str) -> str:
  kinds = [kind for pattern, kind in KINDS if re.search(pattern, command)]
  assert len(kinds) == 1, (f"tests/test_readme.py does not know how to check the README's "
                           f"command {command!r}: add it to KINDS")
  return kinds[0]


def test_every_readme_command_is_checked():
  kinds = {command: _kind(command) for command in _commands()}
  for needed in ("dry_run", "dry_run_tpu", "run", "pod", "install", "suite"):
    assert needed in kinds.values(), (needed, kinds)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
  """A user's working directory as the README assumes it after the demo: configs/, the
  demo's workdir_digits (an untrained checkpoint of configs/digits.py), and some photos."""
  home = tmp_path_factory.mktemp("user")
  (home / "configs").symlink_to(ROOT / "configs")
  save_initial_state(config_lib.load(str(ROOT / "configs" / "digits.py")),
                     home / "workdir_digits")
  rng = np.random.default_rng(0)
  (home / "photos").mkdir()
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), np.uint8)).save(
        home / "photos" / f"{i}.png")
  # For /path/to/images: train/ and val/, one sub-folder per class in each.
  for split, count in (("train", 40), ("val", 10)):
    for label in ("cat", "dog"):
      (home / "my_images" / split / label).mkdir(parents=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(
            home / "my_images" / split / label / f"{i}.png")
  return home


def _run(argv: list[str], cwd: pathlib.Path, env: dict | None = None):
  argv = [a.replace("/path/to/images", str(cwd / "my_images")) for a in argv]
  if argv[0] in ("python", "python3"):
    argv[0] = sys.executable
  out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
  return out


@pytest.mark.slow
def test_training_and_evaluation_commands_pass_their_dry_runs(user_dir):
  ran = 0
  for command in _commands():
    if _kind(command) != "dry_run":
      continue
    out = _run(shlex.split(command) + ["--dry_run"], user_dir)
    log = out.stdout + out.stderr
    assert re.search(r"\] (Training|Evaluating) ", log), log[-2000:]
    assert "Dry run: every check passed" in log, log[-2000:]
    ran += 1
  assert ran >= 3
  assert sorted(p.name for p in user_dir.iterdir()) == [
      "configs", "my_images", "photos", "workdir_digits"], "a dry run wrote something"


@pytest.mark.slow
def test_sampling_and_summary_commands_run_as_written(user_dir):
  ran = 0
  for command in _commands():
    if _kind(command) == "run":
      _run(shlex.split(command), user_dir)
      ran += 1
  assert ran >= 4
  for png in re.findall(r"--out=(\S+\.png)", README):
    with Image.open(user_dir / png) as image:
      assert image.size[0] > 32 and image.size[1] > 32, (png, image.size)


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_planner_commands_pass_their_dry_runs(user_dir):
  ran = 0
  for command in _commands():
    if _kind(command) == "dry_run_tpu":
      out = _run(shlex.split(command) + ["--dry_run"], user_dir,
                 env={"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
      assert "Nothing was compiled" in out.stdout, out.stdout
      ran += 1
  assert ran >= 2


def test_pod_commands_print_what_they_would_run(tmp_path):
  """Each launcher command as written (after the README's exports), with --dry_run and a
  gcloud that fails if called."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(REFUSING_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  ran = []
  for command in _commands():
    kind = _kind(command)
    if kind == "export":
      env.update(a.split("=", 1) for a in shlex.split(command)[1:])
    elif kind == "pod":
      script, verb, *args = shlex.split(command)
      out = _run([str(ROOT / script), verb, "--dry_run", *args], ROOT, env)
      assert "gcloud" in out.stdout, out.stdout[-2000:]
      ran.append(verb)
  assert not (bin_dir / "gcloud-was-called").exists()
  assert {"create", "setup", "train", "delete"} <= set(ran), ran


@pytest.mark.slow
def test_python_api_block_runs_as_written(user_dir, monkeypatch):
  (block,) = [b for b in _blocks("python") if "inference.load" in b]
  monkeypatch.chdir(user_dir)
  namespace = {"real_images": np.zeros((3, 32, 32, 3), np.float32)}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["images"].shape[0] == 16
  assert set(namespace["scores"]) >= {"s_xz"}
  assert namespace["recon"].shape[0] == 3
