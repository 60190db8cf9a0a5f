"""Sizes of a codec from its real buffers, written once for every codec.

A codec (:class:`~lowrank_jax.quant.codecs.Codec`) is a pytree node whose array leaves
are everything it stores (codes, scales, zero points, second-level codes...). Its size
in bytes is the sum of :func:`lowrank_jax.tree.array_bytes` over those leaves (sub-byte
codes such as ``int4`` counted packed, two to a byte), and its bits per parameter
``8 * nbytes / size``, with ``size`` the number of elements of the encoded tensor.
Constant code tables shared by every tensor (the 16 NF4 values, the 256 dynamic-map
values) are module constants, not leaves, and are not counted.
"""

from __future__ import annotations

import math

from lowrank_jax import tree as tree_lib

__all__ = ["StoredSizes"]


class StoredSizes:
  """Mixin of the codecs (a pytree dataclass with a static ``shape``): ``size``,
  ``nbytes`` and ``bits_per_param`` from the real buffers."""

  @property
  def size(self) -> int:
    """Number of elements of the encoded tensor."""
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored buffers (every array leaf, sub-byte codes packed)."""
    return tree_lib.count_bytes(self)

  @property
  def bits_per_param(self) -> float:
    """``8 * nbytes / size``."""
    return 8.0 * self.nbytes / self.size
