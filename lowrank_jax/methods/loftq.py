"""LoftQ: quantization-aware low-rank initialisation of LoRA on a quantized base.

Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv 2310.08659. Starting from ``A_0 B_0 = 0``, alternate for ``T`` steps

    Q_t = q(W - A_{t-1} B_{t-1}),        A_t B_t = SVD_r(W - Q_t)

so that ``Q_T + A_T B_T`` approximates ``W`` better than ``q(W)`` alone. The frozen
base becomes the quantized ``Q_T`` (kept as a :class:`~lowrank_jax.quant.qlora.QuantizedWeight`)
and LoRA starts from ``A_T, B_T`` split as ``U sqrt(S)`` / ``sqrt(S) V^T`` and divided
by the LoRA scale, so that ``Q + s·a@b`` is the approximation (peft's LoftQ ignores
the scale, peft#1982). Quantizer: NF4 without double quantization by default, as peft.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.methods.lora import lora_method, lora_scale
from lowrank_jax.quant import codecs
from lowrank_jax.quant.qlora import QuantizedWeight
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["loftq_decompose", "loftq"]


def _svd_r(m: jax.Array, rank: int):
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def loftq_decompose(w: jax.Array, rank: int, num_iter: int = 1,
                    quantizer: Optional[Callable[[jax.Array], Any]] = None,
                    scale: float = 1.0):
  """LoftQ's alternating decomposition of a matrix ``w [in, out]``.

  Args:
    w: the weight.
    rank: LoRA rank ``r``.
    num_iter: ``T >= 1`` alternating steps.
    quantizer: ``x -> codec`` (a :class:`~lowrank_jax.quant.codecs.Codec`); default NF4,
      block 64, no DQ.
    scale: the LoRA scale ``s``; the factors satisfy ``Q + s·a@b ≈ w``.

  Returns:
    ``(codec, a [in, r], b [r, out])``.
  """
  if num_iter < 1:
    raise ValueError(f"LoftQ num_iter must be >= 1, got {num_iter}")
  if quantizer is None:
    quantizer = lambda x: codecs.encode(x, "nf4", block_size=64, double_quant=False)
  w32 = w.astype(jnp.float32)
  lowrank = jnp.zeros_like(w32)
  for _ in range(num_iter):
    q = quantizer((w32 - lowrank).astype(w.dtype))
    a, b = _svd_r(w32 - q.decode(jnp.float32), rank)
    lowrank = a @ b
  return q, a / scale, b


@configured("loftq")
def loftq(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
          num_iter: int = 1, codec: str = "nf4", block_size: int = 64,
          double_quant: bool = False, compute_dtype=None, rslora: bool = False,
          dtype=jnp.float32) -> Reparam:
  """LoRA with LoftQ initialisation on a quantized base (use :func:`lowrank_jax.initialize`).

  Returns a :class:`Reparam` whose ``init_with_base`` returns ``theta0`` with the
  selected leaves replaced by the quantized ``Q_T`` and LoRA factors ``(a, b)`` such
  that ``Q_T + s·a@b ≈ W``; ``apply`` is LoRA's.
  """
  base = lora_method(rank, alpha, rslora=rslora, dtype=dtype)
  s = lora_scale(rank, alpha, rslora)
  spec = codecs.get_codec(codec)

  def init_leaf(key, path, w, view: MatrixView):
    w_dense = lazy.materialize(w)
    quantizer = lambda x: spec.encode(x, block_size=block_size, double_quant=double_quant, name=path)
    q, a, b = loftq_decompose(view.to_matrix(w_dense), rank, num_iter, quantizer, s)
    return QuantizedWeight(q=q, compute_dtype=compute_dtype), {"a": a.astype(dtype), "b": b.astype(dtype)}

  method = LeafMethod(name="LoftQ", init_leaf=init_leaf, apply_leaf=base.apply_leaf,
                      unmerge_leaf=None, rewrites_base=True, validate=base.validate)
  return adapt(method, where)
