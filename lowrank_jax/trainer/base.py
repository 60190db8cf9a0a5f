"""The frozen base of a run, referenced by path and content fingerprint (never stored in checkpoints).

A checkpoint records ``{"path", "sha256"}`` of the base it was trained on; a resumed run
recomputes the fingerprint and refuses to continue on a different base.

For a Hugging Face folder the fingerprint covers the files that hold the weights
(``config.json``, ``*.safetensors`` and their index): ``"files-sha256:<hex>"``, the
SHA-256 over each file's name, size and own SHA-256, in name order. A file's SHA-256 is
never computed twice on a run and usually never read at all:

* a file of Hugging Face's cache is a symlink ``snapshots/<rev>/<name>`` ->
  ``blobs/<sha256>``: the blob's name *is* the SHA-256 of its content (huggingface_hub
  checks it on download), so the file is not read (its size is still checked);
* any other file is read once, by process 0 alone, which broadcasts the digest to the
  other processes (:func:`shared_folder_hash`).

So every byte of every tensor is covered (a changed value changes the digest), at the
cost of one read of the files on one process, or none.

Checkpoints written before this fingerprint hold the bare hex SHA-256 of the concatenated
files (``"legacy"``, :func:`legacy_folder_hash`); :func:`check_same_base` recomputes that
kind for them (one full read, on process 0), so an old run resumes on its unchanged base.
For a randomly initialised model the hash covers the arrays themselves (path, dtype,
shape, bytes of every leaf).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lowrank_jax import tree as tree_lib

__all__ = ["ResumeError", "folder_hash", "legacy_folder_hash", "shared_folder_hash", "hash_kind",
           "file_sha256", "tree_hash", "folder_ref", "tree_ref", "check_same_base", "same_folder"]

FILES_KIND = "files-sha256"
_CHUNK = 1 << 22
_BLOB = re.compile(r"^[0-9a-f]{64}$")


class ResumeError(ValueError):
  """A checkpoint that the run cannot continue from (another config, another base)."""


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.name.endswith(".safetensors")
                 or p.name.endswith(".safetensors.index.json"))
  if not files:
    raise FileNotFoundError(f"{folder}: no config.json or *.safetensors to identify the base model by")
  return files


def _read_into(digest, path: pathlib.Path) -> int:
  n = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
      n += len(chunk)
  return n


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
  """``(SHA-256 hex of the file's content, bytes read)``: a symlink into a Hugging Face
  cache's ``blobs/<sha256>`` is named by its SHA-256 and not read (0 bytes)."""
  path = pathlib.Path(path)
  target = pathlib.Path(os.path.realpath(path))
  if path.is_symlink() and target.parent.name == "blobs" and _BLOB.match(target.name):
    return target.name, 0
  digest = hashlib.sha256()
  read = _read_into(digest, path)
  return digest.hexdigest(), read


def _folder_digest(folder: str | os.PathLike) -> tuple[str, int]:
  """``(files-sha256 fingerprint, bytes read)`` of a model folder (module docstring)."""
  digest = hashlib.sha256()
  read = 0
  for p in _weight_files(pathlib.Path(folder)):
    sha, n = file_sha256(p)
    read += n
    digest.update(f"{p.name}\0{p.stat().st_size}\0{sha}\n".encode())
  return f"{FILES_KIND}:{digest.hexdigest()}", read


def folder_hash(folder: str | os.PathLike) -> str:
  """The ``files-sha256:<hex>`` fingerprint of a model folder, computed in this process."""
  return _folder_digest(folder)[0]


def legacy_folder_hash(folder: str | os.PathLike) -> str:
  """The fingerprint of checkpoints written before ``files-sha256``: SHA-256 (hex) over
  ``config.json`` and the safetensors files (and index), each name then its bytes."""
  digest = hashlib.sha256()
  for p in _weight_files(pathlib.Path(folder)):
    digest.update(p.name.encode() + b"\0")
    _read_into(digest, p)
  return digest.hexdigest()


def hash_kind(value: Optional[str]) -> str:
  """``"files-sha256"`` or ``"legacy"`` (a bare hex digest) of a recorded fingerprint."""
  return FILES_KIND if isinstance(value, str) and value.startswith(FILES_KIND + ":") else "legacy"


def _legacy_digest(folder: str | os.PathLike) -> tuple[str, int]:
  return legacy_folder_hash(folder), sum(p.stat().st_size for p in _weight_files(pathlib.Path(folder)))


def _compute(folder: str | os.PathLike, kind: str) -> tuple[str, int]:
  """``(fingerprint of kind, bytes read)`` of a folder, in this process."""
  return (_folder_digest if kind == FILES_KIND else _legacy_digest)(folder)


def shared_folder_hash(folder: str | os.PathLike, kind: str = FILES_KIND) -> tuple[str, int]:
  """``(fingerprint of kind, bytes this process read)``: with many processes only process 0
  computes it and broadcasts it (every process calls this; the others read nothing)."""
  if jax.process_count() == 1:
    return _compute(folder, kind)
  _weight_files(pathlib.Path(folder))  # a missing folder raises on every process, not on 0 alone
  value, read = _compute(folder, kind) if jax.process_index() == 0 else ("", 0)
  raw = np.zeros(128, np.uint8)
  raw[:len(value)] = np.frombuffer(value.encode(), np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(raw))
  return bytes(got[got != 0].astype(np.uint8)).decode(), read


def tree_hash(tree: Any) -> str:
  """SHA-256 over the path, dtype, shape and bytes of every leaf of a parameter tree."""
  digest = hashlib.sha256()
  for path, leaf in tree_lib.flatten_with_paths(tree):
    a = np.asarray(jax.device_get(leaf))
    digest.update(f"{path}\0{a.dtype.str}\0{a.shape}\0".encode())
    digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()


def folder_ref(folder: str | os.PathLike) -> dict:
  """``{"path", "sha256"}`` of a model folder (every process calls it; process 0 reads)."""
  return {"path": os.path.abspath(os.fspath(folder)), "sha256": shared_folder_hash(folder)[0]}


def tree_ref(description: str, tree: Any) -> dict:
  return {"path": description, "sha256": tree_hash(tree)}


def same_folder(saved: dict, folder: str | os.PathLike) -> bool:
  """Whether ``folder`` holds the base ``saved`` names, computed in this process in the
  fingerprint's recorded kind (the command's own process, before any training process)."""
  return _compute(folder, hash_kind(saved.get("sha256")))[0] == saved.get("sha256")


def check_same_base(saved: dict, current: dict, checkpoint: str) -> None:
  """Raises :class:`ResumeError` naming the base when ``current`` is not the base ``saved`` names.

  A checkpoint that recorded another kind of fingerprint (``"legacy"``: written before
  ``files-sha256``) is compared in its kind: the current folder is hashed that way (by
  process 0, broadcast; every process calls this)."""
  now = current["sha256"]
  kind = hash_kind(saved.get("sha256"))
  if kind != hash_kind(now) and os.path.isdir(current["path"]):
    now = shared_folder_hash(current["path"], kind)[0]
  if saved.get("sha256") != now:
    raise ResumeError(
        f"the frozen base changed since checkpoint {checkpoint}: it was trained on {saved.get('path')} "
        f"(sha256 {saved.get('sha256')}), the config now loads {current['path']} (sha256 "
        f"{now}); restore that base or start the run afresh (without --resume)")
