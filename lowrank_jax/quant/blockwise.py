"""Blockwise absmax quantization and the 8-bit dynamic codec (bitsandbytes-compatible).

A flat tensor is cut into blocks of ``block_size`` consecutive elements (row-major
order; the last block may be partial). Each block keeps its absolute maximum
``m_b`` in float32, and each element is stored as the index of the nearest entry of
a code book ``c`` for ``z = x / m_b``; decoding is ``x ≈ c[q] * m_b`` in float32.

With the 8-bit dynamic map (Dettmers, "8-Bit Approximations for Parallelism in
Deep Learning", arXiv 1511.04561; Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861) this is bitsandbytes'
``quantize_blockwise`` / ``dequantize_blockwise`` (default block 256), used for the
second level of QLoRA's double quantization and by 8-bit optimizers.

Public API::

    q = blockwise8_encode(x, block_size=256)   # Blockwise8 pytree
    y = blockwise8_decode(q)                   # == q.decode(), in x.dtype
    q.nbytes, q.bits_per_param

Layouts. ``encode`` stores bitsandbytes' *flat* layout (``codes [n]``, ``absmax
[num_blocks]``). :meth:`Blockwise8.rows` re-lays the same bytes out per row: ``codes``
shaped like the tensor and, when the last axis is a multiple of the block,
``absmax [..., last / block]`` (otherwise ``absmax`` stays flat: blocks span rows). A
reshape, nothing recomputed; decoding gives the same bits. In the row layout a
``PartitionSpec`` of the tensor applies to its codes (:meth:`Blockwise8.buffer_specs`),
so a sharded tensor's codes are sharded the same way and decode without communication.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lowrank_jax import lazy
from lowrank_jax.quant import codebooks
from lowrank_jax.quant.sizes import StoredSizes

__all__ = [
  "Blockwise8",
  "blockwise8_encode",
  "blockwise8_decode",
  "check_block_size",
  "check_float_input",
  "block_absmax",
  "code_index",
  "normalize_blocks",
  "num_blocks_of",
  "to_blocks",
  "row_blocks_shape",
  "expand_blocks",
  "block_spec",
  "flat_spec",
  "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def row_blocks_shape(shape: tuple[int, ...], block_size: int) -> Optional[tuple[int, ...]]:
  """``shape[:-1] + (shape[-1] // block_size,)`` when blocks of ``block_size`` tile each row
  of the last axis (a tensor of >= 2 dims), else ``None`` (blocks span rows)."""
  if len(shape) >= 2 and shape[-1] % block_size == 0:
    return tuple(shape[:-1]) + (shape[-1] // block_size,)
  return None


def expand_blocks(per_block: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
  """A per-block array repeated to one value per element of a tensor of ``shape``:
  ``per_block [..., last / block]`` (row layout) along the last axis, a flat
  ``[num_blocks]`` by each element's row-major index (both local under any sharding of
  ``shape``: no reshape of the sharded axes)."""
  if per_block.ndim == len(shape) and len(shape) >= 2:  # broadcast, then merge the block axis
    wide = jnp.broadcast_to(per_block[..., None], per_block.shape + (block_size,))
    return wide.reshape(shape)
  index = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
  return per_block[index // block_size]


def mesh_entry_size(axis_sizes: Mapping[str, int], entry) -> int:
  """How many ways a ``PartitionSpec`` entry (``None``, a name or a tuple of names) splits."""
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(axis_sizes[n] for n in names)


def block_spec(spec: PartitionSpec, block_shape: Optional[tuple[int, ...]],
               axis_sizes: Mapping[str, int]) -> PartitionSpec:
  """The spec of a per-block buffer of a tensor placed by ``spec``: ``spec`` itself for a
  row-layout buffer ``[..., last / block]`` (the last entry dropped when it does not divide
  the blocks), replicated for a flat one (small; its blocks span rows)."""
  if block_shape is None:
    return PartitionSpec()
  entries = list(spec) + [None] * (len(block_shape) - len(spec))
  if block_shape[-1] % mesh_entry_size(axis_sizes, entries[-1]):
    entries[-1] = None
  return spec_of(*entries)


def flat_spec(spec: PartitionSpec, n: int, block_size: int, per_byte: int,
              axis_sizes: Mapping[str, int], what: str) -> PartitionSpec:
  """The spec of flat (bitsandbytes-layout) buffers of an ``n``-element tensor placed by
  ``spec``: only a split of the leading axis maps onto contiguous ranges, and each shard
  must hold whole blocks (and whole bytes, ``per_byte`` codes a byte).

  Raises:
    ValueError: naming the spec and the sizes when it does not fit.
  """
  entries = list(spec)
  if not entries or all(e is None for e in entries):
    return PartitionSpec()
  if any(e is not None for e in entries[1:]):
    raise ValueError(f"{what}: flat (bitsandbytes-layout) codes can only be split along the "
                     f"leading axis, not as {spec}; use the row layout (.rows())")
  k = mesh_entry_size(axis_sizes, entries[0])
  if n % k or (n // k) % block_size or (n // k) % per_byte:
    raise ValueError(f"{what}: {n} elements in blocks of {block_size} do not split into {k} "
                     f"shards of whole blocks along {entries[0]!r}")
  return PartitionSpec(entries[0])


def spec_of(*entries) -> PartitionSpec:
  """``PartitionSpec(*entries)``, or ``PartitionSpec()`` when every entry is ``None``."""
  return PartitionSpec(*entries) if any(e is not None for e in entries) else PartitionSpec()


def check_block_size(block_size: int, what: str = "block_size") -> int:
  """Raises unless ``block_size`` is a positive power of two."""
  if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
      or block_size < 1 or block_size & (block_size - 1)):
    raise ValueError(f"{what} must be a positive power of two, got {block_size!r}")
  return int(block_size)


def check_float_input(x, codec: str, name: Optional[str] = None):
  """Raises a clear error for an input the codecs cannot encode."""
  where = f" for leaf '{name}'" if name else ""
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  dtype = jnp.dtype(x.dtype)
  if dtype not in SUPPORTED_DTYPES:
    kind = "an integer" if jnp.issubdtype(dtype, jnp.integer) else "an unsupported"
    raise TypeError(f"{codec}: cannot quantize {kind} tensor{where} of dtype {dtype} and shape "
                    f"{tuple(x.shape)}; supported: float32, bfloat16, float16")
  if int(np.prod(x.shape)) == 0:
    raise ValueError(f"{codec}: cannot quantize an empty tensor{where} (shape {tuple(x.shape)})")
  return dtype


def num_blocks_of(n: int, block_size: int) -> int:
  """Blocks of ``block_size`` needed for ``n`` elements (the last one may be partial)."""
  return -(-n // block_size)


def to_blocks(flat: jax.Array, block_size: int) -> jax.Array:
  """``[n] -> [num_blocks, block_size]``, zero-padding the last block."""
  n = flat.shape[0]
  nb = num_blocks_of(n, block_size)
  if nb * block_size != n:
    flat = jnp.pad(flat, (0, nb * block_size - n))
  return flat.reshape(nb, block_size)


def block_absmax(flat: jax.Array, block_size: int) -> jax.Array:
  """float32 ``max |x|`` of each block of a flat array (the last block may be partial)."""
  return jnp.max(jnp.abs(to_blocks(flat.astype(jnp.float32), block_size)), axis=1)


def normalize_blocks(flat: jax.Array, absmax: jax.Array, block_size: int,
                     mode: str = "divide") -> jax.Array:
  """``z = x / m_b`` per block, returned flat (length ``n``).

  ``mode="divide"`` divides (bitsandbytes' native CPU kernel); ``"reciprocal"``
  multiplies full blocks by ``1 / max(m_b, 1e-38)`` and divides the partial tail block
  (bitsandbytes' 4-bit quantizer). A zero block gives zeros.
  """
  n = flat.shape[0]
  x = to_blocks(flat.astype(jnp.float32), block_size)
  safe = jnp.maximum(absmax, jnp.float32(1e-38))
  if mode == "divide":
    z = x / safe[:, None]
  elif mode == "reciprocal":
    z = x * (jnp.float32(1.0) / safe)[:, None]
    if n % block_size:
      z = z.at[-1].set(x[-1] / safe[-1])
  else:
    raise ValueError(f"unknown normalisation mode {mode!r}")
  return jnp.clip(z.reshape(-1)[:n], -1.0, 1.0)


def code_index(z: jax.Array, book: str, rounding: str = "nearest") -> jax.Array:
  """Stored code (uint8) of normalised values ``z`` (see :mod:`codebooks`)."""
  thresholds, order = codebooks.sorted_thresholds(book, rounding)
  if thresholds.shape[0] <= 16:
    # a handful of thresholds: an unrolled count that XLA fuses into one elementwise loop
    if rounding == "bnb_cpu":
      pos = sum((z >= jnp.float32(t)).astype(jnp.int32) for t in thresholds)
    else:
      pos = sum((z > jnp.float32(t)).astype(jnp.int32) for t in thresholds)
  else:
    side = "right" if rounding == "bnb_cpu" else "left"
    pos = jnp.searchsorted(jnp.asarray(thresholds), z, side=side)
  if np.array_equal(order, np.arange(order.size)):
    return pos.astype(jnp.uint8)
  return jnp.asarray(order)[pos].astype(jnp.uint8)


@lazy.pytree_dataclass(static=("shape", "dtype", "block_size", "rounding"))
class Blockwise8(StoredSizes):
  """8-bit dynamic blockwise codes of a tensor: a pytree node.

  Attributes:
    codes: uint8 ``[n]``, indices into :data:`codebooks.DYNAMIC8_CODE` (row layout:
      shaped like the tensor).
    absmax: float32 ``[ceil(n / block_size)]`` (row layout, when blocks tile the rows:
      ``[..., last / block_size]``).
    shape, dtype: the encoded tensor's shape and dtype (static).
    block_size: elements per block (a power of two).
    rounding: ``"bnb_cpu"`` or ``"nearest"`` (how values were coded; decoding is the same).
  """
  codes: jax.Array
  absmax: jax.Array
  shape: tuple[int, ...]
  dtype: Any
  block_size: int = 256
  rounding: str = "bnb_cpu"

  @classmethod
  def encode(cls, x: jax.Array, block_size: int = 256, rounding: str = "bnb_cpu") -> "Blockwise8":
    """Encodes ``x`` (float32/bfloat16/float16, any shape) in blocks of ``block_size``.

    Args:
      x: the tensor.
      block_size: a power of two (bitsandbytes uses 256 for optimizer states and DQ).
      rounding: ``"bnb_cpu"`` (default; bit-exact with bitsandbytes' CPU kernel) or
        ``"nearest"`` (midpoint rounding, as bitsandbytes' CUDA kernel).

    Returns:
      A :class:`Blockwise8`.
    """
    dtype = check_float_input(x, "blockwise8")
    block_size = check_block_size(block_size)
    x = jnp.asarray(x)
    flat = x.reshape(-1)
    absmax = block_absmax(flat, block_size)
    z = normalize_blocks(flat, absmax, block_size, "divide")
    return cls(codes=code_index(z, "dynamic8", rounding), absmax=absmax, shape=tuple(x.shape),
               dtype=dtype, block_size=block_size, rounding=rounding)

  # -- layouts
  @property
  def row_layout(self) -> bool:
    """Whether the codes are stored shaped like the tensor (:meth:`rows`), not flat."""
    return len(self.shape) >= 2 and self.codes.ndim == len(self.shape)

  def rows(self) -> "Blockwise8":
    """The row layout (module docstring): the same bytes, ``codes`` shaped like the tensor,
    ``absmax [..., last / block]`` when the blocks tile the rows. Tensors of < 2 dims
    (and a row-layout codec) are returned unchanged."""
    if len(self.shape) < 2 or self.row_layout:
      return self
    rb = row_blocks_shape(self.shape, self.block_size)
    return Blockwise8(codes=self.codes.reshape(self.shape),
                      absmax=self.absmax if rb is None else self.absmax.reshape(rb), shape=self.shape,
                      dtype=self.dtype, block_size=self.block_size, rounding=self.rounding)

  def flat(self) -> "Blockwise8":
    """bitsandbytes' flat layout (what :meth:`encode` returns)."""
    return Blockwise8(codes=self.codes.reshape(-1), absmax=self.absmax.reshape(-1), shape=self.shape,
                      dtype=self.dtype, block_size=self.block_size, rounding=self.rounding)

  def reshaped(self, shape: tuple[int, ...]) -> "Blockwise8":
    """The same codes as the encoding of a tensor of ``shape`` (same size, row-major: the
    flat order, and so the blocks, are unchanged), in the flat layout."""
    if math.prod(shape) != self.size:
      raise ValueError(f"Blockwise8: cannot view a tensor of shape {self.shape} as {tuple(shape)}")
    return Blockwise8(codes=self.codes.reshape(-1), absmax=self.absmax.reshape(-1), shape=tuple(shape),
                      dtype=self.dtype, block_size=self.block_size, rounding=self.rounding)

  def buffer_specs(self, spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> "Blockwise8":
    """``PartitionSpec`` per buffer for a tensor placed by ``spec`` (a ``Blockwise8`` of
    specs, the argument :func:`jax.device_put` takes with a mesh).

    Row layout: ``codes`` take ``spec``; ``absmax`` too when the blocks tile the rows
    (:func:`block_spec`), else it is replicated. Flat layout: a spec splitting only the
    leading axis maps onto contiguous ranges of whole blocks; others raise.

    Raises:
      ValueError: ``spec`` does not fit the flat buffers (call :meth:`rows` first).
    """
    if self.row_layout:
      rb = row_blocks_shape(self.shape, self.block_size)
      return Blockwise8(codes=spec, absmax=block_spec(spec, rb if self.absmax.ndim > 1 else None,
                                                      axis_sizes),
                        shape=self.shape, dtype=self.dtype, block_size=self.block_size,
                        rounding=self.rounding)
    big = flat_spec(spec, self.size, self.block_size, 1, axis_sizes, "Blockwise8")
    return Blockwise8(codes=big, absmax=big, shape=self.shape, dtype=self.dtype,
                      block_size=self.block_size, rounding=self.rounding)

  def validate(self) -> None:
    n = int(np.prod(self.shape))
    rb = row_blocks_shape(self.shape, self.block_size)
    if self.row_layout:
      want = rb or (num_blocks_of(n, self.block_size),)
      if tuple(self.codes.shape) != tuple(self.shape) or tuple(self.absmax.shape) != want:
        raise ValueError(f"Blockwise8: codes {tuple(self.codes.shape)} and absmax "
                         f"{tuple(self.absmax.shape)} but shape {self.shape} with block "
                         f"{self.block_size} in the row layout needs {tuple(self.shape)} and {want}")
      return
    if tuple(self.codes.shape) != (n,):
      raise ValueError(f"Blockwise8: codes have shape {tuple(self.codes.shape)} but shape "
                       f"{self.shape} needs ({n},) (flat) or {tuple(self.shape)} (rows)")
    nb = num_blocks_of(n, self.block_size)
    if tuple(self.absmax.shape) != (nb,):
      raise ValueError(f"Blockwise8: absmax has shape {tuple(self.absmax.shape)} but shape "
                       f"{self.shape} with block {self.block_size} needs ({nb},)")

  def element_absmax(self) -> jax.Array:
    """float32 absmax of each element's block, laid out like ``codes``."""
    if self.row_layout:
      return expand_blocks(self.absmax, self.shape, self.block_size)
    return jnp.repeat(self.absmax, self.block_size)[: self.size]

  def decode_float32(self) -> jax.Array:
    """float32 ``code[q] * absmax[block]``, laid out like ``codes`` (flat: length ``n``;
    row layout: the tensor's shape)."""
    self.validate()
    vals = jnp.asarray(codebooks.DYNAMIC8_CODE)[self.codes.astype(jnp.int32)]
    if self.row_layout:
      return vals * expand_blocks(self.absmax, self.shape, self.block_size)
    n = self.codes.shape[0]
    out = to_blocks(vals, self.block_size) * self.absmax[:, None]
    return out.reshape(-1)[:n]

  def decode(self, dtype=None) -> jax.Array:
    """The tensor in ``dtype`` (default: the encoded dtype); the math is float32."""
    dtype = self.dtype if dtype is None else jnp.dtype(dtype)
    return self.decode_float32().reshape(self.shape).astype(dtype)

  def error_bound(self) -> jax.Array:
    """float32 bound on ``|decode() - x|`` per element, for ``x`` the encoded tensor:
    ``max_rounding_error("dynamic8", rounding) * absmax`` of the element's block."""
    e = codebooks.max_rounding_error("dynamic8", self.rounding)
    return (jnp.float32(e) * self.element_absmax()).reshape(self.shape)


def blockwise8_encode(x: jax.Array, block_size: int = 256, rounding: str = "bnb_cpu") -> Blockwise8:
  """Encodes ``x`` with the 8-bit dynamic blockwise codec (see :meth:`Blockwise8.encode`)."""
  return Blockwise8.encode(x, block_size, rounding)


def blockwise8_decode(q: Blockwise8, dtype=None) -> jax.Array:
  """Decodes a :class:`Blockwise8` (to its own dtype unless ``dtype`` is given)."""
  if not isinstance(q, Blockwise8):
    raise TypeError(f"blockwise8_decode expects a Blockwise8, got {type(q).__name__}")
  return q.decode(dtype)
