"""DoRA: weight-decomposed low-rank adaptation.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353.

The adapted weight splits into a trainable magnitude ``m`` and a LoRA-updated
direction, normalised per output unit (Flax layout ``[in, out]``: per column)::

    V = W0 + s A B,        W = m ⊙ V / ||V||_c,     ||V||_c[o] = sqrt(sum_i V[i, o]^2)

with ``s = alpha / r`` (or ``alpha / sqrt(r)``). As in the paper (§4.3) and in peft,
the norm ``||V||_c`` is treated as a constant in the backward pass (detached).
``m`` is initialised to ``||W0 + s A B||_c``, i.e. ``||W0||_c`` since ``B = 0``, so
the adapted model starts equal to the base.

Lazy form (:class:`DoRAWeight`)::

    x @ W = (m / ||V||_c) ⊙ (x @ W0 + s (x @ A) @ B)

and the norm is computed without forming ``W0 + s A B`` (the ``[in, out]`` update)::

    ||V||_c^2 = ||W0||_c^2 + 2 s · colsum((Aᵀ W0) ⊙ B) + s^2 · colsum(((AᵀA) B) ⊙ B)

which costs ``O(in·out·r)`` flops and ``O(r·out)`` memory; ``||W0||_c^2`` is a constant.
So a DoRA step costs a LoRA step plus an ``[out]``-vector scale of the output and
this norm (no dense ``ΔW`` in the forward or the backward).

With dropout (training, ``rng`` given) we follow peft: the input of the adapter and of
the rescaled base term is dropped, ``y = x W0 + (m/n - 1) ⊙ (drop(x) W0) +
(m/n) ⊙ s (drop(x) A) B``.

Layout and peft names: ``a [in, r]`` = ``lora_A.weight.T``, ``b [r, out]`` =
``lora_B.weight.T``, ``m [out]`` = ``lora_magnitude_vector``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, ops, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.methods.lora import Init, LoRAWeight, lora_method, lora_scale
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["DoRAWeight", "dora", "dora_method", "dora_column_norm"]


def dora_column_norm(w0: jax.Array, a: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
  """``||W0 + scale · a @ b||`` per output column, without forming ``a @ b``.

  Args:
    w0: ``[in, out]`` base weight (dense).
    a: ``[in, r]``; b: ``[r, out]``.
    scale: the LoRA scaling ``s``.

  Returns:
    ``[out]`` float32 norms, ``sqrt(||W0||^2 + 2 s colsum((aᵀW0) ⊙ b) + s^2 colsum((aᵀa b) ⊙ b))``.
  """
  w0 = w0.astype(jnp.float32)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  base_sq = jnp.sum(w0 * w0, axis=0)
  cross = jnp.sum((a.T @ w0) * b, axis=0)
  delta_sq = jnp.sum(((a.T @ a) @ b) * b, axis=0)
  sq = base_sq + 2.0 * scale * cross + (scale * scale) * delta_sq
  return jnp.sqrt(jnp.maximum(sq, 0.0))


@lazy.pytree_dataclass
class DoRAWeight(lazy.WrappingLazyWeight):
  """Lazy ``m ⊙ (W0 + s a b) / ||W0 + s a b||_c`` over a :class:`LoRAWeight`.

  ``lora`` carries the base (possibly itself lazy), the factors, the scale and the
  dropout; ``m`` is the ``[out]`` magnitude (``out`` = product of the output axes).
  """
  lora: LoRAWeight
  m: jax.Array
  inner = "lora"

  def column_norm(self) -> jax.Array:
    """The detached ``[out]`` norm ``||W0 + s a b||_c`` (a constant for ``jax.grad``)."""
    lw = self.lora
    w0 = lazy.materialize(lw.base).reshape(-1, self.m.shape[0])
    n = dora_column_norm(w0, lw.a, lw.b, lw.scale)
    return jax.lax.stop_gradient(n)

  def _col_scale(self) -> jax.Array:
    return self.m.astype(jnp.float32) / self.column_norm()

  def materialize(self) -> jax.Array:
    v = self.lora.materialize()
    v32 = v.astype(jnp.float32).reshape(-1, self.m.shape[0])
    return (v32 * self._col_scale()[None, :]).reshape(self.shape).astype(v.dtype)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    lw = self.lora
    scale = self._col_scale()
    if lw.dropout_rate > 0.0 and lw.rng is not None:
      xd = ops.dropout(x, lw.dropout_rate, lw.rng)
      base_x = lazy.dot(x, lw.base)
      base_d = lazy.dot(xd, lw.base)
      upd = lazy.factored_matmul(xd, lw.a, lw.b, lw.scale)
      out = base_x + (scale - 1.0).astype(base_d.dtype) * base_d + scale.astype(upd.dtype) * upd
      return out.astype(base_x.dtype)
    y = lw.matmul(x)
    return (y * scale.astype(y.dtype)).astype(y.dtype)


def dora_method(rank: int, alpha: Optional[float] = None, *, rslora: bool = False,
                init: Init = "kaiming", dropout: float = 0.0, dtype=jnp.float32,
                in_ndim: Any = None) -> LeafMethod:
  """The per-leaf DoRA method (see :func:`dora`): LoRA's leaf method plus ``m``."""
  base = lora_method(rank, alpha, rslora=rslora, init=init, dropout=dropout, dtype=dtype,
                     in_ndim=in_ndim)
  scale = lora_scale(rank, alpha, rslora)

  def init_leaf(key, path, w, view: MatrixView):
    out = base.init_leaf(key, path, w, view)
    new_w, phi = out if base.rewrites_base else (w, out)
    w0 = view.to_matrix(lazy.materialize(new_w))
    m = dora_column_norm(w0, phi["a"], phi["b"], scale).astype(dtype)
    phi = {"a": phi["a"], "b": phi["b"], "m": m}
    return (new_w, phi) if base.rewrites_base else phi

  def apply_leaf(w, phi, view, rng):
    lw = base.apply_leaf(w, {"a": phi["a"], "b": phi["b"]}, view, rng)
    return DoRAWeight(lora=lw, m=phi["m"])

  return LeafMethod(name="DoRA", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=None, rewrites_base=base.rewrites_base,
                    validate=base.validate, in_ndim=in_ndim)


@configured("dora")
def dora(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
         rslora: bool = False, init: Init = "kaiming", dropout: float = 0.0,
         dtype=jnp.float32, in_ndim: Any = None) -> Reparam:
  """DoRA on the leaves ``where`` selects: ``W = m ⊙ (W0 + s A B) / ||W0 + s A B||_c``.

  Args:
    where: selection of the weights to adapt.
    rank: LoRA rank ``r``.
    alpha: scaling numerator (``s = alpha / r``); defaults to ``r``.
    rslora: use ``s = alpha / sqrt(r)``.
    init: LoRA factor init (``"kaiming"``, ``"gaussian"``, ``"pissa"``, ``"olora"``);
      ``m`` always starts at the column norms of the initial ``W0 + s A B``.
    dropout: dropout on the adapter input (peft's DoRA dropout semantics).
    dtype: dtype of ``a``, ``b`` and ``m``.
    in_ndim: leading input axes of N-d weights.

  Returns:
    A :class:`Reparam` producing :class:`DoRAWeight` leaves. There is no ``unmerge``:
    the merged weight does not determine the pre-merge norm.
  """
  return adapt(dora_method(rank, alpha, rslora=rslora, init=init, dropout=dropout,
                           dtype=dtype, in_ndim=in_ndim), where)
