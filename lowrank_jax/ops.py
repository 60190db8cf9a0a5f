"""Small numerical ops shared by the models and the lazy weights."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["apply_dropout_mask", "dropout", "dropout_mask", "keep_probability", "stat_dtype"]

_LEVELS = 1 << 16


def stat_dtype(dtype):
  """Statistics (norms, softmax) are computed in at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def keep_probability(rate: float) -> float:
  """The exact keep probability :func:`dropout` uses: ``round((1 - rate) 2^16) / 2^16``."""
  return round((1.0 - rate) * _LEVELS) / _LEVELS


def dropout_mask(rng: jax.Array, shape: tuple[int, ...], rate: float
                 ) -> tuple[Optional[jax.Array], float]:
  """``(keep, scale)`` of :func:`dropout`: a boolean keep mask of ``shape`` (``None`` when
  nothing is dropped) and the inverse keep probability the kept values are scaled by.

  Deterministic in ``rng``, so a backward pass can redraw the forward's mask instead of
  storing it.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  threshold = round((1.0 - rate) * _LEVELS)
  if rate == 0.0 or threshold >= _LEVELS:
    return None, 1.0
  return _uint16_bits(rng, shape) < jnp.uint16(threshold), _LEVELS / threshold


def apply_dropout_mask(x: jax.Array, keep: Optional[jax.Array], scale: float) -> jax.Array:
  """``x * keep * scale`` for a :func:`dropout_mask` (``x`` itself when ``keep`` is None)."""
  if keep is None:
    return x
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


def _uint16_bits(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Random ``uint16`` of ``shape``, two from each 32-bit draw: ``jax.random.bits(...,
  jnp.uint16)`` spends a full 32-bit draw per element under the default partitionable
  threefry, twice the PRNG work (a large share of a training step with dropout on CPU)."""
  size = math.prod(shape)
  words = jax.random.bits(rng, ((size + 1) // 2,), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)
  return (halves if size % 2 == 0 else halves[:size]).reshape(shape)


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout; identity when ``rng is None`` or ``rate == 0``.

  The mask compares 16-bit random integers with a threshold, so one 32-bit draw of
  the PRNG serves two elements: about half the cost of ``jax.random.bernoulli`` (which
  draws a 32-bit float per element), a large share of a training step on CPU. The keep
  probability is quantised to 1/65536 (:func:`keep_probability`, e.g. 0.899994 for rate
  0.1) and the kept values are scaled by its inverse, so ``E[dropout(x)] = x`` exactly.
  """
  if rng is None or rate == 0.0:
    return x
  return apply_dropout_mask(x, *dropout_mask(rng, x.shape, rate))
