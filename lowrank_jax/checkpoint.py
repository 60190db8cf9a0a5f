"""Checkpoints of the trainable state: ``phi``, the optimizer state, the step and metadata.

Saved with Orbax (``orbax-checkpoint``) as one composite checkpoint folder::

    path/state   the arrays, {"phi": ..., "opt_state": ...} as nested dicts (OCDBT)
    path/meta    JSON: step, user metadata, and the path/shape/dtype of every leaf

Only the trainable state is stored; the frozen base ``theta0`` is reloaded from its own
weights. The trees are stored as nested dicts keyed by their pytree key names, so
``None`` holes in ``phi`` (unadapted leaves), optax's ``NamedTuple`` states and empty
states (``optax.EmptyState()``) all round-trip: :func:`restore` rebuilds the caller's
structure from a template (``phi_like``, ``opt_state_like``; arrays or
``jax.ShapeDtypeStruct``) and fails with the offending path, shape and dtype when the
checkpoint does not fit it.

Atomicity: Orbax writes into ``<path>.orbax-checkpoint-tmp-<n>`` next to the target and
renames it to ``path`` only after every file is written (``AtomicRenameTemporaryPath``,
the default on local and POSIX file systems; on GCS it writes a ``commit_success.txt``
marker instead). An interrupted save leaves no folder at ``path``; the tests check
this by failing the final rename. ``overwrite=True`` writes the new checkpoint beside the
old one and swaps the two (Orbax's own ``force=True`` deletes the old one first).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tree as tree_lib

__all__ = ["save", "restore", "read_metadata", "Checkpoint", "FORMAT"]

PyTree = Any
FORMAT = "lowrank_jax.checkpoint/1"
_PARTS = ("phi", "opt_state")


class Checkpoint(NamedTuple):
  """What :func:`restore` returns."""
  phi: PyTree
  opt_state: PyTree
  step: Optional[int]
  metadata: dict


def _items(tree: PyTree) -> list[tuple[tuple[str, ...], Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(tree_lib.key_name(k) for k in p), x) for p, x in leaves]


def _nest(items, part: str) -> dict:
  out: dict = {}
  for keys, x in items:
    if not keys:
      keys = ("_root",)
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise ValueError(f"{part}: two leaves map to the key path '{'/'.join(keys)}'")
    if keys[-1] in node:
      raise ValueError(f"{part}: two leaves map to the key path '{'/'.join(keys)}'")
    node[keys[-1]] = x
  return out


def _lookup(nested: dict, keys: tuple[str, ...]):
  node = nested
  for k in keys or ("_root",):
    if not isinstance(node, dict) or k not in node:
      return None
    node = node[k]
  return node


def _describe(items) -> dict[str, list]:
  return {"/".join(k) or "_root": [list(np.shape(x)), str(np.dtype(getattr(x, "dtype", None)
                                                                  or np.asarray(x).dtype))]
          for k, x in items}


def save(path: str | os.PathLike, phi: PyTree, opt_state: PyTree = None, *,
         step: Optional[int] = None, metadata: Optional[dict] = None, overwrite: bool = False) -> None:
  """Saves ``phi`` (+ ``opt_state``, ``step``, JSON ``metadata``) to the folder ``path``.

  Args:
    path: checkpoint folder (created atomically by Orbax).
    phi: trainable parameters; ``None`` leaves are allowed.
    opt_state: optimizer state (any pytree of arrays, e.g. an optax state).
    step: training step, stored in the JSON metadata.
    metadata: JSON-serialisable user metadata (config, metrics, ...).
    overwrite: replace an existing checkpoint at ``path``.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"checkpoint {path} exists; pass overwrite=True to replace it")
  parts = {"phi": _items(phi), "opt_state": _items(opt_state)}
  state = {name: _nest(items, name) for name, items in parts.items()}
  meta = {"format": FORMAT, "step": None if step is None else int(step),
          "metadata": metadata or {},
          "leaves": {name: _describe(items) for name, items in parts.items()}}
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if not os.path.exists(path):
    ckptr.save(path, args=args)
    return
  # overwrite: Orbax's force=True deletes the old checkpoint before writing the new one;
  # instead write the new one beside it (atomically) and swap, so a crash keeps one intact
  parent, name = os.path.split(path)
  staging = tempfile.mkdtemp(prefix=f".{name}.new_", dir=parent)
  os.rmdir(staging)
  old = staging.replace(".new_", ".old_")
  try:
    ckptr.save(staging, args=args)
    os.replace(path, old)
    os.replace(staging, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(path: str | os.PathLike) -> dict:
  """The JSON part of a checkpoint: ``{"format", "step", "metadata", "leaves"}``."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  meta = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a lowrank_jax checkpoint (format {meta.get('format')!r})")
  return meta


def _fill(part: str, template: PyTree, saved: dict, described: dict) -> PyTree:
  items = _items(template)
  leaves, treedef = jax.tree_util.tree_flatten(template)
  wanted = {"/".join(k) or "_root" for k, _ in items}
  extra = sorted(set(described) - wanted)
  out = []
  for (keys, like), _ in zip(items, leaves):
    name = "/".join(keys) or "_root"
    value = _lookup(saved, keys)
    if value is None or isinstance(value, dict):
      raise ValueError(f"{part}: the checkpoint has no leaf '{name}' (template shape "
                       f"{tuple(np.shape(like))}); it holds: {sorted(described)[:20]}")
    want_shape = tuple(np.shape(like))
    want_dtype = np.dtype(like.dtype) if hasattr(like, "dtype") else np.asarray(like).dtype
    if tuple(value.shape) != want_shape or np.dtype(value.dtype) != want_dtype:
      raise ValueError(f"{part}: leaf '{name}' is {tuple(value.shape)} {np.dtype(value.dtype)} in the "
                       f"checkpoint but {want_shape} {want_dtype} in the template")
    sharding = getattr(like, "sharding", None)
    out.append(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
  if extra:
    raise ValueError(f"{part}: the checkpoint has leaves the template lacks: {extra[:20]}")
  return jax.tree_util.tree_unflatten(treedef, out)


def restore(path: str | os.PathLike, phi_like: PyTree, opt_state_like: PyTree = None) -> Checkpoint:
  """Restores a checkpoint into the structures of ``phi_like`` and ``opt_state_like``.

  Args:
    path: checkpoint folder written by :func:`save`.
    phi_like: a tree with the structure, shapes and dtypes of ``phi`` (arrays or
      ``jax.ShapeDtypeStruct``; ``None`` holes where ``phi`` has them). Leaves with a
      ``sharding`` are placed with it.
    opt_state_like: the same for the optimizer state (e.g. ``optimizer.init(phi)``).

  Returns:
    A :class:`Checkpoint` ``(phi, opt_state, step, metadata)``.

  Raises:
    ValueError: naming the path, shape and dtype of the first leaf that does not match.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  meta = read_metadata(path)
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  if any(meta["leaves"][p] for p in _PARTS):
    state = ckptr.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  else:
    state = {}
  phi = _fill("phi", phi_like, state.get("phi") or {}, meta["leaves"]["phi"])
  opt = _fill("opt_state", opt_state_like, state.get("opt_state") or {}, meta["leaves"]["opt_state"])
  return Checkpoint(phi=phi, opt_state=opt, step=meta["step"], metadata=meta["metadata"])
