"""Per-matrix methods on stacks of matrices: one independent adaptation per expert.

A mixture-of-experts layer keeps its experts as one 3-d leaf ``[E, in, out]``
(:mod:`lowrank_jax.models.decoder`). ``lj.lora(where, in_ndim=...)`` sees such a leaf as
*one* matrix (``[E in, out]`` or ``[E, in out]``), so all experts share one pair of
factors. :func:`batched` lifts any per-matrix :class:`~lowrank_jax.reparam.LeafMethod`
to a stack instead: leaf ``[E, in, out]`` gets ``E`` independent adaptations (the
method's parameters gain a leading ``E`` axis, e.g. LoRA's ``a [E, in, r]``,
``b [E, r, out]``), computed with :func:`jax.vmap`; 2-d leaves are adapted as usual, so
one reparam covers attention kernels and expert stacks alike. This is peft's layout for
``target_parameters`` on expert stacks (``ParamWrapper``: a rank-``r`` LoRA per expert).

The result of ``apply`` on a stack is a :class:`BatchedWeight`: ``materialize()`` gives
the dense ``[E, in, out]`` stack; ``ragged_matmul(x, group_sizes)`` multiplies rows
sorted by expert (the decoder's grouped expert matmul) and keeps LoRA-form weights
(``base + scale a b``) factored: ``ragged(x, W0) + s ragged(ragged(x, A), B)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Literal, Mapping, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.methods.lora import lora_method, lora_scale
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["BatchedWeight", "batched", "batched_lora"]


@lazy.pytree_dataclass(static=("shape_",))
class BatchedWeight(lazy.LazyWeight):
  """A stack ``[E, in, out]`` of per-matrix (possibly lazy) weights: ``inner`` is the
  method's result for one matrix with every array leaf carrying a leading ``E`` axis."""
  inner: Any
  shape_: tuple[int, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return self.shape_

  @property
  def dtype(self):
    return self.inner.dtype

  def materialize(self) -> jax.Array:
    return jax.vmap(lambda w: lazy.materialize(w))(self.inner)

  def matmul(self, x: jax.Array) -> jax.Array:
    """``x[e] @ W[e]`` for ``x`` of shape ``[E, ..., in]`` (each expert its own rows)."""
    if x.shape[0] != self.shape_[0]:
      raise ValueError(f"batched matmul: input {x.shape} does not lead with the {self.shape_[0]} matrices")
    return jax.vmap(lazy.dot)(x, self.inner)

  def ragged_matmul(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x_n @ W[e(n)]`` for ``x [N, in]`` sorted by matrix, ``group_sizes[e]`` rows each."""
    w = self.inner
    factored = (all(hasattr(w, n) for n in ("base", "a", "b", "scale")) and not lazy.is_lazy(w.base)
                and getattr(w, "dropout_rate", 0.0) == 0.0)
    if not factored:
      return jax.lax.ragged_dot(x, self.materialize().astype(x.dtype), group_sizes)
    y = jax.lax.ragged_dot(x, w.base.astype(x.dtype), group_sizes)
    h = jax.lax.ragged_dot(x.astype(w.a.dtype), w.a, group_sizes)
    h = jax.lax.ragged_dot(h * jnp.asarray(w.scale, h.dtype), w.b, group_sizes)
    return y + h.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Batched(LeafMethod):
  """A :class:`LeafMethod` whose 3-d leaves are stacks of ``[in, out]`` matrices."""
  inner: Optional[LeafMethod] = None
  for_path: Optional[Callable[[str], LeafMethod]] = None

  def view(self, path: str, w) -> MatrixView:
    shape = tuple(w.shape)
    if len(shape) == 3:
      return MatrixView(shape, 2)
    return self.inner.view(path, w)


def _matrix_view(view: MatrixView) -> MatrixView:
  return MatrixView(view.shape[1:], 1)


def batched(method: LeafMethod, for_path: Optional[Callable[[str], LeafMethod]] = None) -> LeafMethod:
  """``method`` on 2-d leaves as before and, independently per matrix, on 3-d leaves
  ``[E, in, out]`` (see the module docstring). Methods with shared parameters, insertions
  or base rewrites are not supported.

  ``for_path(path)``, if given, picks the method that validates and initialises each leaf
  (e.g. LoRA of another rank at the same scale); ``method`` applies and unmerges them all.
  """
  if method.uses_shared or method.insert is not None or method.rewrites_base:
    raise NotImplementedError(f"batched({method.name}): only plain per-leaf methods can be batched")
  pick = for_path or (lambda path: method)

  def stacked(view):
    return len(view.shape) == 3

  def validate(path, view):
    m = pick(path)
    if m.validate is not None:
      m.validate(path, _matrix_view(view) if stacked(view) else view)

  def init_leaf(key, path, w, view):
    m = pick(path)
    if not stacked(view):
      return m.init_leaf(key, path, w, view)
    mv = _matrix_view(view)
    keys = jax.random.split(key, view.shape[0])
    return jax.vmap(lambda k, wi: m.init_leaf(k, path, wi, mv))(keys, lazy.materialize(w))

  def apply_leaf(w, phi, view, rng):
    if not stacked(view):
      return method.apply_leaf(w, phi, view, rng)
    if lazy.is_lazy(w):
      raise NotImplementedError(f"batched({method.name}): the expert stack must be a dense array, "
                                f"got {type(w).__name__}")
    mv = _matrix_view(view)
    if rng is None:
      inner = jax.vmap(lambda wi, p: method.apply_leaf(wi, p, mv, None))(w, phi)
    else:
      keys = jax.random.split(rng, view.shape[0])
      inner = jax.vmap(lambda wi, p, k: method.apply_leaf(wi, p, mv, k))(w, phi, keys)
    return BatchedWeight(inner=inner, shape_=tuple(view.shape))

  unmerge = None
  if method.unmerge_leaf is not None:
    def unmerge(w, phi, view):
      if not stacked(view):
        return method.unmerge_leaf(w, phi, view)
      mv = _matrix_view(view)
      return jax.vmap(lambda wi, p: method.unmerge_leaf(wi, p, mv))(w, phi)

  return _Batched(name=f"{method.name} (per matrix)", init_leaf=init_leaf, apply_leaf=apply_leaf,
                  unmerge_leaf=unmerge, needs_matrix=True, validate=validate, in_ndim=method.in_ndim,
                  inner=method, for_path=for_path)


@configured("batched_lora")
def batched_lora(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
                 rslora: bool = False, init: Literal["kaiming", "gaussian", "zeros"] = "kaiming",
                 dtype=jnp.float32, rank_pattern: Optional[Mapping[str, int]] = None) -> Reparam:
  """LoRA with one rank-``r`` pair per matrix of 3-d ``[E, in, out]`` leaves (mixture-of-
  experts stacks), and ordinary LoRA on 2-d leaves: ``W_e = W0_e + s A_e B_e``,
  ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``).

  Args:
    where: the leaves to adapt (e.g. ``r"(q_proj|v_proj|experts/.*)/kernel"``).
    rank, alpha, rslora, init, dtype: as :func:`lowrank_jax.lora` (no dropout: the
      factored grouped matmul has none, as peft's expert LoRA).
    rank_pattern: ``{regex: rank}``; a leaf whose path the regex matches (``re.search``,
      first match wins) gets that rank at the *same* scale ``s`` (peft's fused expert
      stacks: twice the rank and twice ``alpha``).

  Returns:
    A :class:`~lowrank_jax.reparam.Reparam`; ``phi`` at a stack is ``{"a": [E, in, r],
    "b": [E, r, out]}``.
  """
  base = lora_method(rank, alpha, rslora=rslora, init=init, dtype=dtype)
  if not rank_pattern:
    return adapt(batched(base), where)
  scale = lora_scale(rank, alpha, rslora)
  root = (lambda r: r ** 0.5) if rslora else (lambda r: r)
  methods = {r: lora_method(r, scale * root(r), rslora=rslora, init=init, dtype=dtype)
             for r in set(rank_pattern.values())}
  patterns = [(re.compile(rx), r) for rx, r in rank_pattern.items()]

  def for_path(path: str) -> LeafMethod:
    return next((methods[r] for rx, r in patterns if rx.search(path)), base)

  return adapt(batched(base, for_path), where)
