"""Codecs: one protocol and one registry.

A *codec* is a tensor stored in codes: a registered pytree node whose array leaves are
everything it stores (codes, scales, zero points, second-level codes) and whose static
fields describe the encoded tensor. Every codec follows :class:`Codec`:

* ``shape``, ``dtype``, ``size`` - the encoded tensor's;
* ``decode(dtype=None)`` - the tensor (float32 math, then cast; default: its own dtype);
* ``nbytes``, ``bits_per_param`` - from the real buffers, written once
  (:class:`~lowrank_jax.quant.sizes.StoredSizes`: sub-byte codes counted packed);
* ``error_bound()`` - a float32 per-element bound on ``|decode() - x|`` for the encoded
  ``x``, computed from the stored scales (the documented error of the codec).

The registry :data:`CODECS` names each codec by what it is; :func:`get_codec` resolves a
name (or an old alias such as ``"int8"``) to its :class:`CodecSpec`, whose ``encode`` is
the one place a name becomes a codec::

    spec = get_codec("nf4")
    q = spec.encode(w, block_size=64, double_quant=True)       # a Quant4
    q = encode(w, "int4_affine", block_size=32)                 # AffineQuant, groups of 32 rows
    lowrank_jax.quantize(theta0, r"kernel$", codec="nf4")       # every selected leaf

=========================  ===============================================================
name                       codec
=========================  ===============================================================
``nf4``                    4-bit NormalFloat, absmax per block, double quantization, ICQ
``fp4``                    4-bit float (bitsandbytes FP4), same layout as ``nf4``
``int8_blockwise_dynamic`` 8-bit dynamic map, absmax per block (bitsandbytes blockwise)
``int8_affine``            8-bit affine (``(q - Z) S``) per group of input rows
``int4_affine``            4-bit affine per group of input rows (GPTQ / QA-LoRA layout)
=========================  ===============================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import jax

from lowrank_jax.quant.affine import AffineQuant, affine_encode
from lowrank_jax.quant.blockwise import Blockwise8, check_float_input
from lowrank_jax.quant.nf4 import Quant4

__all__ = ["Codec", "CodecSpec", "CODECS", "ALIASES", "get_codec", "encode", "codec_names"]


@runtime_checkable
class Codec(Protocol):
  """What every codec provides (see the module docstring); ``isinstance`` checks it."""
  shape: tuple[int, ...]
  dtype: Any

  @property
  def size(self) -> int: ...

  @property
  def nbytes(self) -> int: ...

  @property
  def bits_per_param(self) -> float: ...

  def decode(self, dtype=None) -> jax.Array: ...

  def error_bound(self) -> jax.Array: ...


Encoder = Callable[..., Codec]


@dataclasses.dataclass(frozen=True)
class CodecSpec:
  """One registered codec.

  Attributes:
    name: the registry name (what the codec is).
    description: one line for tables and errors.
    codec_type: the pytree class ``encode`` returns.
    encoder: ``(x, block_size, double_quant, name, **options) -> codec``.
    options: the extra keyword options ``encode`` accepts (``icq`` for ``nf4``...).
    uses_double_quant: whether ``double_quant`` means anything (ignored otherwise).
  """
  name: str
  description: str
  codec_type: type
  encoder: Encoder
  options: tuple[str, ...]
  uses_double_quant: bool = False

  def encode(self, x: jax.Array, *, block_size: int = 64, double_quant: bool = True,
             name: Optional[str] = None, **options) -> Codec:
    """Encodes ``x`` (float32/bfloat16/float16, not empty).

    Args:
      x: the tensor.
      block_size: absmax block (4-bit: 64; 8-bit: 256 is usual) or, for the affine
        codecs, the group of input rows.
      double_quant: 8-bit-quantize the 4-bit codecs' block absmaxes.
      name: leaf path named in error messages.
      **options: the codec's own options (see :attr:`options`).

    Raises:
      TypeError / ValueError naming the leaf, the codec and the valid options.
    """
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      raise TypeError(f"codec {self.name!r}: unknown option(s) {unknown}; valid: {list(self.options)}")
    check_float_input(x, self.name, name)
    return self.encoder(x, block_size, double_quant, name, **options)


def _options(fn: Callable, taken: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(p for p in inspect.signature(fn).parameters if p not in taken)


def _quant4(quant_type: str) -> Encoder:
  def enc(x, block_size, double_quant, name, **options):
    return Quant4.encode(x, block_size, double_quant, quant_type, name=name, **options)
  return enc


def _blockwise8(x, block_size, double_quant, name, **options):
  return Blockwise8.encode(x, block_size, **options)


def _affine(bits: int) -> Encoder:
  def enc(x, block_size, double_quant, name, **options):
    return affine_encode(x, bits=bits, group_size=block_size, name=name, **options)
  return enc


_Q4_OPTIONS = _options(Quant4.encode, ("x", "block_size", "double_quant", "quant_type", "name"))
_B8_OPTIONS = _options(Blockwise8.encode, ("x", "block_size"))
_AFFINE_OPTIONS = _options(affine_encode, ("x", "bits", "group_size", "name"))

CODECS: Mapping[str, CodecSpec] = types.MappingProxyType({s.name: s for s in (
  CodecSpec("nf4", "4-bit NormalFloat (QLoRA), absmax per block, optional double quantization "
            "and IR-QLoRA ICQ shift (icq=True)", Quant4, _quant4("nf4"), _Q4_OPTIONS, True),
  CodecSpec("fp4", "4-bit float (bitsandbytes FP4), absmax per block, optional double "
            "quantization", Quant4, _quant4("fp4"), _Q4_OPTIONS, True),
  CodecSpec("int8_blockwise_dynamic", "8-bit dynamic map, absmax per block (bitsandbytes "
            "quantize_blockwise)", Blockwise8, _blockwise8, _B8_OPTIONS),
  CodecSpec("int8_affine", "8-bit affine (q - Z) S per group of block_size input rows "
            "(symmetric by default)", AffineQuant, _affine(8), _AFFINE_OPTIONS),
  CodecSpec("int4_affine", "4-bit affine (q - Z) S per group of block_size input rows "
            "(GPTQ / QA-LoRA layout; symmetric by default)", AffineQuant, _affine(4),
            _AFFINE_OPTIONS),
)})

# old names, kept working
ALIASES: Mapping[str, str] = types.MappingProxyType({
  "int8": "int8_blockwise_dynamic",
  "blockwise8": "int8_blockwise_dynamic",
})


def codec_names() -> list[str]:
  """Registered names and aliases, sorted."""
  return sorted({*CODECS, *ALIASES})


def get_codec(name: str) -> CodecSpec:
  """The :class:`CodecSpec` registered as ``name`` (or an alias of it).

  Raises:
    ValueError naming the closest registered names (did you mean ...?) and all of them.
  """
  if isinstance(name, str):
    spec = CODECS.get(ALIASES.get(name, name))
    if spec is not None:
      return spec
  close = difflib.get_close_matches(str(name), codec_names(), n=3, cutoff=0.5)
  hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
  raise ValueError(f"unknown codec {name!r}{hint} Registered codecs: {', '.join(codec_names())}")


def encode(x: jax.Array, codec: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
           name: Optional[str] = None, **options) -> Codec:
  """``get_codec(codec).encode(x, ...)`` (see :meth:`CodecSpec.encode`)."""
  return get_codec(codec).encode(x, block_size=block_size, double_quant=double_quant, name=name,
                                 **options)
