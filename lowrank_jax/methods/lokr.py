"""KronA / LoKr: Kronecker-product adaptation.

Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter",
arXiv 2212.10650; LoKr as in LyCORIS (KohakuBlueleaf) and peft's ``LoKrConfig``.

The update is a Kronecker product of a small and a large factor::

    ΔW = s · W1 ⊗ W2,    W1 [in_m, out_l],  W2 [in_n, out_k],   s = alpha / r

(Flax layout ``[in, out]``: ``in = in_m·in_n``, ``out = out_l·out_k``; peft stores
the transposes ``lokr_w1 [out_l, in_m]``, ``lokr_w2 [out_k, in_n]``.) The shapes come
from peft's ``factorization(dim, factor)``. ``W2`` (and, with ``decompose_both``,
``W1``) is low-rank ``W = W_b @ W_a`` when ``r < max(its dims) / 2`` (peft's
``use_w1``/``use_w2`` rule).

Lazy product (never forming the ``[in, out]`` ``ΔW``), with ``X = x.reshape(in_m, in_n)``::

    x @ (W1 ⊗ W2) = (W1ᵀ X W2).reshape(out)

i.e. the row-major identity ``(A ⊗ B) vec(X) = vec(A X Bᵀ)`` of the paper, at a cost of
``in_m·in_n·out_k + in_m·out_l·out_k`` per row (with low-rank factors contracted in
turn) instead of ``in·out``.

Our parameter names are peft's with the same letter transposed: ``w1 = lokr_w1.T``,
``w1_a = lokr_w1_a.T [r, out_l]``, ``w1_b = lokr_w1_b.T [in_m, r]`` (so ``W1 = w1_b @
w1_a``), and likewise for ``w2``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["KronWeight", "factorization", "lokr", "lokr_method", "lokr_shapes"]


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
  """Splits ``dim = m · n`` by peft's rule.

  With ``factor > 0`` dividing ``dim`` returns ``(factor, dim // factor)`` (as peft,
  not sorted). Otherwise, with ``m <= n``,
  walks the divisors ``m`` of ``dim`` upward while ``m < n = dim / m``, stopping before
  a divisor larger than ``factor`` (``-1``: no limit), so without a limit it returns
  the divisor pair closest to ``√dim``: 256 -> (16, 16), 128 -> (8, 16),
  127 -> (1, 127), (128, 4) -> (4, 32), 48 -> (6, 8).
  """
  if dim < 1:
    raise ValueError(f"factorization needs a positive dimension, got {dim}")
  if factor > 0 and dim % factor == 0:
    return factor, dim // factor
  limit = dim if factor == -1 else factor
  m, n = 1, dim
  while m < n:
    new_m = m + 1
    while dim % new_m:
      new_m += 1
    new_n = dim // new_m
    if new_m > limit:
      break
    m, n = new_m, new_n
  return min(m, n), max(m, n)


def lokr_shapes(d_in: int, d_out: int, rank: int, decompose_both: bool = False,
                decompose_factor: int = -1) -> dict[str, Any]:
  """Factor shapes and the full/low-rank choice for a ``[d_in, d_out]`` weight.

  Returns:
    ``{"in": (in_m, in_n), "out": (out_l, out_k), "full_w1": bool, "full_w2": bool}``.
  """
  in_m, in_n = factorization(d_in, decompose_factor)
  out_l, out_k = factorization(d_out, decompose_factor)
  return {"in": (in_m, in_n), "out": (out_l, out_k),
          "full_w1": not (decompose_both and rank < max(out_l, in_m) / 2),
          "full_w2": not (rank < max(out_k, in_n) / 2)}


def _product(factors: Sequence[jax.Array]) -> jax.Array:
  out = factors[0]
  for f in factors[1:]:
    out = out @ f
  return out


@lazy.pytree_dataclass(static=("scale", "shape_"))
class KronWeight(lazy.BaseLazyWeight):
  """Lazy ``W0 + scale · W1 ⊗ W2``; ``W1 = prod(w1)``, ``W2 = prod(w2)`` (1 or 2 factors each)."""
  base: Any
  w1: tuple
  w2: tuple
  scale: float
  shape_: tuple[int, ...]

  def delta(self) -> jax.Array:
    return self.scale * jnp.kron(_product(self.w1), _product(self.w2))

  def kron_matmul(self, x: jax.Array) -> jax.Array:
    """``scale · x @ (W1 ⊗ W2)`` by the reshape identity, factors contracted in turn."""
    in_m, in_n = self.w1[0].shape[0], self.w2[0].shape[0]
    dt = self.w2[0].dtype
    t = x.astype(dt).reshape(*x.shape[:-1], in_m, in_n)
    for f in self.w2:           # contract in_n: [..., in_m, out_k]
      t = t @ f
    for f in self.w1:           # contract in_m: [..., out_l, out_k]
      t = jnp.einsum("...ik,ia->...ak", t, f)
    t = t.reshape(*x.shape[:-1], -1)
    return (self.scale * t).astype(x.dtype)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    return lazy.dot(x, self.base) + self.kron_matmul(x)


def _kaiming(key, fan_in: int, shape, dtype):
  bound = 1.0 / math.sqrt(fan_in)  # torch kaiming_uniform_(a=√5): U(±1/√fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def lokr_method(rank: int = 8, alpha: Optional[float] = None, *, decompose_both: bool = False,
                decompose_factor: int = -1, init: Literal["peft", "lycoris", "random"] = "peft",
                dtype=jnp.float32) -> LeafMethod:
  """The per-leaf LoKr method (see :func:`lokr`)."""
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"LoKr rank must be a positive int, got {rank!r}")
  if init not in ("peft", "lycoris", "random"):
    raise ValueError(f"unknown LoKr init {init!r}; expected peft, lycoris or random")
  scale = float(rank if alpha is None else alpha) / rank

  def init_leaf(key, path, w, view: MatrixView):
    sh = lokr_shapes(view.d_in, view.d_out, rank, decompose_both, decompose_factor)
    (in_m, in_n), (out_l, out_k) = sh["in"], sh["out"]
    k = jax.random.split(key, 4)
    # fan-ins are those of peft's [out, in] tensors: the trailing torch dimension.
    zero_w1 = init == "peft"
    zero_w2 = init == "lycoris"
    phi = {}
    if sh["full_w1"]:
      phi["w1"] = (jnp.zeros((in_m, out_l), dtype) if zero_w1 else _kaiming(k[0], in_m, (in_m, out_l), dtype))
    else:
      phi["w1_a"] = (jnp.zeros((rank, out_l), dtype) if zero_w1 else _kaiming(k[0], rank, (rank, out_l), dtype))
      phi["w1_b"] = _kaiming(k[1], in_m, (in_m, rank), dtype)
    if sh["full_w2"]:
      phi["w2"] = (jnp.zeros((in_n, out_k), dtype) if zero_w2 else _kaiming(k[2], in_n, (in_n, out_k), dtype))
    else:
      phi["w2_a"] = _kaiming(k[2], rank, (rank, out_k), dtype)
      phi["w2_b"] = (jnp.zeros((in_n, rank), dtype) if zero_w2 else _kaiming(k[3], in_n, (in_n, rank), dtype))
    return phi

  def factors(phi, name):
    return (phi[name],) if name in phi else (phi[name + "_b"], phi[name + "_a"])

  def apply_leaf(w, phi, view, rng):
    return KronWeight(base=w, w1=factors(phi, "w1"), w2=factors(phi, "w2"), scale=scale,
                      shape_=view.shape)

  def unmerge_leaf(w, phi, view):
    delta = scale * jnp.kron(_product(factors(phi, "w1")), _product(factors(phi, "w2")))
    return (w.astype(jnp.float32) - delta.astype(jnp.float32)).astype(w.dtype)

  return LeafMethod(name="LoKr", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf)


@configured("lokr")
def lokr(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
         decompose_both: bool = False, decompose_factor: int = -1,
         init: Literal["peft", "lycoris", "random"] = "peft", dtype=jnp.float32) -> Reparam:
  """LoKr on the 2-d leaves ``where`` selects: ``W = W0 + (alpha/r) W1 ⊗ W2``.

  Args:
    where: selection of the kernels to adapt.
    rank: ``r`` of the low-rank factors (and the scaling denominator).
    alpha: scaling numerator; defaults to ``r``.
    decompose_both: also make ``W1`` low-rank when ``r < max(its dims)/2``.
    decompose_factor: the ``factor`` of :func:`factorization` (``-1``: closest to √dim).
    init: ``"peft"`` (``W1 = 0``, the rest kaiming-uniform), ``"lycoris"`` (``W2 = 0``
      or ``w2_b = 0``, the rest kaiming-uniform) or ``"random"`` (all kaiming-uniform).
    dtype: dtype of the factors.

  Returns:
    A :class:`Reparam` producing :class:`KronWeight` leaves.
  """
  return adapt(lokr_method(rank, alpha, decompose_both=decompose_both,
                           decompose_factor=decompose_factor, init=init, dtype=dtype), where)
