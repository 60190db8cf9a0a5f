"""Lazy weights: pytree leaves that know how to multiply an input without being formed.

A method's ``apply`` may return, instead of a dense array, a *lazy weight*: a
registered pytree node (a low-rank update over a base, an NF4-coded weight, a
Kronecker product...). The protocol is :class:`LazyWeight`, an abstract base class:

* ``shape``, ``dtype`` - those of the dense weight it stands for (abstract);
* ``materialize()`` - the dense ``W`` (abstract; used by merge and by any model that
  is not ours);
* ``matmul(x)`` - ``x @ W`` for ``W`` in Flax layout ``[in, out]`` (contracting the
  last axis of ``x``). It is written once, here: it checks that ``W`` is a matrix and
  that ``x``'s feature size matches (a clear error otherwise, whatever the subclass),
  then calls ``matrix_matmul(x)``, which subclasses override with their factored
  product (default: materialise, then multiply);
* ``delta()`` - for additive weights (:class:`BaseLazyWeight`), ``W - base``; their
  ``materialize()`` is then ``base + delta()``.

Our models' dense layers multiply through :func:`dot`, which dispatches on the leaf
type. Any other consumer can call :func:`materialize` on the tree, and lazy weights
also implement ``__jax_array__`` so that ``jnp.asarray(w)`` (what Flax ``Dense`` and
``nnx.Linear`` do with their kernel) materialises them transparently.

Only public JAX APIs are used (``jax.tree_util.register_dataclass``); nothing here
intercepts or patches JAX primitives, unlike qax/lorax.

The factored product ``s * (x @ A) @ B`` that LoRA-like methods share lives here
once, as :func:`factored_matmul`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import ops

PyTree = Any

__all__ = [
  "LazyWeight",
  "dot",
  "materialize",
  "factored_matmul",
  "merged_lowrank_matmul",
  "pytree_dataclass",
  "is_lazy",
]


def pytree_dataclass(cls=None, *, static: tuple[str, ...] = ()):
  """Frozen dataclass registered as a pytree; fields named in ``static`` are aux data."""
  def wrap(c):
    c = dataclasses.dataclass(frozen=True)(c)
    names = [f.name for f in dataclasses.fields(c)]
    data = [n for n in names if n not in static]
    meta = [n for n in names if n in static]
    return jax.tree_util.register_dataclass(c, data_fields=data, meta_fields=meta)
  return wrap if cls is None else wrap(cls)


class LazyWeight(abc.ABC):
  """Abstract base of lazy weights (subclasses are :func:`pytree_dataclass` es).

  A subclass must define ``shape``, ``dtype`` and ``materialize()`` (it cannot be
  instantiated otherwise) and may override ``matrix_matmul(x)`` with a product that
  never forms ``W``. A matrix weight does not override :meth:`matmul`, the checked entry
  point that :func:`dot` calls; only a weight that is not one matrix and defines its own
  product does (a stack of expert matrices, :class:`lowrank_jax.methods.batched.BatchedWeight`:
  ``x[e] @ W[e]``).
  """

  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, ...]:
    """Shape of the dense weight."""

  @property
  @abc.abstractmethod
  def dtype(self):
    """dtype of the dense weight."""

  @abc.abstractmethod
  def materialize(self) -> jax.Array:
    """The dense weight, ``shape`` and ``dtype`` as declared."""

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def matmul(self, x: jax.Array) -> jax.Array:
    """``x @ W`` with ``W`` a matrix ``[in, out]``: the checks, then :meth:`matrix_matmul`.

    Raises:
      ValueError naming both shapes when ``W`` is not a matrix or ``x.shape[-1] != in``.
    """
    _check_matmul(x, self.shape)
    return self.matrix_matmul(x)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    """``x @ W`` for a matrix weight whose input size matches ``x`` (checked by
    :meth:`matmul`). Default: materialise, then one dense matmul."""
    return _dense_matmul(x, self.materialize())

  def __jax_array__(self):
    return self.materialize()

  def astype(self, dtype):
    return self.materialize().astype(dtype)


class BaseLazyWeight(LazyWeight):
  """A lazy weight built on a frozen ``base`` (array or lazy): its shape is the static
  field ``shape_`` and its dtype the base's. Subclasses add their factors, override
  ``matrix_matmul(x)`` with their factored product, and define either ``delta()``
  (additive methods: ``materialize()`` is then ``base + delta()``) or ``materialize()``
  itself; a subclass defining neither is refused when the class is created."""

  def __init_subclass__(cls, **kw):
    super().__init_subclass__(**kw)
    if cls.delta is BaseLazyWeight.delta and cls.materialize is BaseLazyWeight.materialize:
      raise TypeError(f"{cls.__name__}: a BaseLazyWeight defines delta() (additive) or "
                      f"materialize()")

  @property
  def shape(self) -> tuple[int, ...]:
    return self.shape_

  @property
  def dtype(self):
    return self.base.dtype

  def delta(self) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} is not additive: it implements materialize()")

  def materialize(self) -> jax.Array:
    """``base + delta()``, summed in float32, in the base's dtype."""
    w0 = materialize(self.base)
    return (w0.astype(jnp.float32) + self.delta().astype(jnp.float32)).astype(w0.dtype)


class WrappingLazyWeight(LazyWeight):
  """A lazy weight with the shape and dtype of the field named by ``inner`` (e.g. a
  quantized ``base``, or the LoRA weight a DoRA weight rescales)."""
  inner: ClassVar[str] = "base"

  @property
  def shape(self) -> tuple[int, ...]:
    return getattr(self, self.inner).shape

  @property
  def dtype(self):
    return getattr(self, self.inner).dtype


def is_lazy(x) -> bool:
  return isinstance(x, LazyWeight)


def _check_matmul(x: jax.Array, shape: tuple[int, ...]) -> None:
  if len(shape) != 2:
    raise ValueError(f"dot expects a matrix weight [in, out], got shape {tuple(shape)}")
  if x.shape[-1] != shape[0]:
    raise ValueError(f"dot: input feature size {x.shape[-1]} (input shape {tuple(x.shape)}) does "
                     f"not match weight {tuple(shape)}")


def _dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  _check_matmul(x, w.shape)
  return jnp.matmul(x, w.astype(x.dtype) if w.dtype != x.dtype else w)


def dot(x: jax.Array, w) -> jax.Array:
  """``x @ w`` for a dense ``[in, out]`` array or any lazy weight (the dispatch)."""
  if isinstance(w, LazyWeight):
    return w.matmul(x)
  return _dense_matmul(x, w)


def materialize(tree: PyTree) -> PyTree:
  """Replaces every lazy weight in ``tree`` by its dense value."""
  return jax.tree.map(lambda x: x.materialize() if isinstance(x, LazyWeight) else x,
                      tree, is_leaf=is_lazy)


def factored_matmul(x: jax.Array, a: jax.Array, b: jax.Array, scale: Any = 1.0,
                    dropout_rate: float = 0.0, rng: Optional[jax.Array] = None) -> jax.Array:
  """``scale * (drop(x) @ a) @ b`` in the adapter dtype, returned in ``x.dtype``.

  ``a`` is ``[in, r]`` and ``b`` is ``[r, out]``; the ``[in, out]`` product is never
  formed, so the cost is ``O(r (in + out))`` per row instead of ``O(in out)``.
  """
  xa = ops.dropout(x.astype(a.dtype), dropout_rate, rng)
  h = jnp.matmul(xa, a)
  if not (isinstance(scale, float) and scale == 1.0):
    h = h * scale
  return jnp.matmul(h, b).astype(x.dtype)


@jax.custom_vjp
def merged_lowrank_matmul(x: jax.Array, w0: jax.Array, a: jax.Array, b: jax.Array,
                          scale: jax.Array) -> jax.Array:
  """``x @ (w0 + scale * a @ b)`` with the low-rank gradients computed in factored form.

  Forward and input gradient go through the merged ``[in, out]`` matrix (one GEMM each,
  instead of a GEMM plus two rank-``r`` matmuls, which XLA:CPU runs far below its GEMM
  throughput); the merged matrix is formed again in the backward pass, not stored.
  ``dA = s xᵀ (g Bᵀ)`` and ``dB = s (x A)ᵀ g`` are rank-``r`` products. The dense
  ``dW0 = xᵀ g`` is returned for correctness when ``w0`` is differentiated; under ``jit``
  XLA removes it when nothing uses it (a frozen base). ``scale`` gets no gradient.
  """
  return jnp.matmul(x, _merge(x, w0, a, b, scale))


def _merge(x, w0, a, b, scale):
  w = w0.astype(jnp.float32) + scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
  return w.astype(x.dtype)


def _merged_fwd(x, w0, a, b, scale):
  return merged_lowrank_matmul(x, w0, a, b, scale), (x, w0, a, b, scale)


def _merged_bwd(res, g):
  x, w0, a, b, scale = res
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  dx = jnp.matmul(g, _merge(x, w0, a, b, scale).T)
  gb = jnp.matmul(g2.astype(b.dtype), b.T)                       # [N, r]
  da = (scale * jnp.matmul(x2.astype(a.dtype).T, gb)).astype(a.dtype)
  xa = jnp.matmul(x2.astype(a.dtype), a)                          # [N, r]
  db = (scale * jnp.matmul(xa.T, g2.astype(b.dtype))).astype(b.dtype)
  dw0 = jnp.matmul(x2.T, g2).astype(w0.dtype)
  return dx, dw0, da, db, jnp.zeros_like(scale)


merged_lowrank_matmul.defvjp(_merged_fwd, _merged_bwd)
