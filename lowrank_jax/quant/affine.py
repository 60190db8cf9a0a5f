"""Affine (uniform) post-training quantization: ``q = clip(round(W / S) + Z)``, ``W ≈ (q - Z) S``.

Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", arXiv 1712.05877.

* symmetric: ``S = max|W| / (2^(b-1) - 1)``, ``Z = 0``, signed codes (int8 / int4);
* asymmetric: ``S = (max W - min W) / (2^b - 1)``, ``Z = round(-min W / S)``, unsigned
  codes (uint8 / uint4);
* granularity: one ``(S, Z)`` per tensor, per output channel (the last axis of a Flax
  kernel ``[in, out]``), or per group of ``group_size`` consecutive input rows and
  output column (GPTQ / QA-LoRA layout, ``S, Z: [in / group_size, out]``).

4-bit codes are stored as ``ml_dtypes`` ``int4`` / ``uint4`` arrays. ``Z`` is kept in
float32 so that QA-LoRA can fold an adapter into it (:mod:`qalora`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy
from lowrank_jax.quant.blockwise import check_float_input
from lowrank_jax.quant.sizes import StoredSizes

__all__ = ["AffineQuant", "affine_encode", "code_dtype", "quantization_error"]

Granularity = Literal["tensor", "channel", "group"]


def code_dtype(bits: int, symmetric: bool):
  """The dtype of ``bits``-bit codes: int8/int4 (symmetric, signed) or uint8/uint4."""
  if bits == 8:
    return jnp.int8 if symmetric else jnp.uint8
  if bits == 4:
    return jnp.int4 if symmetric else jnp.uint4
  raise ValueError(f"affine quantization supports bits=4 or 8, got {bits}")


def _as_matrix(shape):
  if len(shape) == 0:
    return (1, 1)
  if len(shape) == 1:
    return (shape[0], 1)
  return (int(np.prod(shape[:-1])), shape[-1])


@lazy.pytree_dataclass(static=("shape", "dtype", "bits", "symmetric", "group_size"))
class AffineQuant(StoredSizes):
  """Integer codes with per-tensor / per-channel / per-group scale and zero point.

  Attributes:
    q: codes ``[rows, cols]`` (int8/uint8/int4/uint4) of the tensor seen as a matrix
      (all axes but the last are rows).
    scale: float32 ``[rows / group_size, cols]`` (broadcast along rows of a group).
    zero: float32 zero point, same shape as ``scale``.
    shape, dtype: the original tensor's (static).
    bits, symmetric: the code format.
    group_size: rows per group (``rows`` for per-channel; per-tensor has ``scale [1, 1]``).
  """
  q: jax.Array
  scale: jax.Array
  zero: jax.Array
  shape: tuple[int, ...]
  dtype: Any
  bits: int
  symmetric: bool
  group_size: int

  def decode_float32(self) -> jax.Array:
    rows, cols = self.q.shape
    g = self.scale.shape[0]
    q = self.q.astype(jnp.float32).reshape(g, rows // g, cols)
    s = self.scale.reshape(g, 1, -1)
    z = self.zero.reshape(g, 1, -1)
    return ((q - z) * s).reshape(rows, cols)

  def decode(self, dtype=None, shape: Optional[tuple[int, ...]] = None) -> jax.Array:
    if shape is not None and tuple(shape) != tuple(self.shape):
      raise ValueError(f"affine: cannot decode a tensor of shape {self.shape} as {tuple(shape)}")
    if _as_matrix(self.shape) != tuple(self.q.shape):
      raise ValueError(f"affine: codes of shape {tuple(self.q.shape)} do not fit shape {self.shape}")
    return self.decode_float32().reshape(self.shape).astype(self.dtype if dtype is None else dtype)

  def error_bound(self) -> jax.Array:
    """float32 bound on ``|decode() - x|`` per element, for ``x`` the encoded tensor:
    ``S / 2`` of the element's group (rounding; the clip range covers ``[min, max]``
    up to half a step)."""
    rows, cols = self.q.shape
    g = self.scale.shape[0]
    half = jnp.broadcast_to((0.5 * self.scale).reshape(g, 1, -1), (g, rows // g, cols))
    return half.reshape(self.shape)



def affine_encode(x: jax.Array, bits: int = 8, symmetric: bool = True,
                  granularity: Granularity = "group", group_size: Optional[int] = 128,
                  name: Optional[str] = None) -> AffineQuant:
  """Affine quantization of ``x``.

  Args:
    x: float tensor; seen as ``[prod(shape[:-1]), shape[-1]]``.
    bits: 4 or 8.
    symmetric: signed codes with ``Z = 0``, else unsigned codes with a zero point.
    granularity: ``"tensor"``, ``"channel"`` (per output column) or ``"group"``.
    group_size: rows per group for ``"group"`` (must divide the row count).
    name: leaf path for errors.

  Returns:
    An :class:`AffineQuant`.
  """
  dtype = check_float_input(x, f"int{bits}", name)
  cdt = code_dtype(bits, symmetric)
  x = jnp.asarray(x)
  rows, cols = _as_matrix(x.shape)
  m = x.reshape(rows, cols).astype(jnp.float32)
  if granularity == "tensor":
    g, gs = 1, rows
    red = m.reshape(1, rows * cols)[:, :, None]
  elif granularity == "channel":
    g, gs = 1, rows
    red = m.reshape(1, rows, cols)
  elif granularity == "group":
    if group_size is None or group_size < 1 or rows % group_size:
      where = f" of leaf '{name}'" if name else ""
      raise ValueError(f"affine: group_size {group_size} must divide the {rows} input rows{where} "
                       f"(shape {tuple(x.shape)})")
    g, gs = rows // group_size, group_size
    red = m.reshape(g, gs, cols)
  else:
    raise ValueError(f"unknown granularity {granularity!r}; expected tensor, channel or group")
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    amax = jnp.max(jnp.abs(red), axis=1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    zero = jnp.zeros_like(scale)
    lo, hi = -qmax - 1, qmax
  else:
    qmax = 2 ** bits - 1
    mn = jnp.minimum(jnp.min(red, axis=1), 0.0)
    mx = jnp.maximum(jnp.max(red, axis=1), 0.0)
    scale = jnp.where(mx > mn, (mx - mn) / qmax, 1.0)
    zero = jnp.round(-mn / scale)
    lo, hi = 0, qmax
  if granularity == "tensor":
    scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    s_full, z_full = scale, zero
  else:
    s_full = jnp.repeat(scale, gs, axis=0)
    z_full = jnp.repeat(zero, gs, axis=0)
  q = jnp.clip(jnp.round(m / s_full) + z_full, lo, hi)
  return AffineQuant(q=q.astype(cdt), scale=scale.astype(jnp.float32),
                     zero=zero.astype(jnp.float32), shape=tuple(x.shape), dtype=dtype, bits=bits,
                     symmetric=symmetric, group_size=gs)


def quantization_error(x: jax.Array, codec: Any) -> dict:
  """Error report of a codec against the original ``x``: max / mean absolute error,
  relative Frobenius error, SQNR (dB) and bits per parameter."""
  x = jnp.asarray(x, jnp.float32)
  y = codec.decode(jnp.float32)
  err = y - x
  fro = float(jnp.linalg.norm(err.ravel()))
  ref = float(jnp.linalg.norm(x.ravel()))
  return {"max_abs": float(jnp.max(jnp.abs(err))), "mean_abs": float(jnp.mean(jnp.abs(err))),
          "rel_fro": fro / ref if ref else float("nan"),
          "sqnr_db": 20.0 * math.log10(ref / fro) if fro > 0 and ref > 0 else float("inf"),
          "bits_per_param": float(codec.bits_per_param)}
