"""Device meshes and ``NamedSharding`` placement for ``theta0``, ``phi`` and optimizer state.

Sharding uses only ``jax.jit`` with ``NamedSharding`` inputs (``pjit`` is deprecated):
place the arrays, and the compiled step follows their shardings.

* :func:`make_mesh` builds a mesh from a string: ``"data:2,model:4"``.
* :func:`partition_specs` gives a ``PartitionSpec`` per leaf from ``(regex, spec)``
  rules, first match wins (default: replicated). Specs that do not divide a leaf's
  shape raise an error naming the path, shape and mesh.
* :func:`fsdp_specs` shards every leaf along its largest axis divisible by the
  axis size (ZeRO-3 / FSDP style), for ``theta0`` or full fine-tuning.
* :func:`phi_specs` derives adapter placements from the base weight's spec: an
  adapter factor that shares the base's input dimension (LoRA ``a [in, r]``) is
  sharded like the base's input axis, one that shares the output dimension
  (``b [r, out]``) like its output axis, so the low-rank matmuls stay local.
* :func:`shard` places a tree (``None`` holes allowed); :func:`like` places an
  optimizer state the way its parameters are placed (optax states mirror them).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax import lazy, tree as tree_lib

PyTree = Any
Rules = Sequence[tuple[str, P]]

__all__ = ["make_mesh", "partition_specs", "fsdp_specs", "phi_specs", "shard", "like",
           "replicated"]


def make_mesh(spec: str, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh from ``"name:size,name:size"``; one size may be ``-1`` (the rest of the devices).

  Args:
    spec: e.g. ``"data:2,model:4"`` or ``"fsdp:-1"``.
    devices: defaults to ``jax.devices()``.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = [], []
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    if not name or not size.lstrip("-").isdigit():
      raise ValueError(f"bad mesh spec part {part!r} in {spec!r}; expected 'name:size'")
    names.append(name)
    sizes.append(int(size))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh spec {spec!r}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  n = int(np.prod(sizes))
  if n > len(devices):
    raise ValueError(f"mesh spec {spec!r} needs {n} devices, {len(devices)} available")
  return Mesh(np.asarray(devices[:n]).reshape(sizes), tuple(names))


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[n] for n in names]))


def _check(path: str, shape: tuple, spec: P, mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"spec {spec} has more entries than leaf '{path}' of shape {shape} has axes")
  for ax, entry in enumerate(spec):
    size = _axis_size(mesh, entry)
    if shape[ax] % size:
      raise ValueError(f"leaf '{path}' of shape {shape}: axis {ax} ({shape[ax]}) is not divisible "
                       f"by mesh axis {entry!r} of size {size} (mesh {dict(mesh.shape)})")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def partition_specs(tree: PyTree, rules: Rules, mesh: Mesh) -> PyTree:
  """``PartitionSpec`` per leaf: the first ``(regex, spec)`` whose regex matches the path."""
  compiled = [(re.compile(r), s) for r, s in rules]
  items = tree_lib.flatten_with_paths(tree)
  out = []
  for path, x in items:
    spec = next((s for r, s in compiled if r.search(path)), P())
    _check(path, tuple(x.shape), spec, mesh)
    out.append(spec)
  treedef = jax.tree_util.tree_structure(tree, is_leaf=lazy.is_lazy)
  return jax.tree_util.tree_unflatten(treedef, out)


def fsdp_specs(tree: PyTree, mesh: Mesh, axis: str = "fsdp", min_size: int = 2**14) -> PyTree:
  """Shards each leaf with at least ``min_size`` entries along its largest divisible axis."""
  n = mesh.shape[axis]

  def spec(x):
    shape = tuple(x.shape)
    if int(np.prod(shape)) < min_size:
      return P()
    for ax in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[ax] % n == 0:
        return P(*([None] * ax + [axis]))
    return P()

  return jax.tree.map(spec, tree, is_leaf=lazy.is_lazy)


def phi_specs(phi: PyTree, theta0: PyTree, theta0_specs: PyTree) -> PyTree:
  """Adapter placements derived from the base weights' specs.

  For each adapted leaf with base spec ``P(in_axis, out_axis)``, an adapter array whose
  first dimension equals the base's ``d_in`` gets ``P(in_axis, None)``, one whose last
  dimension equals ``d_out`` gets ``P(None, out_axis)``; everything else (vectors,
  small factors) is replicated.
  """
  base_items = tree_lib.flatten_with_paths(theta0)
  treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
  specs = treedef.flatten_up_to(theta0_specs)
  phis = treedef.flatten_up_to(phi)
  out = []
  for (path, w), spec, p in zip(base_items, specs, phis):
    if p is None:
      out.append(None)
      continue
    shape = tuple(w.shape)
    s_in = spec[0] if len(spec) > 0 else None
    s_out = spec[-1] if len(spec) == len(shape) and len(shape) >= 2 else None

    def leaf_spec(a, shape=shape, s_in=s_in, s_out=s_out):
      a_shape = tuple(a.shape)
      if len(shape) == 2 and len(a_shape) == 2:
        if a_shape == shape:
          return P(s_in, s_out)
        if a_shape[0] == shape[0] and s_in is not None:
          return P(s_in, None)
        if a_shape[-1] == shape[-1] and s_out is not None:
          return P(None, s_out)
      if a_shape == shape:
        return P(*spec)
      return P()

    out.append(jax.tree.map(leaf_spec, p))
  return jax.tree_util.tree_unflatten(treedef, out)


def shard(tree: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
  """``jax.device_put`` every array leaf with ``NamedSharding(mesh, spec)``."""
  return jax.tree.map(lambda x, s: None if x is None else jax.device_put(x, NamedSharding(mesh, s)),
                      tree, specs, is_leaf=lambda x: x is None or lazy.is_lazy(x))


def like(state: PyTree, params: PyTree, param_specs: PyTree, mesh: Mesh) -> PyTree:
  """Places an optimizer state: a leaf whose path ends with a parameter's path and has its
  shape gets that parameter's spec; everything else (counts, projectors) is replicated."""
  by_path = {p: (tuple(x.shape), s) for (p, x), s in zip(
      tree_lib.flatten_with_paths(params), jax.tree_util.tree_leaves(
          param_specs, is_leaf=lambda s: isinstance(s, P)))}

  def place(path, x):
    comps = path.split("/")
    for i in range(len(comps)):  # the longest parameter path that is a suffix of the state path
      hit = by_path.get("/".join(comps[i:]))
      if hit is not None and tuple(x.shape) == hit[0]:
        return jax.device_put(x, NamedSharding(mesh, hit[1]))
    return jax.device_put(x, replicated(mesh))

  items = tree_lib.flatten_with_paths(state)
  treedef = jax.tree_util.tree_structure(state, is_leaf=lazy.is_lazy)
  return jax.tree_util.tree_unflatten(treedef, [place(p, x) for p, x in items])
