"""Atomic output files: old or new content, never a part; 0644; no temporaries; strict JSON."""

import json
import math
import os
import stat

import numpy as np
import pytest
from hypothesis import given, strategies as st

from lowrank_jax.trainer import files


def test_write_text_is_atomic_and_0644_even_under_a_strict_umask(tmp_path):
  path = tmp_path / "sub" / "out.txt"
  old = os.umask(0o077)
  try:
    files.write_text(path, "first")
    files.write_text(path, "second")
  finally:
    os.umask(old)
  assert path.read_text() == "second"
  assert stat.S_IMODE(path.stat().st_mode) == 0o644
  assert os.listdir(path.parent) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
  path = tmp_path / "out.json"
  files.write_json(path, {"a": 1})

  class Boom(Exception):
    pass

  with pytest.raises(Boom):
    with files.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write("{\"a\": 2")  # half written
      raise Boom
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["out.json"]


def test_json_is_strict_non_finite_floats_become_null():
  value = {"nan": float("nan"), "inf": np.float32("inf"), "ok": np.float64(0.5), "n": np.int64(3),
           "arr": np.asarray([1.0, np.nan]), "t": (1, -math.inf), "b": np.bool_(True)}
  text = files.dumps(value)
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"nan": None, "inf": None, "ok": 0.5, "n": 3, "arr": [1.0, None],
                              "t": [1, None], "b": True}


@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                    max_leaves=20))
def test_any_json_like_value_serialises_strictly(value):
  out = json.loads(files.dumps(value))  # never raises (allow_nan=False inside)

  def same(a, b):
    if isinstance(a, float) and not math.isfinite(a):
      return b is None
    if isinstance(a, dict):
      return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
      return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
  assert same(value, out)


def test_jsonl_append_and_rewrite_drop_a_torn_line(tmp_path):
  path = tmp_path / "m.jsonl"
  for step in range(1, 6):
    files.append_jsonl(path, {"step": step, "loss": float("nan") if step == 3 else 1.0})
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')  # a kill in the middle of a write
  assert files.rewrite_jsonl(path, lambda r: r["step"] <= 4) == 4
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3, 4] and lines[2]["loss"] is None
  assert stat.S_IMODE(path.stat().st_mode) == 0o644 and os.listdir(tmp_path) == ["m.jsonl"]
