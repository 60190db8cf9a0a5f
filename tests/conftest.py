"""Shared test fixtures: golden reference data from the PyTorch PEFT stack (tests/golden)."""

import json
import os
import pathlib

import numpy as np
import pytest

GOLDEN = pathlib.Path(__file__).parent / "golden"


def load_golden(name: str):
  """``(arrays, meta)`` of ``tests/golden/NAME.npz`` and ``NAME.json``."""
  arrays = dict(np.load(GOLDEN / f"{name}.npz"))
  meta_path = GOLDEN / f"{name}.json"
  meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
  return arrays, meta


@pytest.fixture
def golden():
  return load_golden
