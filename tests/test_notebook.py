"""Executes the quick-start notebook end to end (users write experiments in notebooks)."""

import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).parent.parent / "experiments" / "quickstart.ipynb"


def test_quickstart_notebook_runs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent.parent)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "trainable: " in outputs
  # the loss went down and the merged model classifies better than chance (10 classes)
  m = re.search(r"loss: first ([\d.]+), last 5 mean ([\d.]+)", outputs)
  assert m, outputs
  assert float(m.group(2)) < float(m.group(1))
  acc = float(re.search(r"validation accuracy after 40 steps: ([\d.]+)", outputs).group(1))
  assert acc > 0.2
