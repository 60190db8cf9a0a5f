"""Transformer building blocks as pure functions over parameter dicts.

Every dense matmul goes through :func:`lowrank_jax.dot`, so a kernel may be a lazy
weight (LoRA ``W0 + s A B``, an NF4-coded matrix, a Kronecker product...) and is
multiplied in factored form, never materialised. Flax linen/NNX layers would call
``jnp.asarray`` on the kernel and materialise it, which is why these are plain
functions over dicts such as ``{"kernel": [in, out], "bias": [out]}``.

Shapes: activations are ``[..., features]``; attention takes ``q [B, T, H, D]`` and
``k, v [B, S, K, D]`` with ``K`` dividing ``H`` (grouped-query attention when
``K < H``).

Formulation notes (XLA:CPU, measured on MiniLM): layer norm statistics are taken
without ``keepdims`` and broadcast once, with ``rsqrt(var + eps) * scale`` grouped
into one multiplier; this avoids large backward fusions (bench/README.md).
Attention lives in :mod:`lowrank_jax.models.attention` (re-exported here): the
``dpa`` forward for inference, an explicit closed-form backward for training.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from lowrank_jax import lazy
from lowrank_jax.models.attention import attention
from lowrank_jax.ops import dropout, stat_dtype

__all__ = [
  "dense",
  "embed",
  "layer_norm",
  "rms_norm",
  "gelu",
  "dropout",
  "attention",
  "split_heads",
  "merge_heads",
  "bottleneck_adapter",
  "init_from_spec",
  "ACTIVATIONS",
]

Params = Mapping[str, Any]


def dense(p: Params, x: jax.Array) -> jax.Array:
  """``x @ kernel (+ bias)``; the kernel may be a lazy weight (:func:`lowrank_jax.dot`).

  Args:
    p: ``{"kernel": [in, out]}`` with an optional ``"bias": [out]``.
    x: ``[..., in]``.

  Returns:
    ``[..., out]`` in ``x.dtype``.
  """
  y = lazy.dot(x, p["kernel"])
  b = p.get("bias")
  if b is not None:
    y = y + b.astype(y.dtype)
  return y


def embed(table, ids: jax.Array) -> jax.Array:
  """Row lookup ``table[ids]``; a lazy table is materialised first (or uses its ``take``)."""
  if isinstance(table, lazy.LazyWeight):
    take = getattr(table, "take", None)
    if take is not None:
      return take(ids)
    table = table.materialize()
  return jnp.take(table, ids, axis=0)


def layer_norm(p: Params, x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """LayerNorm (Ba et al., arXiv 1607.06450): ``(x - mean) * rsqrt(var + eps) * scale + bias``.

  Statistics over the last axis in at least float32; result in ``x.dtype``.
  """
  dt = stat_dtype(x.dtype)
  xf = x.astype(dt)
  mean = jnp.mean(xf, axis=-1)
  xc = xf - mean[..., None]
  var = jnp.mean(jnp.square(xc), axis=-1)
  mul = jax.lax.rsqrt(var + eps)[..., None] * p["scale"].astype(dt)
  y = xc * mul
  if p.get("bias") is not None:
    y = y + p["bias"].astype(dt)
  return y.astype(x.dtype)


def rms_norm(p: Params, x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """RMSNorm (Zhang & Sennrich, arXiv 1910.07467): ``x * rsqrt(mean(x^2) + eps) * scale``."""
  dt = stat_dtype(x.dtype)
  xf = x.astype(dt)
  ms = jnp.mean(jnp.square(xf), axis=-1)
  y = xf * jax.lax.rsqrt(ms + eps)[..., None]
  return (y * p["scale"].astype(dt)).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU ``x * Phi(x) = x/2 (1 + erf(x / sqrt 2))`` (BERT's ``hidden_act="gelu"``).

  Written with ``erf`` as torch does: ``jax.nn.gelu(approximate=False)`` uses ``erfc``,
  which XLA:CPU evaluates more slowly (bench/README.md).
  """
  return (x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": gelu,
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "tanh": jnp.tanh,
}


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """``[B, T, H*D]`` -> ``[B, T, H, D]``."""
  *lead, f = x.shape
  if f % num_heads:
    raise ValueError(f"feature size {f} is not divisible by {num_heads} heads")
  return x.reshape(*lead, num_heads, f // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """``[B, T, H, D]`` -> ``[B, T, H*D]``."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def bottleneck_adapter(p: Params, h: jax.Array, activation: str = "relu") -> jax.Array:
  """Bottleneck adapter ``h + up(f(down(h)))`` (Houlsby et al., arXiv 1902.00751).

  Args:
    p: ``{"down": {"kernel": [D, m], "bias": [m]}, "up": {"kernel": [m, D], "bias": [D]}}``;
      the kernels may be lazy.
    h: ``[..., D]``.
    activation: a key of :data:`ACTIVATIONS`.
  """
  f = ACTIVATIONS[activation]
  return h + dense(p["up"], f(dense(p["down"], h)))


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def init_from_spec(key: jax.Array, spec: Any, dtype=jnp.float32, std: float = 0.02) -> Any:
  """Random parameters from a spec tree of ``(kind, shape)`` leaves.

  ``kind`` is ``"normal"`` (``N(0, std^2)``), ``"ones"`` or ``"zeros"``. All normal
  leaves are slices of *one* ``jax.random.normal`` draw (in float32, then cast), which
  compiles far faster than one random call per leaf. Call it under ``jax.jit``.
  """
  leaves, treedef = jax.tree.flatten(spec, is_leaf=_is_spec)
  for leaf in leaves:
    if not _is_spec(leaf) or leaf[0] not in ("normal", "ones", "zeros"):
      raise ValueError(f"init spec leaves must be (kind, shape) with kind normal|ones|zeros, got {leaf!r}")
  n = sum(math.prod(shape) for kind, shape in leaves if kind == "normal")
  flat = std * jax.random.normal(key, (n,), jnp.float32) if n else None
  out, offset = [], 0
  for kind, shape in leaves:
    if kind == "normal":
      size = math.prod(shape)
      out.append(flat[offset:offset + size].reshape(shape).astype(dtype))
      offset += size
    else:
      out.append((jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype))
  return jax.tree.unflatten(treedef, out)
