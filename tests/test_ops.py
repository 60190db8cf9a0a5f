"""The shared dropout op: exact expectation, keep rate, independence of the two 16-bit halves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import ops


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_dropout_statistics(rate):
  x = jnp.ones((400, 1000))
  y = np.asarray(ops.dropout(x, rate, jax.random.key(0)))
  keep = y != 0
  p = ops.keep_probability(rate)
  assert abs(p - (1 - rate)) < 2**-16
  # binomial: 4e5 draws, 5 sigma
  assert abs(keep.mean() - p) < 5 * np.sqrt(p * (1 - p) / keep.size)
  np.testing.assert_allclose(y[keep], 1 / p, rtol=1e-6)
  # neighbours share one 32-bit draw: their masks must still be uncorrelated
  a, b = keep[:, 0::2].ravel().astype(float), keep[:, 1::2].ravel().astype(float)
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


def test_dropout_identity_cases_and_errors():
  x = jnp.arange(6.0)
  assert ops.dropout(x, 0.0, jax.random.key(0)) is x
  assert ops.dropout(x, 0.5, None) is x
  with pytest.raises(ValueError, match="rate"):
    ops.dropout(x, 1.0, jax.random.key(0))
  y = ops.dropout(x.astype(jnp.bfloat16), 0.5, jax.random.key(1))
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(3, 5), (4, 6), (7,)])
def test_dropout_mask_takes_two_16_bit_halves_per_32_bit_draw(shape):
  key = jax.random.key(3)
  keep, scale = ops.dropout_mask(key, shape, 0.25)
  n = int(np.prod(shape))
  words = np.asarray(jax.random.bits(key, ((n + 1) // 2,), jnp.uint32))
  halves = words.view(np.uint16)[:n].reshape(shape)  # little-endian: low half first, as XLA
  threshold = round(0.75 * 2**16)
  np.testing.assert_array_equal(np.asarray(keep), halves < threshold)
  assert scale == 2**16 / threshold
  # deterministic in the key (a backward pass redraws the forward's mask)
  np.testing.assert_array_equal(np.asarray(ops.dropout_mask(key, shape, 0.25)[0]), np.asarray(keep))
  assert ops.dropout_mask(key, shape, 0.0) == (None, 1.0)
