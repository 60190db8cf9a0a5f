"""Reparametrizations ``theta = theta0 + g(phi)`` as pairs of pure functions.

A PEFT method is a :class:`Reparam`, exactly as an optax transformation is an
``(init, update)`` pair::

    phi = reparam.init(key, theta0)          # trainable parameters
    theta = reparam.apply(theta0, phi)       # weights the model sees (may be lazy)

``phi`` mirrors the structure of ``theta0``: a selected leaf holds a dict of that
method's parameters, an unselected one is ``None``. ``jax.grad`` of a loss of
``apply(theta0, phi)`` w.r.t. ``phi`` is the training gradient; ``theta0`` is never
differentiated.

Per-leaf methods (LoRA, DoRA, LoKr, ...) are written as a :class:`LeafMethod` and
lifted onto a tree with :func:`adapt` (the ``where=`` selection); :func:`chain`
composes reparams. Methods that rewrite the base weight at initialisation (PiSSA,
OLoRA, LoftQ) return the new base from :func:`initialize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, tree as tree_lib

PyTree = Any
Key = jax.Array

__all__ = [
  "Reparam",
  "LeafMethod",
  "MatrixView",
  "adapt",
  "adapt_with_bias",
  "chain",
  "initialize",
  "merge",
  "unmerge",
]


class Reparam(NamedTuple):
  """A reparametrization: pure functions over parameter pytrees.

  Attributes:
    init: ``(key, theta0) -> phi``.
    apply: ``(theta0, phi, rng=None) -> theta``; ``rng`` feeds dropout-like noise.
    init_with_base: ``(key, theta0) -> (theta0', phi)`` for methods that rewrite the
      frozen base (PiSSA's residual, LoftQ's quantized weight); otherwise it
      returns ``theta0`` unchanged.
    unmerge: ``(theta_merged, phi) -> theta0`` where the method can invert a merge,
      else ``None``.
  """
  init: Callable[..., PyTree]
  apply: Callable[..., PyTree]
  init_with_base: Callable[..., tuple[PyTree, PyTree]]
  unmerge: Optional[Callable[[PyTree, PyTree], PyTree]] = None


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """How an N-d leaf is seen as a matrix ``[prod(in_dims), prod(out_dims)]``.

  ``in_ndim`` leading axes form the input (fan-in) dimension, the rest the output.
  A 2-d Flax kernel ``[in, out]`` has ``in_ndim=1``.
  """
  shape: tuple[int, ...]
  in_ndim: int

  @property
  def d_in(self) -> int:
    return int(np.prod(self.shape[: self.in_ndim]))

  @property
  def d_out(self) -> int:
    return int(np.prod(self.shape[self.in_ndim:]))

  def to_matrix(self, w):
    return jnp.reshape(w, (self.d_in, self.d_out))

  def from_matrix(self, m):
    return jnp.reshape(m, self.shape)


def _is_float_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class LeafMethod:
  """A per-leaf method: the shared machinery (selection, shape and dtype checks,
  key splitting, the ``phi`` layout) is in :func:`adapt`; a method supplies only
  its math.

  Attributes:
    name: the method's name, used in errors.
    init_leaf: ``(key, path, w, view) -> phi_leaf`` or, when ``rewrites_base``,
      ``(new_w, phi_leaf)``.
    apply_leaf: ``(w, phi_leaf, view, rng) -> new_w`` (may return a lazy weight).
    unmerge_leaf: ``(w_merged, phi_leaf, view) -> w0`` or ``None``.
    rewrites_base: whether ``init_leaf`` also returns a new base weight.
    needs_matrix: whether the leaf must be a matrix (or have an ``in_ndim`` spec).
    max_rank: ``view -> None`` or raise; shape validation hook (e.g. rank bounds).
    in_ndim: ``None`` (2-d leaves only), an int, or ``path -> int``.
  """
  name: str
  init_leaf: Callable[..., Any]
  apply_leaf: Callable[..., Any]
  unmerge_leaf: Optional[Callable[..., Any]] = None
  rewrites_base: bool = False
  needs_matrix: bool = True
  validate: Optional[Callable[[str, "MatrixView"], None]] = None
  in_ndim: Any = None

  def view(self, path: str, w) -> MatrixView:
    shape = tuple(w.shape)
    in_ndim = self.in_ndim(path) if callable(self.in_ndim) else self.in_ndim
    if in_ndim is None:
      if self.needs_matrix and len(shape) != 2:
        raise ValueError(
            f"{self.name}: leaf '{path}' has shape {shape}, not a matrix; pass in_ndim= "
            f"(the number of leading input axes) to adapt an N-d weight")
      in_ndim = 1 if len(shape) >= 1 else 0
    if self.needs_matrix and not 0 < in_ndim < len(shape):
      raise ValueError(f"{self.name}: in_ndim={in_ndim} is invalid for leaf '{path}' of shape {shape}")
    return MatrixView(shape, in_ndim)

  def check(self, path: str, w) -> MatrixView:
    dtype = w.dtype
    if not _is_float_dtype(dtype):
      raise TypeError(f"{self.name}: leaf '{path}' has dtype {dtype}; only floating-point "
                      f"weights can be adapted (shape {tuple(w.shape)})")
    view = self.view(path, w)
    if self.validate is not None:
      self.validate(path, view)
    return view


def _leaf_keys(key: Key, n: int):
  return [jax.random.fold_in(key, i) for i in range(n)]


def adapt(method: LeafMethod, where: tree_lib.Where) -> Reparam:
  """Lifts a per-leaf method onto the leaves of a tree selected by ``where``.

  Args:
    method: the per-leaf method.
    where: regex, list of regexes, predicate ``(path, leaf) -> bool`` or mask.

  Returns:
    A :class:`Reparam` whose ``phi`` mirrors ``theta0`` (``None`` at unselected leaves).
  """

  def _init_all(key, theta0):
    mask = tree_lib.select(theta0, where)
    items = tree_lib.flatten_with_paths(theta0)
    flags = jax.tree_util.tree_leaves(mask)
    keys = _leaf_keys(key, len(items))
    new_base, phis = [], []
    for (path, w), m, k in zip(items, flags, keys):
      if not m:
        new_base.append(w)
        phis.append(None)
        continue
      view = method.check(path, w)
      out = method.init_leaf(k, path, w, view)
      if method.rewrites_base:
        w, out = out
      new_base.append(w)
      phis.append(out)
    treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
    base = jax.tree_util.tree_unflatten(treedef, new_base) if method.rewrites_base else theta0
    return base, jax.tree_util.tree_unflatten(treedef, phis)

  def init_with_base(key, theta0):
    return _init_all(key, theta0)

  def init(key, theta0):
    if method.rewrites_base:
      raise ValueError(
          f"{method.name} rewrites the frozen base weights at initialisation; call "
          f"lowrank_jax.initialize(reparam, key, theta0) -> (theta0', phi) instead of init")
    return _init_all(key, theta0)[1]

  def apply(theta0, phi, rng: Optional[Key] = None):
    items = tree_lib.flatten_with_paths(theta0)
    treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
    phis = treedef.flatten_up_to(phi)
    keys = _leaf_keys(rng, len(items)) if rng is not None else [None] * len(items)
    out = []
    for (path, w), p, k in zip(items, phis, keys):
      if p is None:
        out.append(w)
      else:
        out.append(method.apply_leaf(w, p, method.view(path, w), k))
    return jax.tree_util.tree_unflatten(treedef, out)

  unmerge_fn = None
  if method.unmerge_leaf is not None:
    def unmerge_fn(theta, phi):
      items = tree_lib.flatten_with_paths(theta)
      treedef = jax.tree_util.tree_structure(theta, is_leaf=lazy.is_lazy)
      phis = treedef.flatten_up_to(phi)
      out = [w if p is None else method.unmerge_leaf(w, p, method.view(path, w))
             for (path, w), p in zip(items, phis)]
      return jax.tree_util.tree_unflatten(treedef, out)

  return Reparam(init=init, apply=apply, init_with_base=init_with_base, unmerge=unmerge_fn)


def chain(*reparams: Reparam) -> Reparam:
  """Composes reparams: ``theta = r_n.apply(... r_1.apply(theta0, phi_1) ..., phi_n)``.

  ``phi`` is the tuple ``(phi_1, ..., phi_n)``; each ``init`` sees the weights the
  previous reparams produce, so e.g. LoRA can be chained on top of a quantized or
  another adapted weight. Only the first reparam may rewrite the base.
  """

  def init_with_base(key, theta0):
    keys = jax.random.split(key, len(reparams))
    base, phi0 = reparams[0].init_with_base(keys[0], theta0)
    phis = [phi0]
    cur = reparams[0].apply(base, phi0)
    for r, k in zip(reparams[1:], keys[1:]):
      phi = r.init(k, cur)  # raises for a later reparam that would rewrite the base
      phis.append(phi)
      cur = r.apply(cur, phi)
    return base, tuple(phis)

  def init(key, theta0):
    base, phi = init_with_base(key, theta0)
    if base is not theta0:
      raise ValueError("this chain rewrites the frozen base weights at initialisation; call "
                       "lowrank_jax.initialize(reparam, key, theta0) -> (theta0', phi)")
    return phi

  def apply(theta0, phi, rng: Optional[Key] = None):
    if len(phi) != len(reparams):
      raise ValueError(f"chain of {len(reparams)} reparams got phi with {len(phi)} entries")
    keys = jax.random.split(rng, len(reparams)) if rng is not None else [None] * len(reparams)
    theta = theta0
    for r, p, k in zip(reparams, phi, keys):
      theta = r.apply(theta, p, rng=k)
    return theta

  unmerge_fn = None
  if all(r.unmerge is not None for r in reparams):
    def unmerge_fn(theta, phi):
      for r, p in reversed(list(zip(reparams, phi))):
        theta = r.unmerge(theta, p)
      return theta

  return Reparam(init=init, apply=apply, init_with_base=init_with_base, unmerge=unmerge_fn)


def initialize(reparam: Reparam, key: Key, theta0: PyTree) -> tuple[PyTree, PyTree]:
  """``(theta0', phi)``: the (possibly rewritten) frozen base and the trainable params."""
  return reparam.init_with_base(key, theta0)


def merge(reparam: Reparam, theta0: PyTree, phi: PyTree) -> PyTree:
  """Dense merged weights ``materialize(apply(theta0, phi))`` (no dropout)."""
  return lazy.materialize(reparam.apply(theta0, phi))


def unmerge(reparam: Reparam, theta: PyTree, phi: PyTree) -> PyTree:
  """Inverse of :func:`merge` for methods that define it: returns ``theta0``."""
  if reparam.unmerge is None:
    raise NotImplementedError("this reparam cannot be unmerged (its update depends on the base)")
  return reparam.unmerge(theta, phi)


def adapt_with_bias(method: LeafMethod, where: tree_lib.Where,
                    bias_apply: Callable[..., Any], *,
                    bias_unmerge: Optional[Callable[..., Any]] = None,
                    bias_name: str = "bias",
                    requires_bias: Union[bool, Callable[[str], bool]] = False) -> Reparam:
  """:func:`adapt` for methods whose per-module parameters also change the bias (IA3, GLoRA).

  ``phi`` lives at the selected (kernel) leaves exactly as in :func:`adapt`. After the
  kernels are adapted, the sibling leaf named ``bias_name`` of each selected leaf
  (``.../query/kernel`` -> ``.../query/bias``) becomes ``bias_apply(w0, b0, phi_leaf,
  view)``, with ``w0`` the frozen kernel (possibly lazy).

  Args:
    method: the per-leaf method for the kernels.
    where: selection of the kernels.
    bias_apply: ``(w0, b0, phi_leaf, view) -> b``.
    bias_unmerge: ``(w0, b, phi_leaf, view) -> b0`` given the unmerged kernel ``w0``;
      with ``method.unmerge_leaf`` it makes the reparam invertible.
    bias_name: the name of the bias leaf beside each kernel.
    requires_bias: raise at init when a selected kernel has no sibling bias; a bool or
      ``kernel_path -> bool``.

  Returns:
    A :class:`Reparam`.
  """
  inner = adapt(method, where)

  def _kernels(theta, phi):
    items = tree_lib.flatten_with_paths(theta)
    treedef = jax.tree_util.tree_structure(theta, is_leaf=lazy.is_lazy)
    phis = treedef.flatten_up_to(phi)
    kernels = {}
    for (path, w), p in zip(items, phis):
      if p is None:
        continue
      parent = path.rpartition("/")[0]
      if parent in kernels:
        raise ValueError(f"{method.name}: leaves '{kernels[parent][0]}' and '{path}' share a "
                         f"module; select one kernel per module")
      kernels[parent] = (path, w, p)
    return items, treedef, phis, kernels

  def _map_bias(theta_out, theta0, phi, fn):
    items, treedef, phis, kernels = _kernels(theta0, phi)
    leaves = treedef.flatten_up_to(theta_out)
    for i, ((path, b), p) in enumerate(zip(items, phis)):
      parent, _, name = path.rpartition("/")
      if name == bias_name and p is None and parent in kernels:
        kpath, w0, kp = kernels[parent]
        leaves[i] = fn(kpath, w0, b, kp)
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def init_with_base(key, theta0):
    base, phi = inner.init_with_base(key, theta0)
    if requires_bias:
      paths = set(tree_lib.leaf_paths(theta0))
      for parent, (kpath, _, _) in _kernels(theta0, phi)[3].items():
        bpath = f"{parent}/{bias_name}" if parent else bias_name
        needed = requires_bias(kpath) if callable(requires_bias) else True
        if needed and bpath not in paths:
          raise ValueError(f"{method.name}: adapted leaf '{kpath}' has no sibling '{bias_name}' "
                           f"leaf, which this configuration trains (expected '{bpath}')")
    return base, phi

  def init(key, theta0):
    if method.rewrites_base:
      raise ValueError(f"{method.name} rewrites the frozen base; use lowrank_jax.initialize")
    return init_with_base(key, theta0)[1]

  def apply(theta0, phi, rng: Optional[Key] = None):
    theta = inner.apply(theta0, phi, rng)
    return _map_bias(theta, theta0, phi,
                     lambda kpath, w0, b, p: bias_apply(w0, b, p, method.view(kpath, w0)))

  unmerge_fn = None
  if inner.unmerge is not None and bias_unmerge is not None:
    def unmerge_fn(theta, phi):
      theta0 = inner.unmerge(theta, phi)
      return _map_bias(theta0, theta0, phi,
                       lambda kpath, w0, b, p: bias_unmerge(w0, b, p, method.view(kpath, w0)))

  return Reparam(init=init, apply=apply, init_with_base=init_with_base, unmerge=unmerge_fn)
