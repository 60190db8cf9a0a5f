"""QA-LoRA: quantization-aware LoRA whose merge stays exactly int4.

Xu et al., "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language
Models", arXiv 2309.14717. The base is group-wise int-b with one scale ``S`` and
zero ``Z`` per (group of ``L`` input rows, output column). The adapter sees the
*group-pooled* input, ``x̄_g = mean_{i in g} x_i``, so with ``a [in/L, r]``,
``b [r, out]``

    y = x · W_q + s · (x̄ a) b,        ΔW[i, j] = s (a b)[g(i), j] / L,

and ΔW is constant inside each group column: merging only moves the zero point,
``(q - Z) S + c = (q - (Z - c / S)) S`` with ``c = s (a b)[g, j] / L``, so the codes
``q`` are unchanged and the merged model is still int4 (``Z`` is kept in float32).
(peft's QA-LoRA multiplies the pooled input by ``in/L`` instead of dividing by ``L``:
a constant factor absorbed by the learning rate.)

    reparam = qalora(r"proj/kernel", rank=16, group_size=32)
    theta_q, phi = lowrank_jax.initialize(reparam, key, theta0)  # quantizes the base
    ...
    merged = qalora_merge(reparam.apply(theta_q, phi))           # still int4
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.methods.lora import lora_scale
from lowrank_jax.quant.affine import AffineQuant, affine_encode
from lowrank_jax.quant.qlora import QuantizedWeight
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["QALoRAWeight", "qalora", "qalora_merge", "group_pool"]


def group_pool(x: jax.Array, group_size: int) -> jax.Array:
  """Mean of consecutive groups of ``group_size`` features: ``[..., in] -> [..., in/L]``."""
  return jnp.mean(x.reshape(x.shape[:-1] + (x.shape[-1] // group_size, group_size)), axis=-1)


@lazy.pytree_dataclass(static=("scale", "group_size"))
class QALoRAWeight(lazy.WrappingLazyWeight):
  """Lazy ``x @ W_q + s (pool(x) @ a) @ b`` over an int-b group-quantized base."""
  base: QuantizedWeight
  a: jax.Array
  b: jax.Array
  scale: float
  group_size: int

  def delta(self) -> jax.Array:
    d = self.scale * (self.a @ self.b) / self.group_size
    return jnp.repeat(d, self.group_size, axis=0)

  def materialize(self) -> jax.Array:
    w = self.base.materialize()
    return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    return lazy.dot(x, self.base) + lazy.factored_matmul(
        group_pool(x, self.group_size), self.a, self.b, self.scale)

  def merged(self) -> QuantizedWeight:
    """The merged weight as int codes: same ``q``, zero point ``Z - s (a b)/(L S)``."""
    q: AffineQuant = self.base.q
    c = self.scale * (self.a @ self.b).astype(jnp.float32) / self.group_size
    new = AffineQuant(q=q.q, scale=q.scale, zero=q.zero - c / q.scale, shape=q.shape,
                      dtype=q.dtype, bits=q.bits, symmetric=q.symmetric, group_size=q.group_size)
    return QuantizedWeight(q=new, compute_dtype=self.base.compute_dtype)


@configured("qalora")
def qalora(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
           group_size: int = 32, bits: int = 4, symmetric: bool = False,
           compute_dtype=None, dtype=jnp.float32) -> Reparam:
  """QA-LoRA on the selected ``[in, out]`` kernels (use :func:`lowrank_jax.initialize`).

  Args:
    where: selection of the weights.
    rank: adapter rank.
    alpha: LoRA scaling numerator (``s = alpha / r``).
    group_size: ``L``, input rows per quantization group (must divide ``in``).
    bits: 4 (default) or 8.
    symmetric: zero point 0 (default: asymmetric, as GPTQ).
    compute_dtype: dtype of the decoded base inside the matmul.
    dtype: adapter dtype.

  Returns:
    A :class:`Reparam` that rewrites the selected base leaves to group-quantized
    :class:`QuantizedWeight` (already-quantized ``AffineQuant`` leaves with the same
    group size are kept) and applies :class:`QALoRAWeight`.
  """
  s = lora_scale(rank, alpha)

  def validate(path, view: MatrixView):
    if view.d_in % group_size:
      raise ValueError(f"QA-LoRA: group_size {group_size} does not divide d_in={view.d_in} of "
                       f"leaf '{path}' (shape {view.shape})")
    if rank > min(view.d_in // group_size, view.d_out):
      raise ValueError(f"QA-LoRA: rank {rank} exceeds min(d_in/L, d_out) for leaf '{path}'")

  def init_leaf(key, path, w, view):
    if isinstance(w, QuantizedWeight) and isinstance(w.q, AffineQuant) and w.q.group_size == group_size:
      base = w
    else:
      base = QuantizedWeight(q=affine_encode(lazy.materialize(w), bits=bits, symmetric=symmetric,
                                             granularity="group", group_size=group_size, name=path),
                             compute_dtype=compute_dtype)
    groups = view.d_in // group_size
    bound = 1.0 / math.sqrt(groups)
    a = jax.random.uniform(key, (groups, rank), dtype, -bound, bound)
    return base, {"a": a, "b": jnp.zeros((rank, view.d_out), dtype)}

  def apply_leaf(w, phi, view, rng):
    return QALoRAWeight(base=w, a=phi["a"], b=phi["b"], scale=s, group_size=group_size)

  method = LeafMethod(name="QA-LoRA", init_leaf=init_leaf, apply_leaf=apply_leaf,
                      rewrites_base=True, validate=validate)
  return adapt(method, where)


def qalora_merge(theta: Any) -> Any:
  """Replaces every :class:`QALoRAWeight` in ``apply(theta_q, phi)`` by its merged,
  still-integer :class:`QuantizedWeight`."""
  return jax.tree.map(lambda x: x.merged() if isinstance(x, QALoRAWeight) else x, theta,
                      is_leaf=lazy.is_lazy)
