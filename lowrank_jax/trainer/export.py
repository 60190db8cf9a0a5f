"""What a finished run leaves for other tools: the adapter as a PEFT folder and, on request,
the merged model as a Hugging Face folder.

The PEFT folder goes through :func:`lowrank_jax.interop.peft.save_peft_adapter` (LoRA, DoRA
and per-expert LoRA chains of one method with ``bias="none"`` and a base that stays the pretrained one,
i.e. not PiSSA/OLoRA-initialised); other chains are skipped with a note saying why. The
merged folder is written by the task's ``save_merged`` into a temporary folder beside the
target and renamed into place.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax import lazy
from lowrank_jax import tree as tree_lib
from lowrank_jax.interop import peft
from lowrank_jax.io import safetensors as st
from lowrank_jax.reparam import Reparam, merge
from lowrank_jax.trainer.config import RunConfig
from lowrank_jax.trainer.processes import is_primary
from lowrank_jax.trainer.setup import Setup
from lowrank_jax.trainer.tasks import Problem

__all__ = ["peft_exportable", "export_peft", "merged_leaves", "write_merged", "export_merged"]

PyTree = Any


def peft_exportable(config: RunConfig) -> Optional[str]:
  """``None`` when the method chain has a PEFT adapter layout here, else the reason it has not."""
  names = config.method_names
  if len(names) != 1:
    return f"PEFT export needs exactly one method, the chain has {list(names) or 'none'}"
  m = config.methods[0]
  if m.method_name not in ("lora", "dora", "batched_lora"):
    return f"PEFT export of {m.method_name!r} is not supported (LoRA, DoRA and batched LoRA are)"
  if getattr(m, "bias", "none") != "none":
    return f"PEFT export of LoRA with bias={m.bias!r} is not supported"
  if getattr(m, "init", "kaiming") in ("pissa", "olora"):
    return f"init={m.init!r} rewrites the base weights; the adapter alone is not the model"
  return None


def export_peft(folder: pathlib.Path, config: RunConfig, setup: Setup, phi: PyTree, problem: Problem) -> Optional[str]:
  """Writes the adapter to ``folder``; returns ``None`` or the reason it was skipped."""
  why = peft_exportable(config)
  if why is not None:
    return why
  (index, m), = setup.method_parts
  peft.save_peft_adapter(folder, phi[index], rank=m.rank, alpha=m.alpha if m.alpha is not None else m.rank,
                         use_rslora=bool(getattr(m, "rslora", False)), path_to_module=problem.path_to_module,
                         base_model_name_or_path=problem.base["path"], overwrite=True)
  _readable(folder)
  return None


def _readable(folder) -> None:
  """Folders 0755, files 0644 (temporary folders are created 0700)."""
  for root, _, names in os.walk(folder):
    os.chmod(root, 0o755)
    for n in names:
      os.chmod(os.path.join(root, n), 0o644)


def merged_leaves(reparam: Reparam, theta0: PyTree, phi: PyTree, *, mesh: Optional[Mesh] = None,
                  dtype=None) -> tuple[PyTree, Callable[[str], Optional[np.ndarray]]]:
  """The merged model ``materialize(apply(theta0, phi))`` one leaf at a time.

  ``fetch(path)`` compiles and runs a program that returns the one merged leaf at
  ``path`` (cast to ``dtype``): it computes ``apply(theta0, phi)`` and XLA drops every
  other leaf, so the device holds one extra leaf (an NF4 base is dequantised only for
  that leaf, a low-rank update formed only for it). On a mesh the program's output is
  replicated (``out_shardings`` of :func:`jax.jit`: the leaf is all-gathered on the
  devices, no host collective) and only process 0 copies it to the host; the other
  processes get ``None``. Gathering to process 0's devices alone has no cheap public
  API (a program's outputs live on its mesh), so every device holds the leaf briefly.

  Every process must call ``fetch`` for the same paths in the same order (each call is
  a collective across processes).

  Args:
    reparam, theta0, phi: the trained model (``theta0`` and ``phi`` placed as in training).
    mesh: the device mesh of the run, or ``None`` (one device).
    dtype: the dtype of the merged leaves (``None``: each leaf's own).

  Returns:
    ``(abstract, fetch)``: the merged tree as ``jax.ShapeDtypeStruct`` leaves (lazy
    weights as their dense shape and dtype) and ``fetch(path) -> numpy array or None``.
  """
  abstract = jax.eval_shape(lambda t, p: merge(reparam, t, p), theta0, phi)
  if dtype is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)), abstract)
  paths = set(tree_lib.leaf_paths(abstract))
  out = None if mesh is None else NamedSharding(mesh, P())

  def fetch(path: str) -> Optional[np.ndarray]:
    if path not in paths:
      raise KeyError(f"merged_leaves: no leaf {path!r} in the merged model (e.g. {sorted(paths)[:4]})")
    program = jax.jit(functools.partial(_merged_leaf, reparam, path, dtype), out_shardings=out)
    leaf = program(theta0, phi)
    if not is_primary():
      leaf.block_until_ready()  # keep the processes in step; nothing comes to this host
      return None
    return np.asarray(leaf if mesh is None else leaf.addressable_data(0))

  return abstract, fetch


def _merged_leaf(reparam: Reparam, path: str, dtype, theta0: PyTree, phi: PyTree) -> jax.Array:
  leaf = dict(tree_lib.flatten_with_paths(reparam.apply(theta0, phi)))[path]
  w = lazy.materialize(leaf)
  return w if dtype is None else w.astype(dtype)


SaveMerged = Callable[..., Any]  # (folder or None, abstract merged tree, dtype, fetch=...) -> ...


def write_merged(folder: pathlib.Path, save: SaveMerged, reparam: Reparam, theta0: PyTree, phi: PyTree, *,
                 mesh: Optional[Mesh] = None, dtype=None) -> None:
  """Streams the merged model into ``folder`` with ``save`` (every process calls it).

  ``save(folder, abstract, dtype, fetch=fetch)`` writes a model folder fetching each
  leaf with ``fetch`` (:func:`merged_leaves`) once, e.g. :func:`lowrank_jax.models.hf_decoder.save_pretrained`;
  on processes other than 0 it is called with ``folder=None`` and must fetch the same
  leaves in the same order without writing. Process 0 writes into a temporary folder
  beside ``folder`` (files 0644) and renames it into place, replacing an older one.
  No process holds more than about one merged leaf on its host, nor on its devices
  beyond the trained model.
  """
  abstract, fetch = merged_leaves(reparam, theta0, phi, mesh=mesh, dtype=dtype)
  if not is_primary():
    save(None, abstract, dtype, fetch=fetch)
    return
  folder = pathlib.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{folder.name}.tmp_", dir=folder.parent)
  try:
    save(tmp, abstract, dtype, fetch=fetch)
    _readable(tmp)
    st.replace_folder(tmp, str(folder))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def export_merged(folder: pathlib.Path, config: RunConfig, setup: Setup, phi: PyTree, problem: Problem) -> None:
  """The merged model (``theta0`` + the trained methods) as a Hugging Face folder, streamed
  leaf by leaf (:func:`write_merged`; every process calls it, process 0 writes)."""
  if problem.save_merged is None:
    raise ValueError(f"{config.name}: the {config.task} task cannot write a merged model folder")
  dtype = jnp.dtype(config.export.merged_dtype) if config.export.merged_dtype else None
  write_merged(folder, problem.save_merged, setup.reparam, setup.theta0, phi,
               mesh=problem.placement.mesh, dtype=dtype)
