"""Checkpoints of the trainable state: ``phi``, the optimizer state, the step and metadata.

Saved with Orbax (``orbax-checkpoint``) as one composite checkpoint folder::

    path/phi         the arrays of phi, nested dicts keyed by pytree key names (OCDBT)
    path/opt_state   the same for the optimizer state (absent when it has no arrays)
    path/meta        JSON: format, step, user metadata, the path/shape/dtype of every leaf

Only the trainable state is stored; the frozen base ``theta0`` is reloaded from its own
weights. The trees are stored as nested dicts keyed by their pytree key names, so
``None`` holes in ``phi`` (unadapted leaves), optax's ``NamedTuple`` states, tuples
(``chain``) and empty states (``optax.EmptyState()``) all round-trip: :func:`restore`
rebuilds the caller's structure from a template (``phi_like``, ``opt_state_like``;
arrays or ``jax.ShapeDtypeStruct``).

Any mesh, device count and process count: :func:`restore` compares the template with
the leaf table in ``meta`` first (a mismatch raises an error listing what the
checkpoint holds and what was asked), then gives Orbax a ``ShapeDtypeStruct`` with the
*target* sharding for every leaf, so each process reads only the slices its devices
need. A checkpoint written on 8 devices as ``P("fsdp", "tensor")`` restores onto 4, 2
or 1 device, replicated, or another process count. ``phi`` restores alone (no
optimizer-state template needed).

Atomicity: Orbax writes into ``<path>.orbax-checkpoint-tmp`` next to the target and
renames it to ``path`` only after every process has written its shards
(``AtomicRenameTemporaryPath``, the default on local and POSIX file systems; on GCS
it writes a ``commit_success.txt`` marker instead). An interrupted save leaves no
folder at ``path``. ``overwrite=True`` writes the new checkpoint beside the old one, in
``.<name>.staging`` (a name every process derives alike), then process 0 swaps the two
(``path -> .<name>.old``, ``staging -> path``, delete ``.old``) between barriers, so a
failed save keeps the old checkpoint (Orbax's own ``force=True`` deletes it first); a
crash between the two renames is completed by the next :func:`save` and named by
:func:`restore`'s error.

Many processes: every process calls :func:`save` / :func:`restore` with the same
arguments (Orbax's collective save); file-system decisions are taken by process 0 and
broadcast, and barriers use ``jax.experimental.multihost_utils.sync_global_devices``.

Paths: a local path is made absolute; a URL (``gs://bucket/run``, any ``scheme://``)
reaches Orbax unchanged. Renames go through ``etils.epath`` (on object stores the
swap is a copy, so ``overwrite=True`` there is not atomic; plain saves are, through
Orbax's commit marker).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowrank_jax import tree as tree_lib, validate

__all__ = ["save", "restore", "read_metadata", "Checkpoint", "FORMAT"]

PyTree = Any
PathLike = Union[str, os.PathLike]
FORMAT = "lowrank_jax.checkpoint/2"
_PARTS = ("phi", "opt_state")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class Checkpoint(NamedTuple):
  """What :func:`restore` returns (use the attributes: ``.phi``, ``.opt_state``, ``.step``,
  ``.metadata``)."""
  phi: PyTree
  opt_state: PyTree
  step: Optional[int]
  metadata: dict


# ----------------------------------------------------------------------------- paths

def _resolve(path: PathLike) -> str:
  """A URL (``scheme://...``) unchanged; a local path made absolute."""
  s = os.fspath(path)
  return s if _URL.match(s) else os.path.abspath(s)


def _epath(path: str) -> epath.Path:
  return epath.Path(path)


def _exists(path: str) -> bool:
  return _epath(path).exists()


def _rmtree(path: str) -> None:
  p = _epath(path)
  if p.exists():
    p.rmtree()


def _rename(src: str, dst: str) -> None:
  _epath(src).rename(dst)


def _sibling(path: str, name: str) -> str:
  """``path``'s parent joined with ``name`` (string form, URL scheme kept)."""
  return str(_epath(path).parent / name)


# ------------------------------------------------------------------------ processes

def _primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  """A barrier across all processes (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"lowrank_jax.checkpoint:{name}")


def _agree(flag: bool) -> bool:
  """Process 0's ``flag``, on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def _ocp():
  """``orbax.checkpoint``, imported on first use: it adds ~0.4 s (after jax) to every
  ``import lowrank_jax`` otherwise."""
  import orbax.checkpoint as ocp
  return ocp


def _checkpointer():
  ocp = _ocp()
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


# ------------------------------------------------------------------------ tree codec

def _items(tree: PyTree) -> list[tuple[tuple[str, ...], Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(tree_lib.key_name(k) for k in p), x) for p, x in leaves]


def _name(keys: tuple[str, ...]) -> str:
  return "/".join(keys) or "_root"


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


def _shape_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
  dtype = getattr(x, "dtype", None)
  return tuple(np.shape(x)), np.dtype(dtype if dtype is not None else np.asarray(x).dtype)


def _describe(items) -> dict[str, list]:
  out = {}
  for keys, x in items:
    shape, dtype = _shape_dtype(x)
    out[_name(keys)] = [list(shape), str(dtype)]
  return out


def _check_json(value, where: str = "metadata") -> None:
  """Raises a ``TypeError`` naming the first key whose value JSON cannot store."""
  if isinstance(value, dict):
    for k, v in value.items():
      if not isinstance(k, str):
        raise TypeError(f"checkpoint {where}: key {k!r} is not a string (JSON keys are strings)")
      _check_json(v, f"{where}[{k!r}]")
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _check_json(v, f"{where}[{i}]")
  elif not (value is None or isinstance(value, (str, bool, int, float))):
    raise TypeError(f"checkpoint {where} is a {type(value).__name__} ({value!r:.60}); metadata "
                    f"must be JSON (dict, list, str, int, float, bool, None): convert arrays "
                    f"with .tolist() and keys to int lists")


# ------------------------------------------------------------------------------ save

def _swap_names(path: str) -> tuple[str, str]:
  """The staging and old folders of an overwrite of ``path`` (the same on every process)."""
  name = _epath(path).name
  return _sibling(path, f".{name}.staging"), _sibling(path, f".{name}.old")


def _finish_swap(path: str, staging: str, old: str) -> None:
  """Completes an overwrite interrupted between its two renames (no ``path``, the old one
  at ``old``): the staged checkpoint is complete once Orbax renamed it to ``staging``."""
  if _exists(path) or not _exists(old):
    return
  _rename(staging if _exists(staging) else old, path)
  _rmtree(old)


def save(path: PathLike, phi: PyTree, opt_state: PyTree = None, *,
         step: Optional[int] = None, metadata: Optional[dict] = None, overwrite: bool = False) -> None:
  """Saves ``phi`` (+ ``opt_state``, ``step``, JSON ``metadata``) to the folder ``path``.

  Every process calls it with the same arguments; the arrays may be sharded over any
  mesh (each process writes the shards it holds).

  Args:
    path: checkpoint folder (created atomically), local or a ``scheme://`` URL.
    phi: trainable parameters; ``None`` leaves are allowed.
    opt_state: optimizer state (any pytree of arrays, e.g. an optax state).
    step: training step, stored in the JSON metadata.
    metadata: JSON-serialisable user metadata (step, rng as a list of ints, data
      position, config dict, base path and hash, ...).
    overwrite: replace an existing checkpoint at ``path`` (the old one is kept until
      the new one is complete).

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False.
    TypeError: ``metadata`` is not JSON, naming the offending key.
  """
  path = _resolve(path)
  metadata = {} if metadata is None else metadata
  if not isinstance(metadata, dict):
    raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
  _check_json(metadata)
  parts = {"phi": _items(phi), "opt_state": _items(opt_state)}
  meta = {"format": FORMAT, "step": None if step is None else int(step), "metadata": metadata,
          "leaves": {name: _describe(items) for name, items in parts.items()}}
  items = {name: _ocp().args.StandardSave(_nest(its, name)) for name, its in parts.items() if its}
  args = _ocp().args.Composite(meta=_ocp().args.JsonSave(meta), **items)
  staging, old = _swap_names(path)
  if _primary():
    _finish_swap(path, staging, old)
  _sync(f"recovered:{path}")
  exists = _agree(_exists(path))
  if exists and not overwrite:
    raise FileExistsError(f"checkpoint {path} exists; pass overwrite=True to replace it")
  if not exists:
    _checkpointer().save(path, args=args)
    _sync(f"saved:{path}")
    return
  # overwrite: write the new checkpoint beside the old one (atomically), then swap, so a
  # crash keeps one intact. The names are deterministic: every process must agree on them.
  if _primary():  # leftovers of an earlier failed overwrite
    for p in _epath(path).parent.glob(f".{_epath(path).name}.staging*"):
      p.rmtree()
    _rmtree(old)
  _sync(f"clean:{path}")
  _checkpointer().save(staging, args=args)
  _sync(f"staged:{path}")
  if _primary():
    _rename(path, old)
    _rename(staging, path)
    _rmtree(old)
  _sync(f"swapped:{path}")


# --------------------------------------------------------------------------- restore

def read_metadata(path: PathLike) -> dict:
  """The JSON part of a checkpoint: ``{"format", "step", "metadata", "leaves"}``."""
  path = _resolve(path)
  if not _exists(path):
    staging, old = _swap_names(path)
    hint = (f"; an overwrite was interrupted: {staging if _exists(staging) else old} holds a "
            f"complete checkpoint (the next save completes the swap)") if _exists(old) else ""
    raise FileNotFoundError(f"no checkpoint at {path}{hint}")
  try:
    meta = _checkpointer().restore(path, args=_ocp().args.Composite(meta=_ocp().args.JsonRestore()))["meta"]
  except (OSError, ValueError, KeyError, TypeError) as e:  # damaged JSON, missing part files
    raise validate.corrupt_file(path, e, what="checkpoint", leaf="meta") from e
  fmt = meta.get("format") if isinstance(meta, dict) else None
  if fmt != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} checkpoint (format {fmt!r})")
  return meta


def _default_sharding() -> jax.sharding.Sharding:
  """Where leaves without a sharding go: the first local device, or replicated over every
  device when there are several processes (so each process can read the value)."""
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def _targets(part: str, template: PyTree, shardings) -> list[tuple[tuple[str, ...], Any, Any]]:
  """``(keys, template leaf, target sharding)`` per leaf of ``template``."""
  items = _items(template)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    given = [shardings] * len(items)
  else:
    treedef = jax.tree_util.tree_structure(template)
    try:
      given = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{part}: shardings do not have the structure of the template: {e}") from e
  out = []
  for (keys, like), s in zip(items, given):
    s = getattr(like, "sharding", None) if s is None else s
    out.append((keys, like, _default_sharding() if s is None else s))
  return out


def _table(described: dict[str, list], limit: int = 40) -> str:
  rows = [f"    {k}  {tuple(s)} {d}" for k, (s, d) in list(described.items())[:limit]]
  if len(described) > limit:
    rows.append(f"    ... and {len(described) - limit} more")
  return "\n".join(rows) or "    (nothing)"


def _check_template(path: str, part: str, targets, described: dict[str, list]) -> None:
  """Raises one error listing every difference between the template and the checkpoint."""
  asked = {_name(k): [list(_shape_dtype(x)[0]), str(_shape_dtype(x)[1])] for k, x, _ in targets}
  problems = []
  for name, (shape, dtype) in asked.items():
    if name not in described:
      problems.append(f"the checkpoint has no leaf '{name}' (template {tuple(shape)} {dtype})")
    elif described[name] != [shape, dtype]:
      s, d = described[name]
      problems.append(f"leaf '{name}' is {tuple(s)} {d} in the checkpoint but "
                      f"{tuple(shape)} {dtype} in the template")
  extra = sorted(set(described) - set(asked))
  if extra:
    problems.append(f"the checkpoint has leaves the template lacks: {extra[:20]}")
  if problems:
    raise ValueError(f"{part}: " + "; ".join(problems[:20]) +
                     f"\n  checkpoint {path} holds ({part}):\n{_table(described)}"
                     f"\n  the template asks for:\n{_table(asked)}")


def _abstract(x, sharding) -> jax.ShapeDtypeStruct:
  shape, dtype = _shape_dtype(x)
  kind = getattr(sharding, "memory_kind", None)
  if kind not in (None, "device"):  # read into device memory, moved to its memory kind after
    sharding = sharding.with_memory_kind("device")
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def restore(path: PathLike, phi_like: PyTree, opt_state_like: PyTree = None, *,
            shardings: Any = None, check_finite: bool = True) -> Checkpoint:
  """Restores a checkpoint into the structures of ``phi_like`` and ``opt_state_like``.

  Args:
    path: checkpoint folder written by :func:`save` (local or a ``scheme://`` URL).
    phi_like: a tree with the structure, shapes and dtypes of ``phi`` (arrays or
      ``jax.ShapeDtypeStruct``; ``None`` holes where ``phi`` has them). A leaf's
      ``sharding`` (any mesh, device count or process count) is where it is restored.
    opt_state_like: the same for the optimizer state (e.g. ``jax.eval_shape(opt.init,
      phi)``), or ``None`` to restore ``phi`` alone.
    shardings: where leaves go when the template has no ``sharding``: one
      ``jax.sharding.Sharding`` for every leaf, or a pair ``(phi_shardings,
      opt_state_shardings)`` of trees shaped like the templates (``None`` entries
      keep the template's). Default: the first local device (replicated over all
      devices with several processes).
    check_finite: raise :class:`lowrank_jax.validate.NonFiniteError`, naming the paths,
      when a restored value is NaN or infinite (``False`` restores them as they are).

  Returns:
    A :class:`Checkpoint` ``(phi, opt_state, step, metadata)``; ``opt_state`` is
    ``None`` when ``opt_state_like`` is.

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    ValueError: the templates do not fit the checkpoint; the message lists every
      differing path with its shape and dtype on both sides, and the checkpoint's leaves.
    lowrank_jax.validate.CorruptFileError: a damaged checkpoint (the path, the leaf
      where the reader names it, and the reader's error as ``__cause__``).
    lowrank_jax.validate.NonFiniteError: see ``check_finite``.
  """
  path = _resolve(path)
  meta = read_metadata(path)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    part_shardings = (shardings, shardings)
  elif isinstance(shardings, (tuple, list)) and len(shardings) == 2:
    part_shardings = tuple(shardings)
  else:
    raise TypeError("restore: shardings must be a jax.sharding.Sharding or a pair "
                    f"(phi_shardings, opt_state_shardings), got {type(shardings).__name__}")
  templates = {"phi": phi_like, "opt_state": opt_state_like}
  wanted = {}
  for (part, template), sh in zip(templates.items(), part_shardings):
    if part == "opt_state" and template is None:
      continue
    targets = _targets(part, template, sh)
    _check_template(path, part, targets, meta["leaves"][part])
    wanted[part] = targets
  args = {part: _ocp().args.StandardRestore(_nest([(k, _abstract(x, s)) for k, x, s in targets], part))
          for part, targets in wanted.items() if targets}
  try:
    state = _checkpointer().restore(path, args=_ocp().args.Composite(**args)) if args else {}
  except (OSError, ValueError, KeyError, TypeError) as e:  # TensorStore / zarr / JSON errors
    raise validate.corrupt_file(path, e, what="checkpoint", leaf=_failed_leaf(e)) from e
  out = {}
  for part, targets in wanted.items():
    leaves = []
    for keys, _, sharding in targets:
      node = state[part]
      for k in keys or ("_root",):
        node = node[k]
      if getattr(sharding, "memory_kind", None) not in (None, "device"):
        node = jax.device_put(node, sharding)
      leaves.append(node)
    out[part] = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(templates[part]), leaves)
  if check_finite:
    _check_finite(path, out)
  return Checkpoint(phi=out["phi"], opt_state=out.get("opt_state"), step=meta["step"],
                    metadata=meta["metadata"])


_ZARR_LEAF = re.compile(r'"([^"/]+)/\.z(?:array|attrs|group)"')


def _failed_leaf(e: BaseException) -> Optional[str]:
  """The leaf a TensorStore error names (``Error reading "a.kernel.b/.zarray"`` ->
  ``a/kernel/b``), or ``None``."""
  m = _ZARR_LEAF.search(str(e))
  return m.group(1).replace(".", "/") if m else None


def _check_finite(path: str, parts: dict) -> None:
  """:func:`lowrank_jax.validate.check_finite` of each restored part; with several processes
  every process raises when any found a non-finite value in its shards."""
  err = None
  try:
    for part, tree in parts.items():
      validate.check_finite(tree, what=f"checkpoint {path}: {part}")
  except validate.NonFiniteError as e:
    err = e
  if jax.process_count() > 1:
    bad = multihost_utils.process_allgather(np.asarray([err is not None], np.int32))
    if err is None and np.asarray(bad).any():
      err = validate.NonFiniteError(f"checkpoint {path}: another process found non-finite values "
                                    f"in its shards")
  if err is not None:
    raise err
