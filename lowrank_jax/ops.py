"""Small numerical ops shared by the models and the lazy weights."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["dropout", "keep_probability"]

_LEVELS = 1 << 16


def keep_probability(rate: float) -> float:
  """The exact keep probability :func:`dropout` uses: ``round((1 - rate) 2^16) / 2^16``."""
  return round((1.0 - rate) * _LEVELS) / _LEVELS


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
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  threshold = round((1.0 - rate) * _LEVELS)
  if threshold >= _LEVELS:
    return x
  keep = jax.random.bits(rng, x.shape, jnp.uint16) < jnp.uint16(threshold)
  scale = jnp.asarray(_LEVELS / threshold, x.dtype)
  return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))
