"""The package's shape: no import cycle, modules of a readable size, no import side effects,
and no reference to a file the repository does not hold."""

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bigbigan_jax"
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The package modules `path` imports anywhere in it (deferred imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    else:
      continue
    found.update(n for n in names if n in modules)
  return found


def _cycle(graph: dict[str, set[str]]):
  """One import cycle as a list of modules, or None."""
  state = {}  # 1: on the current path, 2: done.
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_a_planted_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_another_in_a_cycle():
  modules = _modules()
  # A package's __init__ is imported with each of its modules, so it is not an edge of its own.
  graph = {name: {m for m in _imports(path, modules) if not name.startswith(m + ".")}
           for name, path in modules.items()}
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# Layers, each importing only from its own and those to its right; train.py and the entry
# points sit above them all.
LOWER_THAN = {
    "bigbigan_jax.training": ("bigbigan_jax.evaluation", "bigbigan_jax.inference",
                              "bigbigan_jax.train", "bigbigan_jax.main", "bigbigan_jax.tools"),
    "bigbigan_jax.models": ("bigbigan_jax.training", "bigbigan_jax.evaluation",
                            "bigbigan_jax.inference", "bigbigan_jax.data"),
    "bigbigan_jax.data": ("bigbigan_jax.training", "bigbigan_jax.evaluation",
                          "bigbigan_jax.inference", "bigbigan_jax.models"),
}


def test_every_import_points_down():
  """No module of training/ imports evaluation/ or inference/, deferred or not (the loop that
  ties them together is bigbigan_jax/train.py, above both); models/ and data/ import neither
  each other nor anything above them."""
  modules = _modules()
  upward = []
  for name, path in modules.items():
    for layer, above in LOWER_THAN.items():
      if name.startswith(layer + ".") or name == layer:
        upward += [f"{name} imports {m}" for m in _imports(path, modules)
                   if any(m == a or m.startswith(a + ".") for a in above)]
  assert not upward, upward


def test_every_module_is_under_the_size_limit():
  sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
  assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_importing_every_module_changes_no_environment(tmp_path):
  names = sorted(_modules())
  script = (
      # Libraries set variables of their own at import (TF2_BEHAVIOR, ...): load them first.
      "import os, sys, jax, flax, optax, orbax.checkpoint, tensorflow, tensorflow_datasets\n"
      "import matplotlib, sklearn, scipy, ml_collections, absl\n"
      "before = dict(os.environ); platforms = jax.config.jax_platforms\n"
      f"for name in {names!r}:\n"
      "  __import__(name)\n"
      "changed = sorted(k for k in set(os.environ) | set(before) "
      "if os.environ.get(k) != before.get(k))\n"
      "assert not changed, changed\n"
      "assert jax.config.jax_platforms == platforms, jax.config.jax_platforms\n"
      "print('ok')\n")
  env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_documents_and_comments_cite_only_files_the_repository_holds():
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  held = set(tracked) | {p.name for p in map(pathlib.Path, tracked)}
  missing = set()
  for name in tracked:
    if not name.endswith((".py", ".md", ".sh", ".cfg", ".ipynb")) or not (ROOT / name).exists():
      continue
    text = (ROOT / name).read_text()
    for cited in re.findall(r"[\w./-]*[\w-]+\.md\b", text):
      if cited.lstrip("./") not in held and pathlib.Path(cited).name not in held:
        missing.add((name, cited))
  assert not missing, sorted(missing)


# How the project was made is no name for a figure or a change: a figure is named by its
# commit, date, config or machine. These catch a numbered step of the work and a working
# sitting of that name; a Unix one (setsid, a process's own) and pytest's fixture scope are
# different things. The examples below are assembled at run time, so this file passes its own
# check.
_STOP, _SESSION = "st" + "op", "sess" + "ion"
HISTORY_WORDS = re.compile(rf"\b{_STOP}s? \d+\b|\b{_SESSION}\b", re.IGNORECASE)
UNIX_SESSION = re.compile(rf"own {_SESSION}|{_SESSION} of its own|new_{_SESSION}|setsid|"
                          rf"scope=\"{_SESSION}\"", re.IGNORECASE)


def _history_words(name: str, text: str) -> list[tuple[str, int, str]]:
  return [(name, number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
          if HISTORY_WORDS.search(line) and not UNIX_SESSION.search(line)]


def test_the_repository_speaks_of_the_project_not_of_how_it_was_made():
  lines = [f"| this host, start of {_STOP} 23 | 1.92 s |", f"as measured in this {_SESSION}",
           f"{_STOP.title()} 7 made it faster"]
  assert _history_words("x.txt", "\n".join(lines)) == [
      ("x.txt", i + 1, line) for i, line in enumerate(lines)]
  assert not _history_words("x.sh", f"setsid gives it a {_SESSION} of its own\nround 5, R4\n"
                                    f'@pytest.fixture(scope="{_SESSION}")')
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  found = []
  for name in tracked:
    path = ROOT / name
    if path.suffix in (".png", ".npz") or not path.exists():
      continue
    found += _history_words(name, path.read_text(errors="replace"))
  assert not found, found
