"""The base's fingerprint (trainer.base): every byte of every tensor counts, Hugging Face
cache blobs are not read (their name is their SHA-256), old checkpoints' legacy hashes still
resume, and the command's own process pins JAX to the CPU through public APIs."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lowrank_jax.io import safetensors as st
from lowrank_jax.trainer import base as base_lib
from tests.trainer.conftest import ROOT


def _folder(path, value: float = 0.5):
  path.mkdir()
  (path / "config.json").write_text('{"model_type": "llama"}')
  st.save_file({"a": np.full((4, 8), value, np.float32), "b": np.arange(6, dtype=np.float32)},
               path / "model.safetensors")
  return path


def test_a_changed_tensor_byte_changes_the_fingerprint(tmp_path):
  folder = _folder(tmp_path / "m")
  digest, read = base_lib.shared_folder_hash(folder)
  size = sum(os.path.getsize(folder / n) for n in ("config.json", "model.safetensors"))
  assert digest == base_lib.folder_hash(folder) and digest.startswith("files-sha256:") and read == size
  data = bytearray((folder / "model.safetensors").read_bytes())
  data[-1] ^= 0x01  # the last byte of the last tensor's value: same header, same size
  (folder / "model.safetensors").write_bytes(bytes(data))
  assert base_lib.folder_hash(folder) != digest
  # a file added next to the weights (a shard) is covered too
  data[-1] ^= 0x01
  (folder / "model.safetensors").write_bytes(bytes(data))
  assert base_lib.folder_hash(folder) == digest
  st.save_file({"c": np.zeros(2, np.float32)}, folder / "extra.safetensors")
  assert base_lib.folder_hash(folder) != digest


def _hf_cache(tmp_path, plain):
  """``plain``'s files as a Hugging Face cache snapshot: symlinks into ``blobs/`` (safetensors
  named by their SHA-256, config.json by a 40-hex git blob id, as the hub stores them)."""
  blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
  blobs.mkdir(parents=True)
  snap.mkdir(parents=True)
  for p in plain.iterdir():
    data = p.read_bytes()
    name = hashlib.sha256(data).hexdigest() if p.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
    (blobs / name).write_bytes(data)
    os.symlink(os.path.relpath(blobs / name, snap), snap / p.name)
  return snap


def test_hugging_face_cache_blobs_are_named_not_read(tmp_path):
  plain = _folder(tmp_path / "m")
  snap = _hf_cache(tmp_path, plain)
  digest, read = base_lib.shared_folder_hash(snap)
  assert digest == base_lib.folder_hash(plain)  # the same fingerprint as reading the bytes
  assert read == os.path.getsize(plain / "config.json")  # only the small non-LFS file was read
  # proof that the weights were not read: a blob whose bytes no longer match its name (same size)
  blob = os.path.realpath(snap / "model.safetensors")
  data = bytearray(open(blob, "rb").read())
  data[-1] ^= 0x01
  open(blob, "wb").write(bytes(data))
  assert base_lib.shared_folder_hash(snap) == (digest, read)


def test_legacy_fingerprints_still_resume_and_still_refuse(tmp_path):
  folder = _folder(tmp_path / "m")
  old = {"path": str(folder), "sha256": base_lib.legacy_folder_hash(folder)}  # a checkpoint from before
  assert base_lib.hash_kind(old["sha256"]) == "legacy"
  current = base_lib.folder_ref(folder)
  assert base_lib.hash_kind(current["sha256"]) == "files-sha256"
  base_lib.check_same_base(old, current, "ckpt")  # compared in the legacy kind: not refused
  assert base_lib.same_folder(old, folder) and base_lib.same_folder(current, folder)
  shutil.rmtree(folder)
  _folder(folder, value=0.25)
  for saved in (old, current):
    assert not base_lib.same_folder(saved, folder)
    with pytest.raises(base_lib.ResumeError, match="the frozen base changed since checkpoint ckpt"):
      base_lib.check_same_base(saved, base_lib.folder_ref(folder), "ckpt")


def test_the_command_pins_jax_to_the_cpu_before_any_backend():
  """``JAX_PLATFORMS=tpu`` (no TPU here: initialising it would fail) in the command's own
  process: the pin wins, so that process never starts an accelerator backend."""
  code = ("import jax; from lowrank_jax.trainer import cli; cli._pin_to_cpu(); "
          "print(jax.config.jax_platforms, jax.devices()[0].platform)")
  env = {**os.environ, "JAX_PLATFORMS": "tpu", "PYTHONPATH": str(ROOT)}
  got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert got.returncode == 0 and got.stdout.split() == ["cpu", "cpu"], got.stderr[-2000:]
  bad = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0  # the check can fail: without the pin the tpu backend is tried
