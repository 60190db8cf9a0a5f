"""Quantized frozen weights that decode inside the matmul (QLoRA).

QLoRA (Dettmers et al., arXiv 2305.14314) keeps the frozen base weights in 4-bit
NF4 with double quantization for the whole run and computes

    Y = X · doubleDequant(c1, c2, W_NF4) + s · (X A) B

with only the layer being multiplied ever present in the compute dtype. Here
:func:`quantize` replaces the selected leaves of ``theta0`` once by
:class:`QuantizedWeight`, a lazy weight holding the codec (:class:`~lowrank_jax.quant.nf4.Quant4`,
:class:`~lowrank_jax.quant.blockwise.Blockwise8`, or an affine int code); LoRA and every
other additive method chain on top unchanged (their init needs only ``.shape`` and
``.dtype``; PiSSA-like inits call ``materialize``).

``QuantizedWeight.matmul`` is a ``jax.custom_vjp``: the forward decodes and
multiplies, the backward *re-decodes* and returns ``dx = g · decode(W)^T`` only (the
frozen weight gets no gradient), so the residuals kept for the backward pass are
the 4-bit codes, never the dense weight.

    theta_q = quantize(theta0, r"(q|k|v|o)_proj/kernel", codec="nf4")
    reparam = lowrank_jax.lora(r"(q|v)_proj/kernel", rank=16)
    phi = reparam.init(key, theta_q)
    y = model(reparam.apply(theta_q, phi), x)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.quant import codecs
from lowrank_jax.quant.blockwise import check_float_input

__all__ = ["QuantizedWeight", "quantize", "dequantize", "quantized_bytes", "encode_leaf"]

CodecArg = Union[str, Callable[[jax.Array, str], Any]]


def _zero_cotangent(tree):
  def z(l):
    if jnp.issubdtype(l.dtype, jnp.inexact):
      return jnp.zeros_like(l)
    return np.zeros(l.shape, dtype=jax.dtypes.float0)
  return jax.tree.map(z, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _decode_matmul(x: jax.Array, q: Any, compute_dtype) -> jax.Array:
  w = q.decode(compute_dtype)
  return jnp.matmul(x.astype(compute_dtype), w).astype(x.dtype)


def _decode_matmul_fwd(x, q, compute_dtype):
  # residuals: the codes (4-bit) and a scalar carrying x's dtype; no dense weight
  return _decode_matmul(x, q, compute_dtype), (q, jnp.zeros((), x.dtype))


def _decode_matmul_bwd(compute_dtype, res, g):
  q, x0 = res
  w = q.decode(compute_dtype)                     # recomputed, not saved
  dx = jnp.matmul(g.astype(compute_dtype), w.T).astype(x0.dtype)
  return dx, _zero_cotangent(q)


_decode_matmul.defvjp(_decode_matmul_fwd, _decode_matmul_bwd)


@lazy.pytree_dataclass(static=("compute_dtype",))
class QuantizedWeight(lazy.LazyWeight):
  """A frozen weight stored by a codec; decoded only inside :meth:`matmul`.

  Attributes:
    q: the codec (:class:`~lowrank_jax.quant.codecs.Codec`: ``shape``, ``dtype``,
      ``decode(dtype)``, ``nbytes``...).
    compute_dtype: dtype of the decoded block and the matmul (default: the input's).
  """
  q: Any
  compute_dtype: Any = None

  @property
  def shape(self):
    return tuple(self.q.shape)

  @property
  def dtype(self):
    return jnp.dtype(self.q.dtype)

  @property
  def nbytes(self) -> int:
    return self.q.nbytes

  @property
  def bits_per_param(self) -> float:
    return self.q.bits_per_param

  def materialize(self) -> jax.Array:
    return self.q.decode(self.dtype)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    cdt = jnp.dtype(self.compute_dtype if self.compute_dtype is not None else x.dtype)
    return _decode_matmul(x, self.q, cdt)


def encode_leaf(x: jax.Array, path: str = "", codec: CodecArg = "nf4", block_size: int = 64,
                double_quant: bool = True, **kw) -> Any:
  """Encodes one array with a registered codec (:func:`lowrank_jax.quant.codecs.get_codec`:
  ``"nf4"``, ``"fp4"``, ``"int8_blockwise_dynamic"``, ``"int8_affine"``, ``"int4_affine"``
  or an alias) or a callable ``(x, path) -> codec``."""
  if callable(codec):
    check_float_input(x, "quantize", path)
    return codec(x, path)
  return codecs.encode(x, codec, block_size=block_size, double_quant=double_quant,
                       name=path or None, **kw)


def quantize(theta0: Any, where: tree_lib.Where = None, codec: CodecArg = "nf4",
             block_size: int = 64, double_quant: bool = True, compute_dtype=None,
             jit: bool = True, **codec_kw) -> Any:
  """Replaces the leaves ``where`` selects by :class:`QuantizedWeight` (done once, before training).

  Args:
    theta0: the frozen parameters.
    where: regex / list / predicate / mask (see :func:`lowrank_jax.select`); ``None``
      selects every leaf with at least 2 dimensions.
    codec: a registered codec name (:data:`lowrank_jax.quant.codecs.CODECS`): ``"nf4"``
      (default), ``"fp4"``, ``"int8_blockwise_dynamic"`` (alias ``"int8"``),
      ``"int8_affine"``, ``"int4_affine"``; or ``(x, path) -> codec``.
    block_size: absmax block (4-bit: 64; 8-bit: 256 is usual; affine: group size).
    double_quant: 8-bit-quantize the 4-bit codec's block absmaxes.
    compute_dtype: dtype of the decoded weight inside the matmul (``None``: the input's).
    jit: encode each leaf under ``jax.jit`` (fast, one compile per shape).

  Returns:
    ``theta0`` with quantized leaves (a new tree; the input is not modified).

  Raises:
    TypeError naming the leaf when a selected leaf is not float32/bfloat16/float16;
    ValueError for an unknown codec name (with the closest registered names).
  """
  spec = codecs.get_codec(codec) if isinstance(codec, str) else None
  if where is None:
    where = lambda p, x: getattr(x, "ndim", 0) >= 2 and not lazy.is_lazy(x)
  mask = tree_lib.select(theta0, where)
  encode_fn = None
  if jit and isinstance(codec, str):  # one jitted encoder: same-shaped leaves share a compile
    encode_fn = jax.jit(functools.partial(encode_leaf, codec=codec, block_size=block_size,
                                          double_quant=double_quant, **codec_kw))

  def enc(path, x):
    if isinstance(x, QuantizedWeight):
      raise ValueError(f"quantize: leaf '{path}' is already quantized")
    check_float_input(x, spec.name if spec is not None else "quantize", path)
    if encode_fn is not None:
      q = encode_fn(x)
    else:
      q = encode_leaf(x, path, codec, block_size, double_quant, **codec_kw)
    return QuantizedWeight(q=q, compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype))

  return tree_lib.map_selected(enc, theta0, mask)


def dequantize(theta: Any) -> Any:
  """Dense copy of a tree: every :class:`QuantizedWeight` decoded to its dtype."""
  return jax.tree.map(lambda x: x.materialize() if isinstance(x, QuantizedWeight) else x,
                      theta, is_leaf=lazy.is_lazy)


def quantized_bytes(theta: Any) -> dict:
  """``{"quantized": bytes, "dense": bytes, "params": n_quantized_params, "bits_per_param": b}``
  of the quantized leaves, from their real buffers."""
  qb, dense, n = 0, 0, 0
  for _, x in tree_lib.flatten_with_paths(theta):
    if isinstance(x, QuantizedWeight):
      qb += x.nbytes
      n += math.prod(x.shape)
    elif hasattr(x, "dtype"):
      dense += tree_lib.count_bytes(x)
  return {"quantized": qb, "dense": dense, "params": n,
          "bits_per_param": 8.0 * qb / n if n else float("nan")}
