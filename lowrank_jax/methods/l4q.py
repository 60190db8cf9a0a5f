"""L4Q: quantization-aware LoRA that trains the *quantized merged* weight.

Jeon et al., "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
Models", arXiv 2402.04902. QLoRA trains an adapter on a quantized base and the merge
``W0 + s A B`` is no longer in the quantized grid; quantizing it afterwards loses what was
learned. L4Q instead trains through the quantizer of the merged weight:

    W   = W0 + s · A B                                  (LoRA, ``s = alpha / r``)
    Ŵ   = (clip(⌊W / S + Z⌉, q_lo, q_hi) − Z) · S         (fake quantization)

with one learned step size ``S`` and zero point ``Z`` per group of ``group_size``
consecutive input rows and output column (the GPTQ / QA-LoRA layout of
:mod:`lowrank_jax.quant.affine`). ``Z`` is a float: LSQ+'s learned offset ``β = −Z S``
(``integer_zero=True`` rounds it, for integer-zero-point kernels). Rounding uses the
straight-through estimator ``⌊x⌉ ≈ x + stop_gradient(⌊x⌉ − x)``, which gives the LSQ /
LSQ+ gradients (Esser et al., arXiv 1902.08153; Bhalgat et al., arXiv 2004.09576); with
``v = W/S + Z`` and ``q = clip(⌊v⌉)``:

    ∂Ŵ/∂W = 1 inside the clip range, 0 outside
    ∂Ŵ/∂S = ⌊v⌉ − v inside, q − Z outside
    ∂Ŵ/∂Z = 0 inside, −S outside

``S`` and ``Z`` start at the asymmetric (or symmetric) min/max group quantization of ``W0``,
``(S0, Z0)`` of :func:`~lowrank_jax.quant.affine.affine_encode`, and ``phi`` holds their
offsets from it: ``S = S0 · exp(u)`` (or ``S0 + u``) and ``Z = Z0 + dz``, with ``u = dz = 0``
at init, ``A`` Kaiming-uniform and ``B = 0`` as in LoRA. So at initialisation the model is
exactly the affine-quantized base, and weight decay pulls the quantizer towards the min/max
one rather than towards ``S = 1, Z = 0``. ``(S0, Z0)`` is recomputed from the frozen ``W0``
in every forward (a min/max per group). The deployed model, :func:`l4q_merge`, stores the
integer codes of ``W`` with the learned ``S, Z``: its decode equals the training forward bit
for bit, so what was evaluated during training is what is shipped.

When it helps: QAT minimises the *output* error of the quantized model, quantize-after-
training the weight error. With isotropic inputs nearest rounding of the float solution is
already the best grid point, and L4Q is not better there (about 1.1-1.2x the loss on the
synthetic regression of the tests); with correlated inputs, as activations are, it is (about
0.5-0.7x the loss of LoRA trained in float, merged and quantized to int4 g16).

Cost: the frozen ``W0`` stays in the compute dtype and the merged weight is formed every
step (a quantizer has no factored matmul); the saving is at deployment (int4 weights).

    reparam = l4q(r"(query|value)/kernel", rank=8, alpha=16, group_size=32)
    phi = reparam.init(key, theta0)
    ...                                       # train phi (A, B and the offsets of S, Z)
    deployed = l4q_merge(reparam.apply(theta0, phi))   # AffineQuant int4 leaves
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.methods.lora import init_factors, lora_scale
from lowrank_jax.quant.affine import AffineQuant, affine_encode, code_dtype
from lowrank_jax.quant.qlora import QuantizedWeight
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["L4QWeight", "l4q", "l4q_merge", "fake_quantize", "code_range", "minmax_quantizer"]


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
  """``(q_lo, q_hi)`` of signed (symmetric) or unsigned ``bits``-bit codes."""
  code_dtype(bits, symmetric)  # validates bits
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
           round_fn, integer_zero: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(clip(⌊w/S + Z⌉), S, Z)`` with ``S, Z`` repeated over the rows of a group.

  ``⌊w/S + Z⌉`` is evaluated as ``⌊w/S + (Z − ⌊Z⌉)⌉ + ⌊Z⌉``: the same value, but for an
  integer ``Z`` it is exactly affine's ``⌊w/S⌉ + Z`` (no float32 rounding of ``w/S + Z``).
  With ``integer_zero`` the zero point itself is rounded (straight-through).
  """
  s = jnp.repeat(scale, group_size, axis=0)
  z = jnp.repeat(round_fn(zero) if integer_zero else zero, group_size, axis=0)
  zi = jax.lax.stop_gradient(jnp.round(z))
  v = round_fn(w / s + (z - zi)) + zi
  # not jnp.clip: its gradient is 1/2 on the boundary, which integer codes hit exactly
  return jnp.where((v >= lo) & (v <= hi), v, jnp.clip(v, lo, hi)), s, z


def fake_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, *, group_size: int,
                  bits: int = 4, symmetric: bool = False, integer_zero: bool = False) -> jax.Array:
  """``(clip(⌊w/S + Z⌉, q_lo, q_hi) − Z) · S`` with straight-through rounding.

  Args:
    w: ``[in, out]`` float32 weight.
    scale, zero: ``[in / group_size, out]`` step sizes and zero points.
    group_size: input rows per group.
    bits, symmetric: the code format (see :func:`code_range`).
    integer_zero: use ``⌊Z⌉`` (straight-through) instead of ``Z``.
  """
  lo, hi = code_range(bits, symmetric)
  q, s, z = _codes(w, scale, zero, group_size, lo, hi, _ste_round, integer_zero)
  return (q - z) * s


def minmax_quantizer(w0: jax.Array, *, group_size: int, bits: int = 4,
                     symmetric: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(S0, Z0)``, ``[in / group_size, out]``: affine min/max group quantization of ``w0``
  (the quantizer L4Q starts from)."""
  q = affine_encode(w0, bits=bits, symmetric=symmetric, granularity="group",
                    group_size=group_size)
  return jax.lax.stop_gradient(q.scale), jax.lax.stop_gradient(q.zero)


@lazy.pytree_dataclass(static=("lora_scale", "group_size", "bits", "symmetric", "shape_",
                               "step_grad_scale", "log_scale", "integer_zero"))
class L4QWeight(lazy.BaseLazyWeight):
  """Lazy fake-quantized merged weight ``Q(W0 + s a b)`` (materialised for every use).

  ``dscale`` is ``u`` (``S = S0 exp(u)``, or ``S0 + u`` without ``log_scale``) and ``dzero``
  is ``Z − Z0`` (``None``: symmetric, ``Z = 0``), with ``(S0, Z0)`` from
  :func:`minmax_quantizer` of the base.
  """
  base: Any
  a: jax.Array
  b: jax.Array
  dscale: jax.Array
  dzero: Optional[jax.Array]
  lora_scale: float
  group_size: int
  bits: int
  symmetric: bool
  shape_: tuple[int, ...]
  step_grad_scale: float = 1.0
  log_scale: bool = True
  integer_zero: bool = False

  def merged_float(self) -> jax.Array:
    w0 = lazy.materialize(self.base).astype(jnp.float32)
    return w0 + self.lora_scale * (self.a @ self.b).astype(jnp.float32)

  def quantizer(self, grad_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """The learned ``(S, Z)``; ``grad_scale`` applies LSQ's gradient scale to ``u, dz``."""
    s0, z0 = minmax_quantizer(lazy.materialize(self.base), group_size=self.group_size,
                              bits=self.bits, symmetric=self.symmetric)
    gs = (lambda x: _grad_scale(x, self.step_grad_scale)) if grad_scale else (lambda x: x)
    u = gs(self.dscale).astype(jnp.float32)
    s = s0 * jnp.exp(u) if self.log_scale else s0 + u
    z = z0 if self.dzero is None else z0 + gs(self.dzero).astype(jnp.float32)
    return s, z

  def materialize(self) -> jax.Array:
    s, z = self.quantizer(grad_scale=True)
    w = fake_quantize(self.merged_float(), s, z, group_size=self.group_size, bits=self.bits,
                      symmetric=self.symmetric, integer_zero=self.integer_zero)
    return w.astype(self.base.dtype)

  def quantized(self) -> AffineQuant:
    """The integer codes of the merged weight with the learned ``S`` and ``Z`` (``⌊Z⌉``
    with ``integer_zero``): ``decode()`` is :meth:`materialize`'s value, bit for bit."""
    lo, hi = code_range(self.bits, self.symmetric)
    s, z = self.quantizer()
    q, _, _ = _codes(self.merged_float(), s, z, self.group_size, lo, hi, jnp.round,
                     self.integer_zero)
    zero = jnp.round(z) if self.integer_zero else z
    return AffineQuant(q=q.astype(code_dtype(self.bits, self.symmetric)),
                       scale=s.astype(jnp.float32), zero=zero.astype(jnp.float32),
                       shape=self.shape_, dtype=self.base.dtype, bits=self.bits,
                       symmetric=self.symmetric, group_size=self.group_size)


@configured("l4q")
def l4q(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
        group_size: int = 32, bits: int = 4, symmetric: bool = False,
        lsq_grad_scale: bool = False, log_scale: bool = True, integer_zero: bool = False,
        dtype=jnp.float32) -> Reparam:
  """L4Q on the selected ``[in, out]`` kernels.

  Args:
    where: selection of the weights.
    rank: LoRA rank ``r``.
    alpha: LoRA scaling numerator (``s = alpha / r``; default ``r``).
    group_size: input rows per quantization group (must divide ``in``).
    bits: 4 (default) or 8.
    symmetric: signed codes with ``Z = 0`` (not trained); default asymmetric (unsigned
      codes, learned ``Z``).
    lsq_grad_scale: multiply the gradients of the quantizer parameters by LSQ's
      ``1 / sqrt(group_size · q_hi)`` (meant for SGD; Adam is nearly invariant to it).
    log_scale: learn ``S = S0 exp(u)`` (default): an Adam step then changes ``S`` by a
      relative amount, whatever its magnitude, and ``S`` stays positive; else ``S = S0 + u``.
    integer_zero: round the zero point (straight-through) so that the deployed ``Z`` is an
      integer (GPTQ-style storage); default: a float ``Z``, LSQ+'s learned offset
      (``AffineQuant`` keeps ``Z`` in float32 either way).
    dtype: dtype of the adapter factors and quantizer offsets.

  Returns:
    A :class:`Reparam`; ``phi`` per leaf is ``{"a", "b", "scale", "zero"}`` (``"scale"``
    is ``u``, ``"zero"`` is ``Z − Z0``; no ``"zero"`` when symmetric), and ``apply`` gives
    :class:`L4QWeight` leaves; :func:`l4q_merge` turns them into int codes.
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"L4Q rank must be a positive int, got {rank!r}")
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"L4Q group_size must be a positive int, got {group_size!r}")
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
    a, b, _ = init_factors(key, w, view, rank, s, "kaiming", dtype)
    groups = (view.d_in // group_size, view.d_out)
    phi = {"a": a, "b": b, "scale": jnp.zeros(groups, dtype)}
    if not symmetric:
      phi["zero"] = jnp.zeros(groups, dtype)
    return phi

  def apply_leaf(w, phi, view, rng):
    return L4QWeight(base=w, a=phi["a"], b=phi["b"], dscale=phi["scale"], dzero=phi.get("zero"),
                     lora_scale=s, group_size=group_size, bits=bits, symmetric=symmetric,
                     shape_=view.shape, step_grad_scale=g, log_scale=log_scale,
                     integer_zero=integer_zero)

  return adapt(LeafMethod(name="L4Q", init_leaf=init_leaf, apply_leaf=apply_leaf,
                          validate=validate), where)


def l4q_merge(theta: Any, compute_dtype=None) -> Any:
  """Replaces every :class:`L4QWeight` of ``apply(theta0, phi)`` by the int codes of its
  merged weight (a :class:`QuantizedWeight` over :class:`AffineQuant`, decoded inside the
  matmul); its decode equals the training forward's weight exactly."""
  return jax.tree.map(lambda x: QuantizedWeight(q=x.quantized(), compute_dtype=compute_dtype)
                      if isinstance(x, L4QWeight) else x, theta, is_leaf=lazy.is_lazy)
