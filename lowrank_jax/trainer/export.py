"""What a finished run leaves for other tools: the adapter as a PEFT folder and, on request,
the merged model as a Hugging Face folder.

The PEFT folder goes through :func:`lowrank_jax.interop.peft.save_peft_adapter` with the
methods' reparam, whose registry configs say what to write; what peft cannot represent is
skipped with its reason. The merged folder is streamed leaf by leaf (:func:`write_merged`):
each merged leaf is computed on the devices from its own parts of ``theta0`` and ``phi``,
gathered, written by process 0 and released before the next, so no process ever holds
the whole merged model, on its devices or its host.
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
from lowrank_jax.methods import registry
from lowrank_jax.reparam import Reparam, chain, merge
from lowrank_jax.trainer.config import RunConfig
from lowrank_jax.trainer.processes import is_primary
from lowrank_jax.trainer.setup import Setup
from lowrank_jax.trainer.tasks import Problem

__all__ = ["peft_exportable", "export_peft", "merged_leaves", "write_merged", "export_merged"]

PyTree = Any


def peft_exportable(config: RunConfig) -> Optional[str]:
  """``None`` when the run may have a PEFT adapter to write, else the reason it has not (no
  method). What peft cannot represent is known only when :func:`export_peft` tries
  (:func:`lowrank_jax.interop.peft.save_peft_adapter` refuses it, saying why)."""
  names = config.method_names
  if not names:
    return "PEFT export needs a method; the run trains only the task's head"
  if all(n == "full" for n in names):
    return f"PEFT export: the chain {list(names)} has no adapter (full fine-tuning: export the merged model)"
  return None


def _addressable(tree: PyTree) -> bool:
  return all(x.is_fully_addressable for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def _shapes(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree, is_leaf=lazy.is_lazy)


def _initial_factors(setup: Setup) -> tuple[bool, Optional[PyTree]]:
  """``(rewrote, factors)``: whether a method's initialisation rewrote the base (PiSSA /
  OLoRA) and then its initial ``phi`` (LoRA factors, biases left out) on this host, or
  ``None`` when it spans processes."""
  for i, m in setup.method_parts:
    if getattr(m, "init", None) in ("pissa", "olora"):
      p = setup.phi[i]
      p = p[0] if getattr(m, "bias", "none") != "none" else p  # (lora, biases)
      return True, (jax.device_get(p) if _addressable(p) else None)
  return False, None


def export_peft(folder: pathlib.Path, config: RunConfig, setup: Setup, phi: PyTree, problem: Problem) -> Optional[str]:
  """Writes the adapter of the config's methods (the task's head left out) to ``folder``;
  returns ``None`` or the reason it was skipped.

  The methods' reparam (rebuilt by the registry from the run's method configs) carries
  those configs, so :func:`lowrank_jax.interop.peft.save_peft_adapter` writes every
  setting peft has from them: LoRA (rsLoRA, ``bias="all"`` / ``"lora_only"``), DoRA,
  AdaLoRA, LoKr, LoHa, VeRA (its projections drawn for the base's shapes), IA3, batched
  LoRA and LoRA on expert stacks, ``full`` entries chained after the adapter as trained
  biases / ``modules_to_save``; PiSSA / OLoRA adapters are converted to LoRAs of rank
  ``2r`` relative to the base they were initialised from, with their initial factors
  (``setup.phi``: exact, whatever SVD or quantized base made them). What peft cannot
  represent is refused by ``save_peft_adapter`` (``NotImplementedError``), and so is what
  it cannot write from what is here (``ValueError``: e.g. a PiSSA adapter whose initial
  factors span processes); its message is returned and nothing is written.

  Called by process 0 alone with ``phi`` on its host (no collective here).
  """
  why = peft_exportable(config)
  if why is not None:
    return why
  index = [i for i, _ in setup.method_parts]
  parts = [registry.build_from(m) for _, m in setup.method_parts]
  one = len(parts) == 1
  reparam = parts[0] if one else chain(*parts)
  adapter = phi[index[0]] if one else tuple(phi[i] for i in index)
  rewrote, initial = _initial_factors(setup)
  # VeRA's projections need only the base's shapes; without the initial factors of a
  # PiSSA / OLoRA adapter (spread over processes) save_peft_adapter says what it lacks
  theta0 = None if rewrote and initial is None else _shapes(problem.theta0)
  try:
    peft.save_peft_adapter(folder, adapter, reparam=reparam, theta0=theta0,
                           initial_phi=initial, path_to_module=problem.path_to_module,
                           base_model_name_or_path=problem.base["path"], overwrite=True)
  except (NotImplementedError, ValueError) as e:
    return str(e)
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
