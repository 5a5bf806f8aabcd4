"""colabs/bigbigan_demo.ipynb runs top to bottom on the CPU with the tiny config.

The notebook is executed in a fresh python3 kernel by nbclient, with its parameters set through
the BIGBIGAN_COLAB_* environment variables the kernel inherits (and this suite's JAX settings
from conftest: CPU, 8 fake devices, the shared compilation cache). It trains a tiny BigBiGAN
for two steps, loads it, shows grids and runs short linear probes.
"""

import pathlib
import re

import nbformat
import pytest

pytestmark = pytest.mark.slow  # runs the notebook end to end.

nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "colabs" / "bigbigan_demo.ipynb"
PROBE = re.compile(r"linear probe top-1 ([0-9.]+) on ([a-z_ ]+?) \(")


def _outputs(nb, output_type):
  return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
          if o.output_type == output_type]


def test_committed_notebook_is_clean():
  """Valid nbformat 4 on a python3 kernel, outputs cleared, a papermill parameters cell."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1
  for name in ("CONFIG", "WORKDIR", "TRAIN_STEPS"):
    assert re.search(rf"^{name} = ", parameters[0].source, re.M)


def test_notebook_runs_on_cpu_with_the_tiny_config(tmp_path, monkeypatch):
  workdir = tmp_path / "workdir"
  for name, value in {"CONFIG": "configs/tiny.py", "WORKDIR": str(workdir), "STEPS": "2",
                      "PROBE_STEPS": "20", "PROBE_TRAIN": "200", "PROBE_TEST": "100"}.items():
    monkeypatch.setenv(f"BIGBIGAN_COLAB_{name}", value)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Run from colabs/, as Jupyter or Colab would: the config path must resolve from there.
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # Raises CellExecutionError, with the cell's traceback, if a cell fails.

  assert not _outputs(nb, "error")
  stdout = "".join(o.text for o in _outputs(nb, "stream") if o.name == "stdout")
  assert "CpuDevice" in stdout  # The setup cell's jax.devices().
  assert "Trained 2 steps" in stdout
  assert (workdir / "checkpoints" / "2").is_dir()
  assert "step 2: G makes 32x32 images" in stdout and "E reads 64x64" in stdout
  images = [o for o in _outputs(nb, "display_data") if "image/png" in o.data]
  # Samples, truncation sweep, reals, reconstructions, interpolations.
  assert len(images) == 5
  probe = {name: float(value) for value, name in PROBE.findall(stdout)}
  assert set(probe) == {"avepool_feat", "bn_crelu_feat", "raw pixels"}, stdout
  assert all(0.0 <= top1 <= 1.0 for top1 in probe.values())
  assert "200 train, 100 held-out images, 10 classes" in stdout
