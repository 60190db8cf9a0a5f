"""Hugging Face decoder folders (``config.json`` + safetensors) <-> ``(DecoderConfig, params)``.

Loading reads ``config.json`` (:meth:`DecoderConfig.from_hf`), resolves the tensors of
``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``, checks
the whole folder against the family's table (every tensor present, with the shape the
config implies, nothing unexplained) before reading anything, then reads the tensors one
at a time with :func:`lowrank_jax.io.safetensors.read_tensor` straight into the target
dtype and onto the device, so the model is never held twice. :func:`checkpoint_plan`
exposes the per-leaf sources (:class:`LeafSource`, with ``read(dtype, index)`` taking a
slice in *our* layout) for loaders that place each leaf themselves, e.g. one slice per
host.

Saving writes ``config.json`` (:meth:`DecoderConfig.to_hf`) and the tensors under their
Hugging Face names (torch ``[out, in]`` layout; experts one tensor per expert), single or
sharded by ``max_shard_size``; lazy leaves (e.g. LoRA over a base) are materialised one
at a time, which makes a merged checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy
from lowrank_jax import tree as tree_lib
from lowrank_jax.io import hf as hf_io
from lowrank_jax.io import safetensors as st
from lowrank_jax.models import families
from lowrank_jax.models.decoder import DecoderConfig, param_shapes

__all__ = [
  "CONFIG_NAME",
  "LeafSource",
  "read_config",
  "checkpoint_plan",
  "load_pretrained",
  "save_pretrained",
]

PyTree = Any
CONFIG_NAME = "config.json"


def read_config(folder: str | os.PathLike) -> DecoderConfig:
  """The :class:`DecoderConfig` of ``folder/config.json`` (clear errors for a missing
  file, bad JSON or an unsupported ``model_type``)."""
  path = os.path.join(os.fspath(folder), CONFIG_NAME)
  if not os.path.exists(path):
    where = "folder does not exist" if not os.path.isdir(os.fspath(folder)) else "no config.json in it"
    raise FileNotFoundError(f"{path}: {where}; a Hugging Face model folder needs config.json")
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  try:
    return DecoderConfig.from_hf(hf)
  except (ValueError, TypeError, KeyError, NotImplementedError) as e:
    raise type(e)(f"{path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class LeafSource:
  """Where one parameter leaf is stored: its :class:`~lowrank_jax.models.families.TensorEntry`
  and the file of each of its tensors."""
  entry: families.TensorEntry
  files: tuple[str, ...]
  stored_dtype: np.dtype

  @property
  def path(self) -> str:
    return self.entry.path

  @property
  def shape(self) -> tuple[int, ...]:
    return self.entry.shape

  def read(self, dtype=None, index: Optional[Sequence[slice]] = None) -> np.ndarray:
    """The leaf (or the slice ``index`` of it, in our ``[in, out]`` / ``[E, in, out]``
    layout) as a numpy array of ``dtype`` (``None``: the stored dtype)."""
    e = self.entry
    idx = st.normalize_index(None if index is None else tuple(index), e.shape, e.path)
    if not e.stacked:
      hf_idx = tuple(reversed(idx)) if e.transpose else idx
      arr = st.read_tensor(self.files[0], e.hf[0], dtype, hf_idx)
      return np.ascontiguousarray(arr.T) if e.transpose else arr
    rest = idx[1:]
    hf_idx = tuple(reversed(rest)) if e.transpose else rest
    experts = range(idx[0].start, idx[0].stop)
    out = np.empty((len(experts),) + tuple(s.stop - s.start for s in rest),
                   self.stored_dtype if dtype is None else np.dtype(dtype))
    for j, x in enumerate(experts):
      arr = st.read_tensor(self.files[x], e.hf[x], dtype, hf_idx)
      out[j] = arr.T if e.transpose else arr
    return out


def checkpoint_plan(folder: str | os.PathLike) -> tuple[DecoderConfig, list[LeafSource]]:
  """``(config, sources)`` of a folder after checking every tensor against the family's
  table: missing tensors, shape mismatches and unexplained tensors raise, naming the file
  and the tensor. Nothing is read but headers."""
  folder = os.fspath(folder)
  config = read_config(folder)
  files = st.checkpoint_files(folder)
  fam = families.get(config.family)
  table = families.tensor_table(config, param_shapes(config))
  ignore = [rx for rx in fam.ignore]
  if config.tie_word_embeddings:
    ignore.append(r"^lm_head\.weight$")
  expected = set()
  sources = []
  for entry in table:
    want = entry.hf_shape()
    paths, dtypes = [], set()
    for name in entry.hf:
      expected.add(name)
      if name not in files:
        raise KeyError(f"{folder}: tensor {name!r} (our {entry.path!r}) is missing from the checkpoint "
                       f"files {sorted(set(files.values()))}")
      info = st.tensor_infos(files[name])[name]
      if info.shape != want:
        raise ValueError(f"{files[name]}: tensor {name!r} has shape {list(info.shape)}, but config.json "
                         f"({config.family}) implies {list(want)} for {entry.path!r}")
      paths.append(files[name])
      dtypes.add(info.dtype)
    if len(dtypes) > 1:
      raise ValueError(f"{folder}: the experts of {entry.path!r} are stored in different dtypes {dtypes}")
    sources.append(LeafSource(entry, tuple(paths), dtypes.pop()))
  extra = sorted(n for n in files if n not in expected and not any(re.search(rx, n) for rx in ignore))
  if extra:
    raise ValueError(f"{folder}: tensors {extra[:6]}{' ...' if len(extra) > 6 else ''} (in "
                     f"{sorted({os.path.basename(files[n]) for n in extra})}) are not parameters of a "
                     f"{config.family} model with this config.json")
  return config, sources


def load_pretrained(folder: str | os.PathLike, *, dtype=None,
                    place: Optional[Callable[[str, np.ndarray], Any]] = None
                    ) -> tuple[DecoderConfig, PyTree]:
  """``(config, params)`` of a Hugging Face decoder folder.

  Args:
    folder: holds ``config.json`` and ``model.safetensors`` or
      ``model.safetensors.index.json`` + shards (float32, bfloat16, float16...).
    dtype: dtype of every parameter (e.g. ``jnp.bfloat16``); ``None`` keeps each
      tensor's stored dtype.
    place: ``(path, numpy leaf) -> leaf``, called once per leaf right after it is read
      (default: ``jnp.asarray``, onto the default device).

  Returns:
    The :class:`DecoderConfig` and the nested parameter dict (layout of
    :mod:`lowrank_jax.models.decoder`).
  """
  config, sources = checkpoint_plan(folder)
  flat = {}
  for src in sources:
    arr = src.read(dtype)
    flat[src.path] = jnp.asarray(arr) if place is None else place(src.path, arr)
  return config, hf_io.unflatten(flat)


def _hf_dtype_name(dt) -> str:
  return {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(np.dtype(dt).name,
                                                                                 np.dtype(dt).name)


def save_pretrained(folder: Optional[str | os.PathLike], config: DecoderConfig, params: PyTree, *, dtype=None,
                    max_shard_size: Optional[int | str] = None,
                    fetch: Optional[Callable[[str], Optional[np.ndarray]]] = None) -> list[str]:
  """Writes ``config.json`` and the weights as a folder ``transformers`` loads
  (``AutoModelForCausalLM.from_pretrained``) and :func:`load_pretrained` reads back.

  Each leaf is fetched once, in the order of the family's tensor table, converted and
  written, and released before the next one is fetched: the host holds one leaf (and the
  tensor being written) at a time.

  Args:
    folder: created if needed; files of an earlier save (``model*.safetensors``, the
      index) are replaced, other files (tokenizer...) are kept. ``None``: nothing is
      written, every leaf is only fetched, in the same order (the other processes of a
      multi-process export, whose ``fetch`` runs the same collectives as process 0's).
    config: the model's :class:`DecoderConfig`.
    params: the parameter tree; lazy leaves are materialised one at a time. Leaves
      outside the architecture (adapters, prefixes) are an error: merge them first.
      With ``fetch``, only each leaf's ``shape`` and ``dtype`` are read (e.g.
      ``jax.ShapeDtypeStruct``).
    dtype: stored dtype of every tensor (``None``: each leaf's own).
    max_shard_size: bytes or ``"2GB"``-style; larger checkpoints are sharded with a
      ``model.safetensors.index.json``.
    fetch: ``path -> numpy array`` of the leaf at ``path`` (default: the leaf of
      ``params``, materialised and copied to the host); a streamed merged export
      (:func:`lowrank_jax.trainer.export.export_merged`) merges and gathers the leaf here.
      It may return ``None`` when ``folder`` is ``None``.

  Returns:
    The file names written (``[]`` when ``folder`` is ``None``).
  """
  shapes = param_shapes(config)
  leaves = dict(tree_lib.flatten_with_paths(params))
  missing = sorted(set(shapes) - set(leaves))
  extra = sorted(set(leaves) - set(shapes))
  if missing or extra:
    raise ValueError(f"params do not match a {config.family} model with this config: missing {missing[:6]}, "
                     f"not storable {extra[:6]} (merge adapters / drop model-owned slots first)")
  for path, shape in shapes.items():
    if tuple(leaves[path].shape) != shape:
      raise ValueError(f"params: {path!r} has shape {tuple(leaves[path].shape)}, the config implies {shape}")
  table = families.tensor_table(config, shapes)
  if fetch is None:
    fetch = lambda path: np.asarray(jax.device_get(lazy.materialize(leaves[path])))
  if folder is None:  # the same fetches in the same order (the writer keeps the table's order)
    for entry in table:
      fetch(entry.path)
    return []
  folder = os.fspath(folder)
  sources = []
  cache: dict[str, np.ndarray] = {}

  def dense(path):  # the last fetched leaf, kept for the experts of a 3-d leaf
    if path not in cache:
      cache.clear()  # released before the next leaf is fetched
      cache[path] = np.asarray(fetch(path))
    return cache[path]

  for entry in table:
    leaf_dtype = np.dtype(leaves[entry.path].dtype if dtype is None else dtype)
    for e, name in enumerate(entry.hf):
      def produce(entry=entry, e=e):
        arr = dense(entry.path)
        arr = arr[e] if entry.stacked else arr
        return arr.T if entry.transpose else arr
      sources.append(st.TensorSource(name, entry.hf_shape(), leaf_dtype, produce))
  hf = config.to_hf()
  float_dtypes = {s.dtype for s in sources if np.issubdtype(s.dtype, np.floating) or s.dtype.name == "bfloat16"}
  if len(float_dtypes) == 1:
    hf["dtype"] = hf["torch_dtype"] = _hf_dtype_name(float_dtypes.pop())
  os.makedirs(folder, exist_ok=True)
  for name in os.listdir(folder):
    if (name.startswith("model") and name.endswith(".safetensors")) or name == st.INDEX_FILE:
      os.remove(os.path.join(folder, name))
  written = st.write_sharded(folder, sources, max_shard_size=max_shard_size, metadata={"format": "pt"})
  st.write_json(os.path.join(folder, CONFIG_NAME), hf)
  return written + [CONFIG_NAME]
