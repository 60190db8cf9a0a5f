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

On a mesh (:mod:`lowrank_jax.sharding`) the codec is stored in its row layout, its
buffers split like the weight; with a ``compute_sharding`` (FSDP) the codes are
all-gathered to it inside the matmul, forward and again backward, and decoded there:
the 4-bit codes travel, never the decoded weight.

    theta_q = quantize(theta0, r"(q|k|v|o)_proj/kernel", codec="nf4")
    reparam = lowrank_jax.lora(r"(q|v)_proj/kernel", rank=16)
    phi = reparam.init(key, theta_q)
    y = model(reparam.apply(theta_q, phi), x)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.quant import codecs
from lowrank_jax.quant.blockwise import check_float_input

__all__ = ["QuantizedWeight", "quantize", "dequantize", "quantized_bytes", "encode_leaf", "buffer_specs"]

CodecArg = Union[str, Callable[[jax.Array, str], Any]]


def _zero_cotangent(tree):
  def z(l):
    if jnp.issubdtype(l.dtype, jnp.inexact):
      return jnp.zeros_like(l)
    return np.zeros(l.shape, dtype=jax.dtypes.float0)
  return jax.tree.map(z, tree)


def _at_compute(q: Any, compute_sharding) -> Any:
  """``q`` constrained to the placement its weight has inside the matmul (``None``: as
  placed): under FSDP the codes are gathered here, and decoded locally after."""
  if compute_sharding is None:
    return q
  mesh = compute_sharding.mesh
  specs = buffer_specs(q, compute_sharding.spec, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(
      q, jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _decode_matmul(x: jax.Array, q: Any, compute_dtype, compute_sharding=None) -> jax.Array:
  w = _at_compute(q, compute_sharding).decode(compute_dtype)
  return jnp.matmul(x.astype(compute_dtype), w).astype(x.dtype)


def _decode_matmul_fwd(x, q, compute_dtype, compute_sharding):
  # residuals: the codes (4-bit, as placed) and a scalar carrying x's dtype; no dense weight
  return _decode_matmul(x, q, compute_dtype, compute_sharding), (q, jnp.zeros((), x.dtype))


def _decode_matmul_bwd(compute_dtype, compute_sharding, res, g):
  q, x0 = res
  if compute_sharding is not None:  # tie the codes to g: the backward gathers them again
    q, g = jax.lax.optimization_barrier((q, g))  # (XLA would reuse the forward's gather,
  w = _at_compute(q, compute_sharding).decode(compute_dtype)  # keeping every layer's alive)
  dx = jnp.matmul(g.astype(compute_dtype), w.T).astype(x0.dtype)
  return dx, _zero_cotangent(q)


_decode_matmul.defvjp(_decode_matmul_fwd, _decode_matmul_bwd)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def buffer_specs(q: Any, spec: PartitionSpec, axis_sizes) -> Any:
  """``PartitionSpec`` per buffer of codec ``q`` for its tensor placed by ``spec``: the
  codec's own ``buffer_specs`` (4-bit and 8-bit blockwise codecs), else ``spec`` for
  every buffer shaped like the tensor (affine codes ``[in, out]``) and replication for
  the rest."""
  own = getattr(q, "buffer_specs", None)
  if own is not None:
    return own(spec, axis_sizes)
  shape = tuple(q.shape)
  return jax.tree.map(lambda b: spec if tuple(b.shape) == shape else PartitionSpec(), q)


@lazy.pytree_dataclass(static=("compute_dtype", "compute_sharding"))
class QuantizedWeight(lazy.LazyWeight):
  """A frozen weight stored by a codec; decoded only inside :meth:`matmul`.

  Attributes:
    q: the codec (:class:`~lowrank_jax.quant.codecs.Codec`: ``shape``, ``dtype``,
      ``decode(dtype)``, ``nbytes``...).
    compute_dtype: dtype of the decoded block and the matmul (default: the input's).
    compute_sharding: ``NamedSharding`` of the weight inside the matmul, or ``None``
      (decode where placed). Set by :func:`lowrank_jax.sharding.shard` for FSDP: the
      codes are gathered to it before decoding, so the 4-bit codes travel, not the
      decoded weight.
  """
  q: Any
  compute_dtype: Any = None
  compute_sharding: Any = None

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
    return _decode_matmul(x, self.q, cdt, self.compute_sharding)

  # -- placement (lowrank_jax.sharding)
  def for_sharding(self) -> "QuantizedWeight":
    """The codec in its row layout (``Quant4.rows``, ``Blockwise8.rows``) where it has one,
    so that any spec of the weight applies to the codes."""
    rows = getattr(self.q, "rows", None)
    return self if rows is None else dataclasses.replace(self, q=rows())

  def buffer_specs(self, spec: PartitionSpec, axis_sizes) -> "QuantizedWeight":
    """A ``QuantizedWeight`` of ``PartitionSpec`` s for the weight placed by ``spec``."""
    return dataclasses.replace(self, q=buffer_specs(self.q, spec, axis_sizes))

  def with_compute_sharding(self, compute_sharding) -> "QuantizedWeight":
    """The same weight, gathered to ``compute_sharding`` inside its matmul."""
    return dataclasses.replace(self, compute_sharding=compute_sharding)


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
