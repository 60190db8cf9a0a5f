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
import jax.extend.core as jex_core
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
    return "PEFT export needs exactly one method with an adapter; the run has none (it trains only the task's head)"
  if all(n == "full" for n in names):
    return f"PEFT export: the chain {list(names)} has no adapter (full fine-tuning: export the merged model)"
  return None


def _addressable(tree: PyTree) -> bool:
  return all(x.is_fully_addressable for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def _shapes(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree, is_leaf=lazy.is_lazy)


def _initial_factors(setup: Setup, initial_phi: PyTree) -> tuple[bool, Optional[PyTree]]:
  """``(rewrote, factors)``: whether a method's initialisation rewrote the base (PiSSA /
  OLoRA) and then its initial parameters (LoRA factors, biases left out) on this host
  (from ``initial_phi``, else ``setup.phi``), or ``None`` when they span processes."""
  initial_phi = setup.phi if initial_phi is None else initial_phi
  for i, m in setup.method_parts:
    if getattr(m, "init", None) in ("pissa", "olora"):
      p = initial_phi[i]
      p = p[0] if getattr(m, "bias", "none") != "none" else p  # (lora, biases)
      return True, (jax.device_get(p) if _addressable(p) else None)
  return False, None


def export_peft(folder: pathlib.Path, config: RunConfig, setup: Setup, phi: PyTree, problem: Problem, *,
                initial_phi: PyTree = None) -> Optional[str]:
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
  factors span processes and were not given); its message is returned and nothing is
  written.

  Called by process 0 alone with ``phi`` on its host (no collective here); ``initial_phi``:
  ``setup.phi`` gathered to this host (``Placement.to_host``) when it spans processes
  (default: ``setup.phi`` itself).
  """
  why = peft_exportable(config)
  if why is not None:
    return why
  index = [i for i, _ in setup.method_parts]
  parts = [registry.build_from(m) for _, m in setup.method_parts]
  one = len(parts) == 1
  reparam = parts[0] if one else chain(*parts)
  adapter = phi[index[0]] if one else tuple(phi[i] for i in index)
  rewrote, initial = _initial_factors(setup, initial_phi)
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

  The merge is traced once (:func:`jax.make_jaxpr`: one program with every merged leaf,
  cast to ``dtype``, as an output). ``fetch(path)`` keeps of it only the equations that
  leaf needs (dead-code elimination on the jaxpr) and compiles and runs that: the devices
  compute one merged leaf from that leaf's parts of ``theta0`` and ``phi`` (an NF4 base
  dequantised, a low-rank update formed, for that leaf alone), so they hold one leaf
  beyond the trained model. On a mesh the program's output is replicated (``out_shardings``
  of :func:`jax.jit`: the leaf is all-gathered over the devices, no host collective) and
  only process 0 copies it to its host; the other processes get ``None``. Gathering to
  process 0's devices alone has no cheap public API (a program's outputs live on its
  whole mesh), so every device holds the one leaf briefly.

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
  def merged(t, p):
    tree = merge(reparam, t, p)
    return tree if dtype is None else jax.tree.map(lambda w: w.astype(dtype), tree)

  closed, abstract = jax.make_jaxpr(merged, return_shape=True)(theta0, phi)
  index = {path: i for i, path in enumerate(tree_lib.leaf_paths(abstract))}
  args = jax.tree.leaves((theta0, phi))
  out = None if mesh is None else NamedSharding(mesh, P())
  programs: dict[str, Callable] = {}  # by the program's text: the layers' alike leaves compile once

  def fetch(path: str) -> Optional[np.ndarray]:
    if path not in index:
      raise KeyError(f"merged_leaves: no leaf {path!r} in the merged model (e.g. {sorted(index)[:4]})")
    one, used = _one_output(closed, index[path])
    key = str(one)  # (it declares every constant of the trace, so it says which ones it reads)
    if key not in programs:
      fn = jex_core.jaxpr_as_fun(one)
      programs[key] = jax.jit(lambda *xs, fn=fn: fn(*xs)[0], out_shardings=out)
    leaf = programs[key](*(args[k] for k in used))
    if not is_primary():
      leaf.block_until_ready()  # keep the processes in step; nothing comes to this host
      return None
    return np.asarray(leaf if mesh is None else leaf.addressable_data(0))

  return abstract, fetch


def _one_output(closed: jex_core.ClosedJaxpr, i: int) -> tuple[jex_core.ClosedJaxpr, list[int]]:
  """``(program, inputs)``: output ``i`` of ``closed`` alone, as a function of the inputs it
  reads (their positions): the equations it does not need are dropped (dead-code
  elimination, a backward pass over the equations)."""
  jaxpr = closed.jaxpr
  target = jaxpr.outvars[i]
  live = {target} if isinstance(target, jex_core.Var) else set()
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  used = [k for k, v in enumerate(jaxpr.invars) if v in live]
  info = jaxpr.debug_info
  if info is not None:
    info = info._replace(arg_names=None if info.arg_names is None else tuple(info.arg_names[k] for k in used),
                         result_paths=None if info.result_paths is None else (info.result_paths[i],))
  one = jaxpr.replace(invars=[jaxpr.invars[k] for k in used], eqns=kept[::-1], outvars=[target], debug_info=info)
  return jex_core.ClosedJaxpr(one, closed.consts), used


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
  e = config.export
  dtype = jnp.dtype(e.merged_dtype) if e.merged_dtype else None
  save = problem.save_merged
  if e.merged_max_shard_size is not None:
    save = functools.partial(save, max_shard_size=e.merged_max_shard_size)
  write_merged(folder, save, setup.reparam, setup.theta0, phi, mesh=problem.placement.mesh, dtype=dtype)
