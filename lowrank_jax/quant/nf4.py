"""4-bit NF4 / FP4 codecs with double quantization: "NF4 as a custom dtype".

QLoRA (Dettmers et al., arXiv 2305.14314) stores a frozen weight as 4-bit codes of
``z = x / m_b`` for blocks of ``block_size`` (64) consecutive elements, with ``m_b``
the block's absmax, and decodes ``x ≈ c[q] * m_b`` (float32 math). Double
quantization (DQ) stores the absmaxes themselves in 8 bits: with the tensor-wide
mean ``μ = mean(m)``, the centred ``m - μ`` is encoded by the 8-bit dynamic
blockwise codec (block 256, :mod:`blockwise`), so ``m_b ≈ c8[q8_b] * M_{b//256} + μ``.
Bits per parameter: ``4 + 32/64 = 4.5`` plain, ``4 + 8/64 + 32/(64·256) ≈ 4.127`` with DQ.
IR-QLoRA's information calibration (``icq=True``, :mod:`lowrank_jax.quant.calibration`) adds a
per-block shift ``τ``, stored in 8 bits: ``+ 8/64 + 32/(64·256)``, 4.254 with DQ.

The layout is bitsandbytes' (``quantize_4bit`` / ``dequantize_4bit``), bit for bit:
row-major flattening, two codes a byte with the *first* element in the high
nibble, an odd count zero-padded, full blocks scaled by the reciprocal
``1 / max(m_b, 1e-38)`` (the partial tail block divides), codes chosen by the
midpoints of the sorted code with ties to the lower code, the mean ``μ`` summed in
torch's float32 order (see :func:`mean_torch_order`), and the DQ absmax coded by
bitsandbytes' CPU 8-bit kernel (``rounding="bnb_cpu"``).

Note on layout: bitsandbytes quantizes a torch ``nn.Linear.weight`` ``[out, in]``; a
Flax kernel is ``[in, out]``, so the same weight has its blocks along another axis.
A bnb checkpoint loads as ``Quant4`` of ``W.T`` (decode, then transpose).

Row layout (for sharding): :meth:`Quant4.rows` keeps the same bytes but stores them per
row of the last axis, ``packed [..., last / 2]`` and, when ``block_size`` divides the
last axis, the per-block buffers (absmax or its 8-bit codes, the ICQ shift)
``[..., last / block_size]`` (else they stay flat and are replicated). A spec on the
tensor, ``P("fsdp", "tensor")``, then applies to the codes and their scales
(:meth:`Quant4.buffer_specs`): an FSDP-sharded weight's codes are gathered (4.13 bits a
parameter) instead of its decoded values, a tensor-parallel one decodes its own columns.
:meth:`Quant4.flat` returns bitsandbytes' layout (the import/export boundary).

    q = Quant4.encode(w, block_size=64, double_quant=True, quant_type="nf4")
    w_hat = q.decode(jnp.bfloat16)
    q.nbytes, q.bits_per_param     # from the real buffers
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lowrank_jax import lazy
from lowrank_jax.quant import calibration, codebooks
from lowrank_jax.quant.blockwise import (Blockwise8, block_absmax, block_spec, check_block_size,
                                         check_float_input, code_index, expand_blocks, flat_spec,
                                         mesh_entry_size, normalize_blocks, num_blocks_of,
                                         row_blocks_shape, to_blocks)
from lowrank_jax.quant.sizes import StoredSizes

__all__ = [
  "Quant4",
  "nf4_encode",
  "fp4_encode",
  "mean_torch_order",
  "pack_nibbles",
  "unpack_nibbles",
  "unpack_rows",
]

QUANT_TYPES = ("nf4", "fp4")


# --------------------------------------------------------------------------- packing

def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 codes ``< 16`` -> bytes, first of each pair in the high nibble (odd: zero pad)."""
  codes = codes.astype(jnp.uint8)
  if codes.shape[0] % 2:
    codes = jnp.pad(codes, (0, 1))
  pairs = codes.reshape(-1, 2)
  return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_rows(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Row-layout bytes ``[..., last / 2]`` -> codes of ``shape`` (high nibble first)."""
  return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(shape)


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
  """Inverse of :func:`pack_nibbles`: the first ``n`` codes."""
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
  return codes if codes.shape[0] == n else codes[:n]


# --------------------------------------------------------------- torch's float32 sum

def _ceil_log2(x: int) -> int:
  return 0 if x <= 1 else int(math.ceil(math.log2(x)))


def _seq_sum(rows: jax.Array) -> jax.Array:
  """Sum along axis 0 strictly left to right, starting from 0 (no reassociation)."""
  zero = jnp.zeros(rows.shape[1:], rows.dtype)
  if rows.shape[0] == 0:
    return zero
  if rows.shape[0] <= 32:
    acc = zero
    for i in range(rows.shape[0]):
      acc = acc + rows[i]
    return acc
  return jax.lax.scan(lambda c, r: (c + r, None), zero, rows)[0]


def _seq_sum_groups(x: jax.Array, step: int) -> jax.Array:
  """``[m, ...] -> [m // step, ...]``: sequential sums of consecutive groups of ``step``."""
  g = x.shape[0] // step
  grouped = x[: g * step].reshape((g, step) + x.shape[1:])
  return _seq_sum(jnp.moveaxis(grouped, 1, 0))


def _cascade_sum(rows: jax.Array) -> jax.Array:
  """Four-level cascade over ``rows [size, ...]`` in the order of ATen's ``multi_row_sum``."""
  size = rows.shape[0]
  power = max(4, _ceil_log2(size) // 4)
  step = 1 << power
  nchunks = size // step
  chunk = _seq_sum_groups(rows[: nchunks * step], step)          # level 0 sums
  tail0 = _seq_sum(rows[nchunks * step:])
  l1 = _seq_sum_groups(chunk, step)
  acc1 = _seq_sum(chunk[l1.shape[0] * step:])
  l2 = _seq_sum_groups(l1, step)
  acc2 = _seq_sum(l1[l2.shape[0] * step:])
  acc3 = _seq_sum(l2)
  return ((tail0 + acc1) + acc2) + acc3


def mean_torch_order(x: jax.Array, lanes: int = 8) -> jax.Array:
  """float32 mean of a 1-d array summed in the order of torch's CPU ``sum`` kernel.

  bitsandbytes' double quantization subtracts ``absmax.mean()`` computed by torch;
  summing in the same order (vector lanes of ``lanes`` floats, 4 interleaved
  accumulators, a 4-level cascade, then the lanes left to right; ``lanes=8`` for
  torch's AVX2 kernels) reproduces that float32 value exactly, where a pairwise or
  float64 sum can differ in the last bit. Costs O(n) adds, negligible next to the
  quantization itself.
  """
  x = x.astype(jnp.float32).reshape(-1)
  n = x.shape[0]
  nvec = n // lanes
  vec = x[: nvec * lanes].reshape(nvec, lanes)
  size_ilp = nvec // 4
  ps = _cascade_sum(vec[: size_ilp * 4].reshape(size_ilp, 4, lanes))   # [4, lanes]
  p0 = ps[0]
  for i in range(size_ilp * 4, nvec):
    p0 = p0 + vec[i]
  for k in range(1, 4):
    p0 = p0 + ps[k]
  acc = jnp.float32(0.0)
  for k in range(nvec * lanes, n):
    acc = acc + x[k]
  for k in range(lanes):
    acc = acc + p0[k]
  # a data-dependent divisor: XLA rewrites a division by a constant into a
  # multiplication by its (rounded) reciprocal, which is not torch's float32 division
  return acc / jnp.where(acc != acc, jnp.float32(1.0), jnp.float32(n))


# ----------------------------------------------------------------------- the codec

def _no_fma(p: jax.Array) -> jax.Array:
  """``p`` unchanged (NaN included), behind a select that keeps XLA:CPU from contracting
  ``p = a * b`` and a following ``p + c`` into one FMA: an FMA rounds once where
  bitsandbytes rounds twice, which changes the last bit (``optimization_barrier`` is
  removed before fusion and does not prevent it)."""
  return jnp.where(p != p, jnp.float32(jnp.nan), p)


@lazy.pytree_dataclass(static=("shape", "dtype", "block_size", "quant_type"))
class Quant4(StoredSizes):
  """A tensor in 4-bit NF4/FP4 codes with (optionally double-quantized) block absmax.

  Attributes:
    packed: uint8 ``[ceil(n / 2)]``, two codes a byte, first element high nibble (row
      layout, :meth:`rows`: ``[..., last / 2]``).
    absmax: float32 ``[ceil(n / block_size)]``, or a :class:`Blockwise8` of
      ``absmax - offset`` when double-quantized (row layout: ``[..., last / block_size]``
      when the blocks tile the rows).
    offset: float32 scalar ``μ`` (double quantization) or ``None``.
    shift: optional per-block shift ``τ`` added after decoding (IR-QLoRA's
      information calibration, :mod:`calibration`; ``None`` for plain NF4): a float array
      ``[num_blocks]`` or its 8-bit :class:`Blockwise8` codes.
    shape, dtype: the encoded tensor's shape and dtype (static).
    block_size: elements per block (power of two).
    quant_type: ``"nf4"`` or ``"fp4"``.
  """
  packed: jax.Array
  absmax: Union[jax.Array, Blockwise8]
  offset: Optional[jax.Array]
  shift: Optional[Union[jax.Array, Blockwise8]]
  shape: tuple[int, ...]
  dtype: Any
  block_size: int = 64
  quant_type: str = "nf4"

  # -- encoding
  @classmethod
  def encode(cls, x: jax.Array, block_size: int = 64, double_quant: bool = True,
             quant_type: str = "nf4", dq_block_size: int = 256, name: Optional[str] = None,
             shift: Optional[jax.Array] = None, icq: bool = False, icq_range: float = 0.1,
             icq_steps: int = 51, shift_storage: str = "int8") -> "Quant4":
    """Encodes ``x`` (float32/bfloat16/float16, any shape; the last block may be partial).

    Args:
      x: the tensor.
      block_size: elements per absmax block, a power of two (QLoRA: 64).
      double_quant: 8-bit-quantize the centred absmaxes (blocks of ``dq_block_size``).
      quant_type: ``"nf4"`` or ``"fp4"``.
      dq_block_size: block of the second-level 8-bit codec (bitsandbytes: 256).
      name: leaf path used in error messages.
      shift: optional per-block shift ``τ`` (float32 ``[num_blocks]``) subtracted before
        and added after decoding, stored as given.
      icq: choose ``τ`` by IR-QLoRA's information calibration (:func:`calibration.icq_search`:
        maximise each block's code entropy); excludes ``shift``.
      icq_range, icq_steps: the ICQ grid ``λ in linspace(-r σ, r σ, 2 steps + 1)``.
      shift_storage: ICQ's ``τ`` storage: ``"int8"`` (8-bit dynamic blockwise codes, one
        absmax per ``dq_block_size`` blocks, as IR-QLoRA), ``"float16"`` or ``"float32"``.
        The block is coded as ``x - τ̂`` with the stored ``τ̂``.

    Returns:
      A :class:`Quant4`.
    """
    if quant_type not in QUANT_TYPES:
      raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; expected 'nf4' or 'fp4'")
    dtype = check_float_input(x, quant_type, name)
    block_size = check_block_size(block_size)
    x = jnp.asarray(x)
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    stored_shift = shift
    if icq:  # IR-QLoRA's ICQ: entropy-maximising per-block shift (lowrank_jax.quant.calibration)
      if shift is not None:
        raise ValueError(f"{quant_type}: pass either shift= or icq=True, not both")
      stored_shift, shift = calibration.icq_shift(flat, block_size, quant_type, icq_range,
                                                  icq_steps, shift_storage, dq_block_size)
      shift = _no_fma(shift)  # τ̂ = c8[q] * M: keep jit and eager encodes bit-identical
    if shift is not None:
      flat = (to_blocks(flat, block_size) - shift[:, None]).reshape(-1)[:n]
    absmax = block_absmax(flat, block_size)
    z = normalize_blocks(flat, absmax, block_size, "reciprocal")
    if n % 2:  # bitsandbytes pads the *value* 0: the code of 0 (NF4: 7, FP4: 0)
      z = jnp.pad(z, (0, 1))
    packed = pack_nibbles(code_index(z, quant_type))
    offset = None
    stored = absmax
    if double_quant:
      offset = mean_torch_order(absmax)
      stored = Blockwise8.encode(absmax - offset, block_size=check_block_size(
          dq_block_size, "dq_block_size"), rounding="bnb_cpu")
    return cls(packed=packed, absmax=stored, offset=offset, shift=stored_shift, shape=tuple(x.shape),
               dtype=dtype, block_size=block_size, quant_type=quant_type)

  # -- checks
  @property
  def num_blocks(self) -> int:
    return num_blocks_of(self.size, self.block_size)

  @property
  def double_quant(self) -> bool:
    return isinstance(self.absmax, Blockwise8)

  @property
  def code(self) -> np.ndarray:
    return codebooks.code_book(self.quant_type)

  def validate(self, shape: Optional[tuple[int, ...]] = None) -> None:
    """Raises if the buffers do not fit ``shape`` (default: the stored shape)."""
    if shape is not None and tuple(shape) != tuple(self.shape):
      raise ValueError(f"{self.quant_type}: cannot decode a tensor of shape {tuple(self.shape)} "
                       f"as shape {tuple(shape)}")
    n = self.size
    want_packed = (tuple(self.shape[:-1]) + (self.shape[-1] // 2,) if self.row_layout
                   else ((n + 1) // 2,))
    if tuple(self.packed.shape) != want_packed:
      raise ValueError(f"{self.quant_type}: packed codes have shape {tuple(self.packed.shape)} but "
                       f"shape {self.shape} needs {want_packed} bytes")
    for what, buf in (("absmax", self.absmax), ("shift", self.shift)):
      if buf is None:
        continue
      got = tuple(buf.shape) if not isinstance(buf, Blockwise8) else (
          tuple(buf.shape) if self.row_layout else (buf.size,))
      if got != self._block_shape():
        raise ValueError(f"{self.quant_type}: {what} has shape {got} but shape {self.shape} "
                         f"with block {self.block_size} needs {self._block_shape()}")
      if isinstance(buf, Blockwise8):
        buf.validate()
    if jnp.dtype(self.dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise TypeError(f"{self.quant_type}: unsupported dtype {self.dtype}")

  # -- layouts
  @property
  def row_layout(self) -> bool:
    """Whether the buffers are stored per row (:meth:`rows`), not flat (bitsandbytes')."""
    return len(self.shape) >= 2 and self.packed.ndim == len(self.shape)

  def _row_blocks(self) -> Optional[tuple[int, ...]]:
    return row_blocks_shape(self.shape, self.block_size) if self.row_layout else None

  def _block_shape(self) -> tuple[int, ...]:
    """Shape of the per-block buffers in the current layout."""
    return self._row_blocks() or (self.num_blocks,)

  def _with_buffers(self, packed, per_block) -> "Quant4":
    return Quant4(packed=packed, absmax=per_block(self.absmax), offset=self.offset,
                  shift=None if self.shift is None else per_block(self.shift), shape=self.shape,
                  dtype=self.dtype, block_size=self.block_size, quant_type=self.quant_type)

  def rows(self) -> "Quant4":
    """The row layout (module docstring): the same bytes, ``packed [..., last / 2]`` and the
    per-block buffers ``[..., last / block_size]`` when the blocks tile the rows. A
    tensor of < 2 dims or with an odd last axis (a byte would span two rows) is
    returned unchanged, as is a row-layout one."""
    if len(self.shape) < 2 or self.shape[-1] % 2 or self.row_layout:
      return self
    rb = row_blocks_shape(self.shape, self.block_size)

    def per_block(buf):
      if rb is None:
        return buf
      if isinstance(buf, Blockwise8):
        return buf.reshaped(rb).rows()
      return buf.reshape(rb)

    return self._with_buffers(self.packed.reshape(tuple(self.shape[:-1]) + (self.shape[-1] // 2,)),
                              per_block)

  def flat(self) -> "Quant4":
    """bitsandbytes' flat layout (what :meth:`encode` returns): the export boundary."""
    nb = self.num_blocks

    def per_block(buf):
      if isinstance(buf, Blockwise8):
        return buf.reshaped((nb,))
      return buf.reshape(-1)

    return self._with_buffers(self.packed.reshape(-1), per_block)

  def buffer_specs(self, spec, axis_sizes) -> "Quant4":
    """``PartitionSpec`` per buffer for a tensor placed by ``spec`` (a ``Quant4`` of specs,
    the argument :func:`jax.device_put` takes with a mesh).

    Row layout: ``packed`` takes ``spec``; the per-block buffers take it too when the
    blocks tile the rows (their last entry dropped if it does not divide the blocks),
    the second-level scales and ``offset`` are replicated. Flat layout: only a split of
    the leading axis into whole blocks fits.

    Raises:
      ValueError: ``spec`` does not fit (an odd number of bytes per shard of the last
        axis; a flat layout split along another axis: call :meth:`rows` first).
    """
    if not self.row_layout:
      big = flat_spec(spec, self.size, self.block_size, 2, axis_sizes, self.quant_type)
      packed = big

      def per_block(buf):
        if isinstance(buf, Blockwise8):
          return Blockwise8(codes=big, absmax=PartitionSpec(), shape=buf.shape, dtype=buf.dtype,
                            block_size=buf.block_size, rounding=buf.rounding)
        return big
    else:
      entries = list(spec) + [None] * (len(self.shape) - len(spec))
      k = mesh_entry_size(axis_sizes, entries[-1])
      if (self.shape[-1] // 2) % k:
        raise ValueError(f"{self.quant_type}: the last axis ({self.shape[-1]}, "
                         f"{self.shape[-1] // 2} bytes) does not split into {k} shards of whole "
                         f"bytes along {entries[-1]!r}")
      packed = spec
      rb = self._row_blocks()

      def per_block(buf):
        if isinstance(buf, Blockwise8):
          return (buf.buffer_specs(block_spec(spec, rb, axis_sizes), axis_sizes) if rb is not None
                  else Blockwise8(codes=PartitionSpec(), absmax=PartitionSpec(), shape=buf.shape,
                                  dtype=buf.dtype, block_size=buf.block_size, rounding=buf.rounding))
        return block_spec(spec, rb, axis_sizes)
    return Quant4(packed=packed, absmax=per_block(self.absmax),
                  offset=None if self.offset is None else PartitionSpec(),
                  shift=None if self.shift is None else per_block(self.shift), shape=self.shape,
                  dtype=self.dtype, block_size=self.block_size, quant_type=self.quant_type)

  # -- decoding
  def block_scales(self) -> jax.Array:
    """float32 absmax per block (dequantized when double-quantized), laid out like the
    per-block buffers (flat ``[num_blocks]`` or ``[..., last / block_size]``)."""
    if self.double_quant:
      return _no_fma(self.absmax.decode_float32()) + self.offset
    return self.absmax

  def block_shifts(self) -> Optional[jax.Array]:
    """float32 shift ``τ`` per block (decoded when stored in 8 bits), or ``None``."""
    if self.shift is None:
      return None
    if isinstance(self.shift, Blockwise8):
      return self.shift.decode_float32()
    return self.shift.astype(jnp.float32)

  def decode_float32(self) -> jax.Array:
    """float32 values ``c[q] * m_b (+ τ_b)``, shaped like the tensor."""
    self.validate()
    n = self.size
    if self.row_layout:  # per element, without reshaping the (possibly sharded) axes
      vals = jnp.asarray(self.code)[unpack_rows(self.packed, self.shape).astype(jnp.int32)]
      out = vals * expand_blocks(self.block_scales(), self.shape, self.block_size)
      if self.shift is not None:
        out = _no_fma(out) + _no_fma(expand_blocks(self.block_shifts(), self.shape, self.block_size))
      return out
    vals = jnp.asarray(self.code)[unpack_nibbles(self.packed, n).astype(jnp.int32)]
    out = to_blocks(vals, self.block_size) * self.block_scales()[:, None]
    if self.shift is not None:
      out = _no_fma(out) + _no_fma(self.block_shifts())[:, None]
    return out.reshape(-1)[:n].reshape(self.shape)

  def decode(self, dtype=None, shape: Optional[tuple[int, ...]] = None) -> jax.Array:
    """The tensor in ``dtype`` (default: the encoded dtype).

    Args:
      dtype: output dtype; the math is float32, then cast (as bitsandbytes).
      shape: optional expected shape; a mismatch raises.
    """
    if shape is not None:
      self.validate(shape)
    if dtype is None:
      dtype = self.dtype
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{self.quant_type}: cannot decode to non-float dtype {dtype}")
    return self.decode_float32().astype(dtype)

  def error_bound(self) -> jax.Array:
    """float32 bound on ``|decode() - x|`` per element, for ``x`` the encoded tensor.

    A block with absmax ``m`` (of ``x - τ`` with ICQ) codes ``z = x / m`` to the nearest
    entry ``c``, ``|z - c| <= e4`` (:func:`codebooks.max_rounding_error`), and decodes
    ``c m̂``; with double quantization ``|m - m̂| <= d = e8 M`` (``M`` the block's
    second-level absmax), so ``|x - c m̂| <= e4 (m̂ + d) + d``.
    """
    e4 = codebooks.max_rounding_error(self.quant_type)
    m_hat = self.block_scales()
    if self.double_quant:
      e8 = codebooks.max_rounding_error("dynamic8", self.absmax.rounding)
      d = jnp.float32(e8) * self.absmax.element_absmax().reshape(m_hat.shape)
    else:
      d = jnp.zeros_like(m_hat)
    per_block = jnp.float32(e4) * (m_hat + d) + d
    if self.row_layout:
      return expand_blocks(per_block, self.shape, self.block_size)
    return jnp.repeat(per_block, self.block_size)[: self.size].reshape(self.shape)

  # -- sizes: ``size``, ``nbytes`` and ``bits_per_param`` from the real buffers (codes, absmax
  # or its 8-bit codes + second-level scales, offset, shift; NF4+DQ at block 64: 4.127 bits)
  # are StoredSizes'. The constant code tables (64 B for 4-bit, 1 KiB for DQ) are shared and
  # not counted.

  def partition_spec(self, axis: Any):
    """A pytree of ``PartitionSpec``: the large buffers split along ``axis``, the
    second-level scales and offset replicated. Decoding a leaf placed with it
    needs no communication when each shard holds whole blocks (e.g. rows of a
    matrix whose row length is a multiple of ``block_size``)."""
    big = PartitionSpec(axis)
    def per_block(buf):  # a per-block buffer, plain or 8-bit coded (second-level scales replicated)
      if isinstance(buf, Blockwise8):
        return Blockwise8(codes=big, absmax=PartitionSpec(), shape=buf.shape, dtype=buf.dtype,
                          block_size=buf.block_size, rounding=buf.rounding)
      return big
    return Quant4(packed=big, absmax=per_block(self.absmax), offset=None if self.offset is None else PartitionSpec(),
                  shift=None if self.shift is None else per_block(self.shift), shape=self.shape, dtype=self.dtype,
                  block_size=self.block_size, quant_type=self.quant_type)


def nf4_encode(x: jax.Array, block_size: int = 64, double_quant: bool = True, **kw) -> Quant4:
  """NF4 codes of ``x`` (see :meth:`Quant4.encode`; ``icq=True`` for IR-QLoRA's ICQ)."""
  return Quant4.encode(x, block_size, double_quant, "nf4", **kw)


def fp4_encode(x: jax.Array, block_size: int = 64, double_quant: bool = True, **kw) -> Quant4:
  """FP4 codes of ``x`` (see :meth:`Quant4.encode`)."""
  return Quant4.encode(x, block_size, double_quant, "fp4", **kw)
