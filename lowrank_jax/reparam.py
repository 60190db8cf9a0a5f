"""Reparametrizations ``theta = theta0 + g(phi)`` as pairs of pure functions.

A PEFT method is a :class:`Reparam`, exactly as an optax transformation is an
``(init, update)`` pair::

    phi = reparam.init(key, theta0)          # trainable parameters
    theta = reparam.apply(theta0, phi)       # weights the model sees (may be lazy)

``jax.grad`` of a loss of ``apply(theta0, phi)`` w.r.t. ``phi`` is the training
gradient; ``theta0`` is never differentiated.

Per-leaf methods (LoRA, DoRA, LoKr, ...) are written as a :class:`LeafMethod` and
lifted onto a tree with :func:`adapt` (the ``where=`` selection); :func:`chain`
composes reparams. Methods that rewrite the base weight at initialisation (PiSSA,
OLoRA, LoftQ) return the new base from :func:`initialize`.

**Parameters shared across leaves.** A :class:`LeafMethod` may also own parameters
that every selected leaf uses (``init_shared``: SAID's ``z``, VB-LoRA's vector bank,
prefix tuning's prefixes), derive per-leaf inputs from them once per call
(``prepare``: SAID's batched projections, VeRA's frozen random matrices regenerated
from a seed) and add subtrees to the tree beside the selected leaves (``insert``:
bottleneck adapters, per-layer prefixes in the model's slots). The layout of ``phi``
of :func:`adapt` then is

===========================================  =============================================
the method has                                ``phi``
===========================================  =============================================
per-leaf parameters only (``init_leaf``)      a tree mirroring ``theta0``: the leaf's
                                              parameters at a selected leaf, ``None``
                                              elsewhere (LoRA, VeRA, adapters)
shared parameters only (``init_shared``)      the shared parameters themselves (SAID's
                                              ``{"z", "lam"}``, prefix tuning's prefixes)
both                                          ``{"leaves": <mirror tree>, "shared": ...}``
                                              (:data:`LEAVES`, :data:`SHARED`; VB-LoRA)
===========================================  =============================================

Every form is a plain pytree of dicts and arrays, so ``jax.grad``, optax, the
checkpoints and :func:`lowrank_jax.partition` treat it like any other ``phi``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, tree as tree_lib

PyTree = Any
Key = jax.Array

__all__ = [
  "Reparam",
  "InitFn",
  "ApplyFn",
  "InitWithBaseFn",
  "UnmergeFn",
  "LeafMethod",
  "MatrixView",
  "LEAVES",
  "SHARED",
  "PhiMismatchError",
  "adapt",
  "adapt_with_bias",
  "chain",
  "PerModule",
  "per_module",
  "initialize",
  "merge",
  "unmerge",
]

LEAVES = "leaves"
SHARED = "shared"


class PhiMismatchError(ValueError):
  """``phi`` does not fit the reparam or ``theta0``: parameters at a leaf the method does not
  select, a selected leaf without parameters, or parameters of another shape than the method's
  ``init`` makes. The message names the path, what was expected and what was found."""


# ------------------------------------------------------------------ the Reparam signatures

class InitFn(Protocol):
  """``init(key, theta0) -> phi``: the trainable parameters at initialisation.

  ``key`` is a JAX PRNG key, ``theta0`` the frozen parameter tree; ``phi`` is any pytree
  (see the module docstring for :func:`adapt`'s layouts).
  """

  def __call__(self, key: Key, theta0: PyTree, /) -> PyTree: ...


class ApplyFn(Protocol):
  """``apply(theta0, phi, rng=None) -> theta``: the weights the model sees.

  ``theta`` has ``theta0``'s structure plus any inserted subtrees; its leaves may be lazy
  weights (:mod:`lowrank_jax.lazy`). ``rng`` (a PRNG key or ``None``) feeds dropout-like
  noise; ``None`` means deterministic. Must be traceable (``jax.jit``, ``jax.grad`` w.r.t.
  ``phi``).
  """

  def __call__(self, theta0: PyTree, phi: PyTree, /, rng: Optional[Key] = None) -> PyTree: ...


class InitWithBaseFn(Protocol):
  """``init_with_base(key, theta0) -> (theta0', phi)``: ``theta0'`` is the frozen base the
  method trains against: a rewritten one (PiSSA's residual, LoftQ's quantized weight) or
  ``theta0`` itself (the same object) for every other method."""

  def __call__(self, key: Key, theta0: PyTree, /) -> tuple[PyTree, PyTree]: ...


class UnmergeFn(Protocol):
  """``unmerge(theta, phi) -> theta0``: inverts ``materialize(apply(theta0, phi))`` (and
  removes inserted subtrees)."""

  def __call__(self, theta: PyTree, phi: PyTree, /) -> PyTree: ...


class Reparam(NamedTuple):
  """A reparametrization: pure functions over parameter pytrees.

  Attributes:
    init: :class:`InitFn`, ``(key, theta0) -> phi``.
    apply: :class:`ApplyFn`, ``(theta0, phi, rng=None) -> theta``.
    init_with_base: :class:`InitWithBaseFn`, ``(key, theta0) -> (theta0', phi)``.
    unmerge: :class:`UnmergeFn` ``(theta_merged, phi) -> theta0`` where the method can
      invert a merge, else ``None``.
    config: what the reparametrization is, as data: the method's config (a frozen
      ``lowrank_jax.methods.registry.MethodConfig``: method name, hyper-parameters,
      ``where``, initialisation), recorded by every method factory whether called
      directly (``lj.lora(...)``) or through the registry (``registry.build``,
      ``build_from``, ``chain_from``) or an import (``interop.peft.load_peft_adapter``);
      for a :func:`chain`, the tuple of its entries' configs; for :func:`per_module` a
      :class:`PerModule`; ``None`` when nothing recorded it (a reparam built by hand with
      :func:`adapt`). ``registry.describe(reparam)`` is its JSON form and
      ``registry.from_description`` the inverse. Exports read it (e.g.
      ``interop.peft.save_peft_adapter``) instead of being told the settings again.
  """
  init: InitFn
  apply: ApplyFn
  init_with_base: InitWithBaseFn
  unmerge: Optional[UnmergeFn] = None
  config: Optional[Any] = None

  def with_config(self, config: Any) -> "Reparam":
    """This reparam with ``config`` recorded (same functions)."""
    return self._replace(config=config)


# ------------------------------------------------------------------ per-leaf methods

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


Views = Mapping[str, MatrixView]
"""The selected leaves, ``{path: view}`` in tree order (the order of ``theta0``'s leaves)."""

InitLeafFn = Callable[[Key, str, Any, MatrixView], PyTree]
"""``(key, path, w, view) -> phi_leaf``; ``-> (new_w, phi_leaf)`` when the method rewrites the base."""
ApplyLeafFn = Union[Callable[[Any, PyTree, MatrixView, Optional[Key]], Any],
                    Callable[[Any, PyTree, MatrixView, Optional[Key], Any], Any]]
"""``(w, phi_leaf, view, rng) -> new_w``, plus a fifth argument ``shared_leaf`` (the leaf's
entry of ``prepare``, else the shared parameters) for methods with shared parameters."""
UnmergeLeafFn = Union[Callable[[Any, PyTree, MatrixView], Any],
                      Callable[[Any, PyTree, MatrixView, Any], Any]]
"""``(w_merged, phi_leaf, view) -> w0``, plus ``shared_leaf`` as for :data:`ApplyLeafFn`."""
InitSharedFn = Callable[[Key, Views], PyTree]
"""``(key, views) -> shared``: the parameters every selected leaf uses (trained, in ``phi``)."""
PrepareFn = Callable[[Optional[PyTree], Views], Mapping[str, Any]]
"""``(shared, views) -> {path: shared_leaf}``: per-leaf inputs computed once per call from the
shared parameters (``None`` without ``init_shared``): frozen buffers regenerated from a seed,
transforms batched over the leaves. Not stored, not trained directly."""
InsertFn = Callable[[str, Optional[PyTree], Any], Mapping[str, PyTree]]
"""``(path, phi_leaf, shared_leaf) -> {new_path: subtree}``: subtrees that the selected leaf
at ``path`` adds to ``theta`` (adapters, prefixes in a model's slots)."""


def _is_float_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class LeafMethod:
  """A per-leaf method: the shared machinery (selection, shape and dtype checks,
  key splitting, the ``phi`` layout) is in :func:`adapt`; a method supplies only
  its math.

  Attributes:
    name: the method's name, used in errors.
    init_leaf: :data:`InitLeafFn`; ``None`` when the method has no per-leaf parameters
      (then ``init_shared`` is required and ``phi`` is the shared parameters).
    apply_leaf: :data:`ApplyLeafFn` (may return a lazy weight); ``None`` leaves the
      weight unchanged (methods that only ``insert``).
    unmerge_leaf: :data:`UnmergeLeafFn` or ``None``.
    rewrites_base: whether ``init_leaf`` also returns a new base weight.
    needs_matrix: whether the leaf must be a matrix (or have an ``in_ndim`` spec).
    validate: ``(path, view) -> None`` or raise; shape validation hook (e.g. rank bounds).
    in_ndim: ``None`` (2-d leaves only), an int, or ``path -> int``.
    init_shared: :data:`InitSharedFn`, parameters shared by the selected leaves.
    prepare: :data:`PrepareFn`, per-leaf inputs derived from the shared parameters.
    insert: :data:`InsertFn`, subtrees added beside the selected leaves.

  With ``init_shared`` or ``prepare``, ``apply_leaf`` and ``unmerge_leaf`` take a last
  argument ``shared_leaf``: ``prepare(shared, views)[path]``, or ``shared`` itself
  without ``prepare``. Example, a VB-LoRA-style method (Li et al., "VB-LoRA: Extreme
  Parameter Efficient Fine-Tuning with Vector Banks", arXiv 2405.15179): one trainable
  bank of ``h`` vectors of length ``b`` shared by every adapted matrix, whose LoRA
  factors are cut into length-``b`` pieces, each a top-``k`` softmax mixture of the
  bank's vectors under that piece's own trainable logits::

      def vblora(where, rank=4, h=256, b=256, k=2):
        def init_shared(key, views):           # phi["shared"]: the vector bank
          return {"bank": jax.random.uniform(key, (h, b), minval=-0.02, maxval=0.02)}

        def init_leaf(key, path, w, view):     # phi["leaves"][...]: logits per piece
          ka, kb = jax.random.split(key)
          return {"logits_a": jax.random.normal(ka, (view.d_in * rank // b, h)),
                  "logits_b": jnp.zeros((rank * view.d_out // b, h))}

        def mix(logits, bank):                 # [n, h] -> n pieces of length b
          top, idx = jax.lax.top_k(logits, k)
          return jnp.einsum("nk,nkb->nb", jax.nn.softmax(top), bank[idx])

        def apply_leaf(w, phi, view, rng, shared):
          a = mix(phi["logits_a"], shared["bank"]).reshape(view.d_in, rank)
          b_ = mix(phi["logits_b"], shared["bank"]).reshape(rank, view.d_out)
          return lj.materialize(w) + view.from_matrix(a @ b_).astype(w.dtype)

        return lj.adapt(lj.LeafMethod("VB-LoRA", init_leaf, apply_leaf,
                                      init_shared=init_shared), where)

  ``phi = {"leaves": {...logits at the selected leaves...}, "shared": {"bank": ...}}``;
  the gradient of the bank sums the contributions of every leaf.
  """
  name: str
  init_leaf: Optional[InitLeafFn]
  apply_leaf: Optional[ApplyLeafFn]
  unmerge_leaf: Optional[UnmergeLeafFn] = None
  rewrites_base: bool = False
  needs_matrix: bool = True
  validate: Optional[Callable[[str, MatrixView], None]] = None
  in_ndim: Union[None, int, Callable[[str], int]] = None
  init_shared: Optional[InitSharedFn] = None
  prepare: Optional[PrepareFn] = None
  insert: Optional[InsertFn] = None

  @property
  def uses_shared(self) -> bool:
    """Whether ``apply_leaf`` / ``unmerge_leaf`` take the ``shared_leaf`` argument."""
    return self.init_shared is not None or self.prepare is not None

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


def _strip_to(theta: PyTree, mirror: PyTree) -> PyTree:
  """``theta`` without the dict entries that ``mirror`` (a ``phi`` mirroring the tree
  before an ``insert``) lacks: the structure ``theta`` had before the subtrees were added."""
  if isinstance(theta, Mapping) and isinstance(mirror, Mapping):
    return {k: _strip_to(v, mirror[k]) for k, v in theta.items() if k in mirror}
  return theta


# ------------------------------------------------------------------ validation of phi

_KEY_STRUCT = jax.ShapeDtypeStruct((2,), jnp.uint32)
_CACHE_LIMIT = 64


def _abstract(tree: PyTree) -> PyTree:
  """``tree`` with every array (also inside lazy weights) as a ``jax.ShapeDtypeStruct``."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def _signature(*trees: PyTree) -> tuple:
  """A hashable key of the structures, shapes and dtypes of ``trees`` (values ignored)."""
  out = []
  for t in trees:
    leaves, treedef = jax.tree_util.tree_flatten(t)
    out.append((treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)))
  return tuple(out)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the arrays of ``tree`` (``""`` for a bare array)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(tree_lib.key_name(k) for k in p): tuple(np.shape(x)) for p, x in leaves}


def _describe_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
  if list(shapes) == [""]:
    return f"an array of shape {shapes['']}"
  return "{" + ", ".join(f"{k}: {v}" for k, v in shapes.items()) + "}"


def _short(x, limit: int = 80) -> str:
  r = repr(x)
  return r if len(r) <= limit else r[: limit - 3] + "..."


def _list_paths(paths: list[str], limit: int = 6) -> str:
  shown = ", ".join(f"'{p}'" for p in paths[:limit])
  return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _kind(x) -> str:
  if x is None:
    return "None"
  if isinstance(x, (list, tuple)):
    return f"a {type(x).__name__} of {len(x)}"
  return f"a {type(x).__name__}"


def _mirror_difference(tree: PyTree, phi: PyTree, path: str = "") -> Optional[str]:
  """Where a per-leaf ``phi`` first departs from the nodes of ``tree`` (in words), or ``None``."""
  at = f"'{path}'" if path else "the root"
  if isinstance(tree, Mapping):
    if not isinstance(phi, Mapping):
      return f"at {at} the tree has a dict with keys {sorted(map(str, tree))}, phi has {_kind(phi)}"
    if set(tree) != set(phi):
      missing, extra = sorted(map(str, set(tree) - set(phi))), sorted(map(str, set(phi) - set(tree)))
      return (f"at {at} the tree has keys {sorted(map(str, tree))}, phi has {sorted(map(str, phi))}"
              f" (missing {missing}, extra {extra})")
    for k in tree:
      d = _mirror_difference(tree[k], phi[k], f"{path}/{k}" if path else str(k))
      if d:
        return d
  elif isinstance(tree, (list, tuple)) and not lazy.is_lazy(tree):
    if not isinstance(phi, (list, tuple)) or len(phi) != len(tree):
      return f"at {at} the tree has a {type(tree).__name__} of {len(tree)}, phi has {_kind(phi)}"
    for i, (t, p) in enumerate(zip(tree, phi)):
      d = _mirror_difference(t, p, f"{path}/{i}" if path else str(i))
      if d:
        return d
  return None


def _holds_tracer(fn, depth: int = 3) -> bool:
  """Whether the closure of ``fn`` holds a traced value (a method built inside ``jit`` from
  traced hyper-parameters, e.g. GLoRA's sampled choices): its ``init`` then says nothing
  about the shapes ``apply`` accepts."""
  def walk(x, d):
    if isinstance(x, jax.core.Tracer):
      return True
    if d == 0:
      return False
    if isinstance(x, (list, tuple)):
      return any(walk(v, d - 1) for v in x)
    if isinstance(x, Mapping):
      return any(walk(v, d - 1) for v in x.values())
    if callable(x) and getattr(x, "__closure__", None):
      return any(walk(c.cell_contents, d - 1) for c in x.__closure__ if _cell_filled(c))
    return False
  return walk(fn, depth)


def _cell_filled(cell) -> bool:
  try:
    cell.cell_contents  # pylint: disable=pointless-statement
    return True
  except ValueError:
    return False


class _Checked:
  """The signatures of ``(theta0, phi)`` already validated by one reparam: :func:`adapt`'s
  check runs once per structure (once per trace under ``jit``), never on values."""

  def __init__(self):
    self._seen: set = set()

  def __contains__(self, sig) -> bool:
    return sig in self._seen

  def add(self, sig) -> None:
    if len(self._seen) >= _CACHE_LIMIT:
      self._seen.clear()
    self._seen.add(sig)


def adapt(method: LeafMethod, where: tree_lib.Where) -> Reparam:
  """Lifts a per-leaf method onto the leaves of a tree selected by ``where``.

  Args:
    method: the per-leaf method (optionally with shared parameters, see
      :class:`LeafMethod`).
    where: regex, list of regexes, predicate ``(path, leaf) -> bool`` or mask.

  Returns:
    A :class:`Reparam`; ``phi``'s layout is in the module docstring: per-leaf
    parameters mirror ``theta0`` (``None`` at unselected leaves), shared parameters
    alone are ``phi`` itself, both are ``{"leaves": ..., "shared": ...}``. Leaf ``i``
    (in tree order) draws from ``fold_in(key, i)``; with shared parameters, ``key`` is
    first split into the leaves' key and ``init_shared``'s.

  ``apply`` checks ``phi`` against the method and ``theta0`` once per structure (shapes
  and dtypes; once per trace under ``jit``, nothing at run time): parameters at a leaf
  that ``where`` does not select, a selected leaf without parameters, or parameters
  whose structure or shapes differ from what ``init`` makes for that leaf (computed
  with ``jax.eval_shape``, e.g. a rank-4 method given rank-8 factors), or shared
  parameters in ``init``'s layout with other shapes, raise a :class:`PhiMismatchError`
  naming the path, the expected and the found. Where ``init`` cannot be traced
  abstractly (a ``where`` predicate on values) only the selection is checked.
  """
  has_leaf = method.init_leaf is not None
  has_shared = method.init_shared is not None
  if not has_leaf and not has_shared:
    raise ValueError(f"{method.name}: a LeafMethod needs init_leaf or init_shared (or both)")
  if method.rewrites_base and not has_leaf:
    raise ValueError(f"{method.name}: rewrites_base needs an init_leaf that returns the new base")

  def _split(phi):
    """``(per-leaf tree or None, shared or None)`` of a ``phi``."""
    if has_leaf and has_shared:
      if not (isinstance(phi, Mapping) and set(phi) == {LEAVES, SHARED}):
        got = sorted(phi) if isinstance(phi, Mapping) else type(phi).__name__
        raise ValueError(f"{method.name}: phi must be {{'{LEAVES}': <per-leaf tree>, "
                         f"'{SHARED}': <shared parameters>}}, got {got}")
      return phi[LEAVES], phi[SHARED]
    return (phi, None) if has_leaf else (None, phi)

  def _structure(theta):
    return (tree_lib.flatten_with_paths(theta),
            jax.tree_util.tree_structure(theta, is_leaf=lazy.is_lazy))

  def _selected(theta, treedef, leaves) -> tuple[list[bool], list]:
    """``(selected flags, per-leaf phi or None)`` in tree order: from the mirror tree, or
    by ``where`` for a method without per-leaf parameters."""
    if has_leaf:
      try:
        phis = treedef.flatten_up_to(leaves)
      except (ValueError, TypeError) as e:
        raise PhiMismatchError(f"{method.name}: phi does not mirror the structure of the tree: "
                               f"{_mirror_difference(theta, leaves) or e}") from e
      return [p is not None for p in phis], phis
    flags = [bool(m) for m in jax.tree_util.tree_leaves(tree_lib.select(theta, where))]
    return flags, [None] * len(flags)

  def _shared_leaves(shared, views: Views) -> Mapping[str, Any]:
    if method.prepare is None:
      return dict.fromkeys(views, shared)
    out = method.prepare(shared, views)
    missing = [p for p in views if p not in out]
    if missing:
      raise ValueError(f"{method.name}: prepare returned no entry for the selected leaves {missing}")
    return out

  def _init_all(key, theta0):
    mask = tree_lib.select(theta0, where)
    items, treedef = _structure(theta0)
    flags = jax.tree_util.tree_leaves(mask)
    leaf_key, shared_key = jax.random.split(key) if has_shared else (key, None)
    keys = _leaf_keys(leaf_key, len(items))
    views = {}
    new_base, phis = [], []
    for (path, w), m, k in zip(items, flags, keys):
      if not m:
        new_base.append(w)
        phis.append(None)
        continue
      view = views[path] = method.check(path, w)
      out = method.init_leaf(k, path, w, view) if has_leaf else None
      if method.rewrites_base:
        w, out = out
      new_base.append(w)
      phis.append(out)
    base = jax.tree_util.tree_unflatten(treedef, new_base) if method.rewrites_base else theta0
    leaves = jax.tree_util.tree_unflatten(treedef, phis) if has_leaf else None
    shared = method.init_shared(shared_key, views) if has_shared else None
    if has_leaf and has_shared:
      return base, {LEAVES: leaves, SHARED: shared}
    return base, (leaves if has_leaf else shared)

  def init_with_base(key, theta0):
    return _init_all(key, theta0)

  def init(key, theta0):
    if method.rewrites_base:
      raise ValueError(
          f"{method.name} rewrites the frozen base weights at initialisation; call "
          f"lowrank_jax.initialize(reparam, key, theta0) -> (theta0', phi) instead of init")
    return _init_all(key, theta0)[1]

  def _views(items, flags) -> dict[str, MatrixView]:
    return {path: method.view(path, w) for (path, w), m in zip(items, flags) if m}

  def _insertions(items, flags, phis, extra):
    for (path, _), m, p in zip(items, flags, phis):
      if m:
        yield from method.insert(path, p, None if extra is None else extra[path]).items()

  checked = _Checked()
  traced_method = _holds_tracer(method.init_leaf) or _holds_tracer(method.init_shared)

  def _expected(theta0):
    """``(selected flags or None, expected per-leaf phi or None, expected shared or None)``:
    what ``init`` makes for ``theta0``, abstractly; ``None`` where it cannot be traced."""
    try:
      _, exp = jax.eval_shape(lambda k, t: _init_all(k, t), _KEY_STRUCT, _abstract(theta0))
    except Exception:  # pylint: disable=broad-except
      # init cannot run abstractly here (a `where` on values, an init that rejects a rewritten
      # base): check the selection alone, if `where` can say it
      try:
        sel = [bool(m) for m in jax.tree_util.tree_leaves(tree_lib.select(theta0, where, allow_empty=True))]
      except Exception:  # pylint: disable=broad-except
        sel = None
      return sel, None, None
    if has_leaf and has_shared:
      return None, exp[LEAVES], exp[SHARED]
    return (None, exp, None) if has_leaf else (None, None, exp)

  def _check(theta0, phi, items, treedef, flags, phis, shared):
    """Raises :class:`PhiMismatchError` where ``phi`` does not fit (see :func:`adapt`)."""
    sig = _signature(theta0, phi)
    if sig in checked:
      return
    if traced_method:
      return
    sel, exp_leaves, exp_shared = _expected(theta0)
    if exp_leaves is not None:
      exp_phis = treedef.flatten_up_to(exp_leaves)
      sel = [p is not None for p in exp_phis]
    if has_leaf and sel is not None:
      paths = [p for p, _ in items]
      extra = [p for p, f, s in zip(paths, flags, sel) if f and not s]
      missing = [p for p, f, s in zip(paths, flags, sel) if s and not f]
      selected = [p for p, s in zip(paths, sel) if s]
      if extra:
        raise PhiMismatchError(
            f"{method.name}: phi has parameters at '{extra[0]}', a leaf this method does not "
            f"select (where={_short(where)}); expected parameters at {_list_paths(selected)}; "
            f"found them also at {_list_paths(extra)}")
      if missing:
        raise PhiMismatchError(
            f"{method.name}: the method selects '{missing[0]}' (where={_short(where)}) but phi has "
            f"no parameters there (None); expected parameters at {_list_paths(selected)}; "
            f"missing at {_list_paths(missing)}")
    if exp_leaves is not None:
      for (path, w), e, p in zip(items, exp_phis, phis):
        if e is None or p is None:
          continue
        want, got = _shapes(e), _shapes(p)
        if want != got:
          raise PhiMismatchError(
              f"{method.name}: phi at '{path}' does not fit the method on that leaf "
              f"{tuple(w.shape)} {w.dtype}: expected {_describe_shapes(want)}, found {_describe_shapes(got)}")
    if exp_shared is not None:
      # shared parameters of another layout are the method's to read (prefix tuning takes its
      # MLP form or the materialised prefixes); the layout init makes must have its shapes
      want, got = _shapes(exp_shared), _shapes(shared)
      if set(want) == set(got):
        for key, shape in want.items():
          if got[key] != shape:
            ref = (f"phi['{SHARED}']" if has_leaf else "phi") + "".join(f"['{k}']" for k in key.split("/") if k)
            raise PhiMismatchError(
                f"{method.name}: {ref} has shape {got[key]}, but the method expects {shape} on this "
                f"tree (its shared parameters do not fit: expected {_describe_shapes(want)}, found "
                f"{_describe_shapes(got)})")
    checked.add(sig)

  def apply(theta0, phi, rng: Optional[Key] = None):
    leaves, shared = _split(phi)
    items, treedef = _structure(theta0)
    flags, phis = _selected(theta0, treedef, leaves)
    _check(theta0, phi, items, treedef, flags, phis, shared)
    views = _views(items, flags)
    extra = _shared_leaves(shared, views) if method.uses_shared else None
    keys = _leaf_keys(rng, len(items)) if rng is not None else [None] * len(items)
    out = []
    for (path, w), m, p, k in zip(items, flags, phis, keys):
      if not m or method.apply_leaf is None:
        out.append(w)
      elif extra is not None:
        out.append(method.apply_leaf(w, p, views[path], k, extra[path]))
      else:
        out.append(method.apply_leaf(w, p, views[path], k))
    theta = jax.tree_util.tree_unflatten(treedef, out)
    if method.insert is not None:
      for new_path, sub in _insertions(items, flags, phis, extra):
        theta = tree_lib.with_subtree(theta, new_path, sub)
    return theta

  unmerge_fn = None
  if method.unmerge_leaf is not None or method.apply_leaf is None:
    def unmerge_fn(theta, phi):
      leaves, shared = _split(phi)
      if method.insert is not None:
        # The tree before the insertions: phi's mirror tree tells which dict entries are
        # new; without per-leaf parameters `where` finds the selected leaves among them.
        base = _strip_to(theta, leaves) if has_leaf else theta
        items, treedef = _structure(base)
        flags, phis = _selected(base, treedef, leaves)
        extra = _shared_leaves(shared, _views(items, flags)) if method.uses_shared else None
        for new_path, _ in _insertions(items, flags, phis, extra):
          theta = tree_lib.without_subtree(theta, new_path)
      if method.unmerge_leaf is None:
        return theta
      items, treedef = _structure(theta)
      flags, phis = _selected(theta, treedef, leaves)
      views = _views(items, flags)
      extra = _shared_leaves(shared, views) if method.uses_shared else None
      out = []
      for (path, w), m, p in zip(items, flags, phis):
        if not m:
          out.append(w)
        elif extra is not None:
          out.append(method.unmerge_leaf(w, p, views[path], extra[path]))
        else:
          out.append(method.unmerge_leaf(w, p, views[path]))
      return jax.tree_util.tree_unflatten(treedef, out)

  return Reparam(init=init, apply=apply, init_with_base=init_with_base, unmerge=unmerge_fn)


def chain(*reparams: Reparam) -> Reparam:
  """Composes reparams: ``theta = r_n.apply(... r_1.apply(theta0, phi_1) ..., phi_n)``.

  ``phi`` is the tuple ``(phi_1, ..., phi_n)`` and ``config`` the tuple of the entries'
  configs; each ``init`` sees the weights the
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
    if not isinstance(phi, (tuple, list)) or len(phi) != len(reparams):
      got = f"{len(phi)} entries" if isinstance(phi, (tuple, list)) else f"a {type(phi).__name__}"
      raise PhiMismatchError(f"a chain of {len(reparams)} reparams takes phi as a tuple of "
                             f"{len(reparams)} entries (one per reparam, in order), got {got}")
    keys = jax.random.split(rng, len(reparams)) if rng is not None else [None] * len(reparams)
    theta = theta0
    for i, (r, p, k) in enumerate(zip(reparams, phi, keys)):
      try:
        theta = r.apply(theta, p, rng=k)
      except PhiMismatchError as e:
        raise PhiMismatchError(f"chain entry {i} of {len(reparams)} (phi[{i}]): {e}") from e
    return theta

  unmerge_fn = None
  if all(r.unmerge is not None for r in reparams):
    def unmerge_fn(theta, phi):
      for r, p in reversed(list(zip(reparams, phi))):
        theta = r.unmerge(theta, p)
      return theta

  return Reparam(init=init, apply=apply, init_with_base=init_with_base, unmerge=unmerge_fn,
                 config=tuple(r.config for r in reparams))


class PerModule(NamedTuple):
  """``Reparam.config`` of :func:`per_module`: the configs of its parts, in order (each
  part's ``where`` is its selection)."""
  parts: tuple


def per_module(parts: list[tuple[tree_lib.Where, Reparam]]) -> Reparam:
  """Per-leaf reparams over disjoint sets of leaves that share one ``phi`` mirror tree
  (e.g. LoRA with another rank and alpha per module: peft's ``rank_pattern`` /
  ``alpha_pattern``). ``parts`` are ``(where, reparam)`` with each reparam built on its
  selection ``where`` (a mask, a regex, ...: :func:`lowrank_jax.tree.select`); each part
  sees ``phi`` at its own leaves only (``None`` elsewhere)."""

  def restrict(theta0, phi, where):
    treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
    flags = jax.tree_util.tree_leaves(tree_lib.select(theta0, where))
    return jax.tree_util.tree_unflatten(treedef, [p if f else None for p, f in
                                                  zip(treedef.flatten_up_to(phi), flags)])

  def init(key, theta0):
    phis = [r.init(jax.random.fold_in(key, i), theta0) for i, (_, r) in enumerate(parts)]
    treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
    flat = [treedef.flatten_up_to(p) for p in phis]
    return jax.tree_util.tree_unflatten(treedef, [next((x for x in xs if x is not None), None)
                                                  for xs in zip(*flat)])

  def apply(theta0, phi, rng=None):
    theta = theta0
    for i, (mask, r) in enumerate(parts):
      theta = r.apply(theta, restrict(theta0, phi, mask), None if rng is None else jax.random.fold_in(rng, i))
    return theta

  unmerge = None
  if all(r.unmerge is not None for _, r in parts):
    def unmerge(theta, phi):
      for mask, r in reversed(parts):
        theta = r.unmerge(theta, restrict(theta, phi, mask))
      return theta

  return Reparam(init=init, apply=apply, init_with_base=lambda key, theta0: (theta0, init(key, theta0)),
                 unmerge=unmerge, config=PerModule(tuple(r.config for _, r in parts)))


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
  if method.uses_shared or method.insert is not None or method.init_leaf is None:
    raise ValueError(f"{method.name}: adapt_with_bias takes per-leaf methods only (no "
                     f"init_shared, prepare or insert); use adapt")
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
