"""L4Q: quantization-aware LoRA that trains the *quantized merged* weight.

Jeon et al., "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
Models", arXiv 2402.04902. QLoRA trains an adapter on a quantized base and the merge
``W0 + s A B`` is no longer in the quantized grid; quantizing it afterwards loses what was
learned. L4Q instead trains through the quantizer of the merged weight:

    W   = W0 + s · A B                                  (LoRA, ``s = alpha / r``)
    Ŵ   = (clip(⌊W / S⌉ + Z, q_lo, q_hi) − Z) · S         (fake quantization)

with one learned step size ``S`` and zero point ``Z`` per group of ``group_size``
consecutive input rows and output column (the GPTQ / QA-LoRA layout of
:mod:`lowrank_jax.quant.affine`). Rounding uses the straight-through estimator
``⌊x⌉ ≈ x + stop_gradient(⌊x⌉ − x)`` and ``Z`` is rounded the same way, which gives the
LSQ / LSQ+ gradients (Esser et al., arXiv 1902.08153; Bhalgat et al., arXiv 2004.09576):

    ∂Ŵ/∂W = 1 inside the clip range, 0 outside
    ∂Ŵ/∂S = ⌊W/S⌉ − W/S inside, (q_clip − Z) outside
    ∂Ŵ/∂Z = 0 inside, −S outside

``S`` and ``Z`` start at the asymmetric min/max group quantization of ``W0`` (so at
initialisation the model is exactly the affine-quantized base), ``A`` Kaiming-uniform and
``B = 0`` as in LoRA. The deployed model, :func:`l4q_merge`, stores the integer codes of
``W`` with the learned ``S, Z``: its decode equals the training forward bit for bit, so
what was evaluated during training is what is shipped.

Cost: the frozen ``W0`` stays in the compute dtype and the merged weight is formed every
step (a quantizer has no factored matmul); the saving is at deployment (int4 weights).

    reparam = l4q(r"(query|value)/kernel", rank=8, alpha=16, group_size=32)
    phi = reparam.init(key, theta0)
    ...                                       # train phi (A, B, S, Z)
    deployed = l4q_merge(reparam.apply(theta0, phi))   # AffineQuant int4 leaves
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods.lora import _init_factors, lora_scale
from lowrank_jax.quant.affine import AffineQuant, _code_dtype, affine_encode
from lowrank_jax.quant.qlora import QuantizedWeight
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["L4QWeight", "l4q", "l4q_merge", "fake_quantize", "code_range"]


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
  """``(q_lo, q_hi)`` of signed (symmetric) or unsigned ``bits``-bit codes."""
  _code_dtype(bits, symmetric)  # validates bits
  return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def _ste_round(x: jax.Array) -> jax.Array:
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _grad_scale(x: jax.Array, g: float) -> jax.Array:
  """``x`` exactly in the forward pass, gradient multiplied by ``g`` (LSQ's step-size
  gradient scaling)."""
  return x


def _grad_scale_fwd(x, g):
  return x, None


def _grad_scale_bwd(g, _, ct):
  return (ct * g,)


_grad_scale.defvjp(_grad_scale_fwd, _grad_scale_bwd)


def _codes(w: jax.Array, scale: jax.Array, zero: jax.Array, group_size: int, lo: int, hi: int,
           round_fn) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(clip(round(w/S) + Z), S, Z)`` with ``S, Z`` repeated over the rows of a group."""
  s = jnp.repeat(scale, group_size, axis=0)
  z = jnp.repeat(round_fn(zero), group_size, axis=0)
  v = round_fn(w / s) + z
  # not jnp.clip: its gradient is 1/2 on the boundary, which integer codes hit exactly
  return jnp.where((v >= lo) & (v <= hi), v, jnp.clip(v, lo, hi)), s, z


def fake_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, *, group_size: int,
                  bits: int = 4, symmetric: bool = False) -> jax.Array:
  """``(clip(⌊w/S⌉ + ⌊Z⌉, q_lo, q_hi) − ⌊Z⌉) · S`` with straight-through rounding.

  Args:
    w: ``[in, out]`` float32 weight.
    scale, zero: ``[in / group_size, out]`` step sizes and zero points.
    group_size: input rows per group.
    bits, symmetric: the code format (see :func:`code_range`).
  """
  lo, hi = code_range(bits, symmetric)
  q, s, z = _codes(w, scale, zero, group_size, lo, hi, _ste_round)
  return (q - z) * s


@lazy.pytree_dataclass(static=("lora_scale", "group_size", "bits", "symmetric", "shape_",
                               "step_grad_scale", "log_scale"))
class L4QWeight(lazy.BaseLazyWeight):
  """Lazy fake-quantized merged weight ``Q(W0 + s a b)`` (materialised for every use)."""
  base: Any
  a: jax.Array
  b: jax.Array
  qscale: jax.Array
  zero: jax.Array
  lora_scale: float
  group_size: int
  bits: int
  symmetric: bool
  shape_: tuple[int, ...]
  step_grad_scale: float = 1.0
  log_scale: bool = False

  @property
  def step(self) -> jax.Array:
    """The step sizes ``S`` (``exp`` of the parameter in log-scale mode)."""
    return jnp.exp(self.qscale) if self.log_scale else self.qscale

  def merged_float(self) -> jax.Array:
    w0 = lazy.materialize(self.base).astype(jnp.float32)
    return w0 + self.lora_scale * (self.a @ self.b).astype(jnp.float32)

  def materialize(self) -> jax.Array:
    s = _grad_scale(self.qscale, self.step_grad_scale)
    s = jnp.exp(s) if self.log_scale else s
    z = _grad_scale(self.zero, self.step_grad_scale)
    w = fake_quantize(self.merged_float(), s, z, group_size=self.group_size, bits=self.bits,
                      symmetric=self.symmetric)
    return w.astype(self.base.dtype)

  def quantized(self) -> AffineQuant:
    """The integer codes of the merged weight with the learned ``S`` and ``⌊Z⌉``."""
    lo, hi = code_range(self.bits, self.symmetric)
    q, _, _ = _codes(self.merged_float(), self.step, self.zero, self.group_size, lo, hi,
                     jnp.round)
    return AffineQuant(q=q.astype(_code_dtype(self.bits, self.symmetric)),
                       scale=self.step.astype(jnp.float32),
                       zero=jnp.round(self.zero).astype(jnp.float32), shape=self.shape_,
                       dtype=self.base.dtype, bits=self.bits, symmetric=self.symmetric,
                       group_size=self.group_size)


def l4q(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
        group_size: int = 32, bits: int = 4, symmetric: bool = False,
        lsq_grad_scale: bool = False, log_scale: bool = True, dtype=jnp.float32) -> Reparam:
  """L4Q on the selected ``[in, out]`` kernels.

  Args:
    where: selection of the weights.
    rank: LoRA rank ``r``.
    alpha: LoRA scaling numerator (``s = alpha / r``; default ``r``).
    group_size: input rows per quantization group (must divide ``in``).
    bits: 4 (default) or 8.
    symmetric: signed codes with ``Z = 0`` (not trained); default asymmetric.
    lsq_grad_scale: multiply the gradients of ``S`` and ``Z`` by LSQ's
      ``1 / sqrt(group_size · q_hi)`` (meant for SGD; Adam is invariant to it).
    log_scale: train ``log S`` instead of ``S`` (default): an Adam step then changes
      ``S`` by a relative amount, whatever its magnitude, and ``S`` stays positive.
    dtype: dtype of the adapter factors and quantizer parameters.

  Returns:
    A :class:`Reparam`; ``phi`` per leaf is ``{"a", "b", "scale", "zero"}`` (``scale``
    holds ``log S`` in log-scale mode) and ``apply``
    gives :class:`L4QWeight` leaves; :func:`l4q_merge` turns them into int codes.
  """
  s = lora_scale(rank, alpha)
  lo, hi = code_range(bits, symmetric)
  g = 1.0 / (group_size * hi) ** 0.5 if lsq_grad_scale else 1.0

  def validate(path, view: MatrixView):
    if view.d_in % group_size:
      raise ValueError(f"L4Q: group_size {group_size} does not divide d_in={view.d_in} of leaf "
                       f"'{path}' (shape {view.shape})")
    if rank > min(view.d_in, view.d_out):
      raise ValueError(f"L4Q: rank {rank} exceeds min(d_in, d_out) = {min(view.d_in, view.d_out)} "
                       f"for leaf '{path}' of shape {view.shape}")

  def init_leaf(key, path, w, view):
    a, b, _ = _init_factors(key, w, view, rank, s, "kaiming", dtype)
    q = affine_encode(lazy.materialize(w), bits=bits, symmetric=symmetric, granularity="group",
                      group_size=group_size, name=path)
    scale = jnp.log(q.scale) if log_scale else q.scale
    return {"a": a, "b": b, "scale": scale.astype(dtype), "zero": q.zero.astype(dtype)}

  def apply_leaf(w, phi, view, rng):
    zero = jax.lax.stop_gradient(phi["zero"]) if symmetric else phi["zero"]
    return L4QWeight(base=w, a=phi["a"], b=phi["b"], qscale=phi["scale"], zero=zero,
                     lora_scale=s, group_size=group_size, bits=bits, symmetric=symmetric,
                     shape_=view.shape, step_grad_scale=g, log_scale=log_scale)

  return adapt(LeafMethod(name="L4Q", init_leaf=init_leaf, apply_leaf=apply_leaf,
                          validate=validate), where)


def l4q_merge(theta: Any, compute_dtype=None) -> Any:
  """Replaces every :class:`L4QWeight` of ``apply(theta0, phi)`` by the int codes of its
  merged weight (a :class:`QuantizedWeight` over :class:`AffineQuant`, decoded inside the
  matmul); its decode equals the training forward's weight exactly."""
  return jax.tree.map(lambda x: QuantizedWeight(q=x.quantized(), compute_dtype=compute_dtype)
                      if isinstance(x, L4QWeight) else x, theta, is_leaf=lazy.is_lazy)
