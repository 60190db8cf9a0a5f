"""Output files written atomically: a temporary file in the same folder, then ``os.replace``.

A reader (or a run killed at any moment) sees the old file or the new one, never a part;
files are mode 0644 (``mkstemp`` would leave 0600) and a failed write removes its
temporary. JSON is strict: non-finite floats become ``null`` (:func:`json_safe`) and
``json.dumps(allow_nan=False)`` guards the rest, so no bare ``NaN`` ever reaches a file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Iterator

import numpy as np

__all__ = ["atomic_path", "write_text", "write_json", "json_safe", "dumps", "append_jsonl",
           "rewrite_jsonl"]

MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside ``path``; on success it becomes ``path`` (mode 0644),
  on an exception it is removed. ``suffix`` keeps an extension writers may need (``.png``)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, MODE)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  """``text`` to ``path`` atomically (flushed to disk before the rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def json_safe(value: Any) -> Any:
  """``value`` as strict JSON data: non-finite floats -> ``None``, numpy scalars and arrays
  -> Python numbers and lists, tuples -> lists."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  if isinstance(value, (np.floating, float)):
    v = float(value)
    return v if math.isfinite(v) else None
  if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a jax scalar
    return json_safe(value.item())
  return value


def dumps(value: Any, indent: int | None = 1) -> str:
  """Strict JSON text of :func:`json_safe` ``(value)``."""
  return json.dumps(json_safe(value), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Strict JSON to ``path`` atomically."""
  write_text(path, dumps(value) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
  """Appends one strict JSON line (an append of one short line is a single ``write``)."""
  line = dumps(record, indent=None) + "\n"
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, MODE)
  try:
    os.write(fd, line.encode("utf-8"))
  finally:
    os.close(fd)


def rewrite_jsonl(path: str | os.PathLike, keep) -> int:
  """Rewrites a JSON-lines file atomically with the records ``keep(record)`` accepts (a
  torn last line, from a kill mid-write, is dropped); returns how many were kept."""
  path = pathlib.Path(path)
  if not path.exists():
    return 0
  kept = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if keep(record):
      kept.append(line)
  write_text(path, "".join(line + "\n" for line in kept))
  return len(kept)
