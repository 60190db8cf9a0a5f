"""LoHa: low-rank Hadamard-product adaptation.

Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", arXiv 2108.06098; LoHa as in LyCORIS and peft's ``LoHaConfig``.

The update is the element-wise product of two rank-``r`` matrices, so its rank can
reach ``r²`` with ``2r(in + out)`` parameters. In Flax layout (``[in, out]``)::

    ΔW = s · (B1 A1) ⊙ (B2 A2),   B_k [in, r],  A_k [r, out],   s = alpha / r

Lazy product: a Hadamard product of low-rank matrices is low-rank through the
Khatri-Rao (row-wise Kronecker) products ``U = B1 ⊙_row B2 [in, r²]`` and
``V = A1 ⊙_col A2 [r², out]``: ``(B1 A1) ⊙ (B2 A2) = U V``, so
``x @ ΔW = s (x U) V`` via :func:`lowrank_jax.factored_matmul`, ``O(r² (in + out))``
per row. It is used when ``r² (in + out) < in · out``; otherwise the dense ``ΔW`` is
cheaper and the weight is materialised.

peft names, same letter transposed: ``w1_a = hada_w1_a.T [r, out]``, ``w1_b =
hada_w1_b.T [in, r]`` (``B1 A1 = w1_b @ w1_a``), likewise ``w2_*``. peft's init:
``w1_a, w1_b, w2_a`` kaiming-uniform (``U(±1/√fan_in)`` of the torch tensor), ``w2_b = 0``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["LoHaWeight", "loha", "loha_method", "khatri_rao_factors"]


def khatri_rao_factors(b1, a1, b2, a2) -> tuple[jax.Array, jax.Array]:
  """``(U [in, r1 r2], V [r1 r2, out])`` with ``U @ V = (b1 @ a1) ⊙ (b2 @ a2)``."""
  d_in, d_out = b1.shape[0], a1.shape[1]
  u = (b1[:, :, None] * b2[:, None, :]).reshape(d_in, -1)
  v = (a1[:, None, :] * a2[None, :, :]).reshape(-1, d_out)
  return u, v


@lazy.pytree_dataclass(static=("scale", "shape_"))
class LoHaWeight(lazy.BaseLazyWeight):
  """Lazy ``W0 + scale · (w1_b w1_a) ⊙ (w2_b w2_a)``."""
  base: Any
  w1_a: jax.Array
  w1_b: jax.Array
  w2_a: jax.Array
  w2_b: jax.Array
  scale: float
  shape_: tuple[int, ...]

  def delta(self) -> jax.Array:
    return self.scale * ((self.w1_b @ self.w1_a) * (self.w2_b @ self.w2_a))

  def factored_is_cheaper(self) -> bool:
    d_in, d_out = self.w1_b.shape[0], self.w1_a.shape[1]
    return self.w1_a.shape[0] * self.w2_a.shape[0] * (d_in + d_out) < d_in * d_out

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    if not self.factored_is_cheaper():
      return super().matrix_matmul(x)
    u, v = khatri_rao_factors(self.w1_b, self.w1_a, self.w2_b, self.w2_a)
    return lazy.dot(x, self.base) + lazy.factored_matmul(x, u, v, self.scale)


def _kaiming(key, fan_in: int, shape, dtype):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def loha_method(rank: int = 8, alpha: Optional[float] = None, *, dtype=jnp.float32) -> LeafMethod:
  """The per-leaf LoHa method (see :func:`loha`)."""
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"LoHa rank must be a positive int, got {rank!r}")
  scale = float(rank if alpha is None else alpha) / rank

  def init_leaf(key, path, w, view: MatrixView):
    k = jax.random.split(key, 3)
    d_in, d_out = view.d_in, view.d_out
    return {"w1_a": _kaiming(k[0], rank, (rank, d_out), dtype),
            "w1_b": _kaiming(k[1], d_in, (d_in, rank), dtype),
            "w2_a": _kaiming(k[2], rank, (rank, d_out), dtype),
            "w2_b": jnp.zeros((d_in, rank), dtype)}

  def apply_leaf(w, phi, view, rng):
    return LoHaWeight(base=w, scale=scale, shape_=view.shape, **phi)

  def unmerge_leaf(w, phi, view):
    delta = LoHaWeight(base=w, scale=scale, shape_=view.shape, **phi).delta()
    return (w.astype(jnp.float32) - delta.astype(jnp.float32)).astype(w.dtype)

  return LeafMethod(name="LoHa", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf)


@configured("loha")
def loha(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
         dtype=jnp.float32) -> Reparam:
  """LoHa on the 2-d leaves ``where`` selects: ``W = W0 + (alpha/r) (B1 A1) ⊙ (B2 A2)``.

  Args:
    where: selection of the kernels to adapt.
    rank: ``r`` of each Hadamard factor.
    alpha: scaling numerator; defaults to ``r``.
    dtype: dtype of the factors.

  Returns:
    A :class:`Reparam` producing :class:`LoHaWeight` leaves.
  """
  return adapt(loha_method(rank, alpha, dtype=dtype), where)
