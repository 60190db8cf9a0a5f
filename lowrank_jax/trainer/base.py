"""The frozen base of a run, referenced by path and content hash (never stored in checkpoints).

A checkpoint records ``{"path", "sha256"}`` of the base it was trained on; a resumed run
recomputes them and refuses to continue on a different base. The hash covers the files
that hold the weights (``config.json``, ``*.safetensors`` and their index, in name order)
for a Hugging Face folder, and the arrays themselves (path, dtype, shape, bytes of every
leaf) for a randomly initialised model.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import jax
import numpy as np

from lowrank_jax import tree as tree_lib

__all__ = ["ResumeError", "folder_hash", "tree_hash", "folder_ref", "tree_ref", "check_same_base"]


class ResumeError(ValueError):
  """A checkpoint that the run cannot continue from (another config, another base)."""

_CHUNK = 1 << 22


def folder_hash(folder: str | os.PathLike) -> str:
  """SHA-256 over ``config.json`` and the safetensors files (and index) of a model folder."""
  folder = pathlib.Path(folder)
  files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.name.endswith(".safetensors")
                 or p.name.endswith(".safetensors.index.json"))
  if not files:
    raise FileNotFoundError(f"{folder}: no config.json or *.safetensors to identify the base model by")
  digest = hashlib.sha256()
  for p in files:
    digest.update(p.name.encode() + b"\0")
    with open(p, "rb") as f:
      while chunk := f.read(_CHUNK):
        digest.update(chunk)
  return digest.hexdigest()


def tree_hash(tree: Any) -> str:
  """SHA-256 over the path, dtype, shape and bytes of every leaf of a parameter tree."""
  digest = hashlib.sha256()
  for path, leaf in tree_lib.flatten_with_paths(tree):
    a = np.asarray(jax.device_get(leaf))
    digest.update(f"{path}\0{a.dtype.str}\0{a.shape}\0".encode())
    digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()


def folder_ref(folder: str | os.PathLike) -> dict:
  return {"path": os.path.abspath(os.fspath(folder)), "sha256": folder_hash(folder)}


def tree_ref(description: str, tree: Any) -> dict:
  return {"path": description, "sha256": tree_hash(tree)}


def check_same_base(saved: dict, current: dict, checkpoint: str) -> None:
  """Raises :class:`ResumeError` naming the base when ``current`` is not the base ``saved`` names."""
  if saved.get("sha256") != current["sha256"]:
    raise ResumeError(
        f"the frozen base changed since checkpoint {checkpoint}: it was trained on {saved.get('path')} "
        f"(sha256 {saved.get('sha256')}), the config now loads {current['path']} (sha256 "
        f"{current['sha256']}); restore that base or start the run afresh (without --resume)")
