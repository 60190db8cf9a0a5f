"""Affine PTQ: closed-form error bounds, exact recovery on the grid, storage dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.quant.affine import affine_encode, quantization_error


def _w(shape=(64, 48), seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_error_within_half_step(bits, symmetric, granularity):
  w = _w()
  q = affine_encode(w, bits, symmetric, granularity, group_size=16)
  expect = {(4, True): jnp.int4, (4, False): jnp.uint4, (8, True): jnp.int8, (8, False): jnp.uint8}
  assert q.q.dtype == expect[(bits, symmetric)]
  y = q.decode()
  assert y.shape == w.shape and y.dtype == w.dtype
  s = q.scale if granularity == "tensor" else jnp.repeat(q.scale, q.group_size, axis=0)
  assert bool(jnp.all(jnp.abs(y - w) <= s / 2 * (1 + 1e-5) + 1e-7))
  rep = quantization_error(w, q)
  assert rep["max_abs"] <= float(jnp.max(s)) / 2 * (1 + 1e-5)
  assert rep["bits_per_param"] > bits


def test_exact_on_grid_and_finer_groups_are_better():
  scale = jnp.linspace(0.01, 0.1, 48)
  k = jnp.asarray(np.random.default_rng(1).integers(-127, 128, (64, 48)), jnp.float32)
  k = k.at[0].set(127.0)  # every column reaches the max code
  w = k * scale
  q = affine_encode(w, 8, True, "channel")
  np.testing.assert_allclose(np.asarray(q.decode()), np.asarray(w), rtol=1e-6, atol=1e-7)
  x = _w((128, 32), 3)
  errs = [quantization_error(x, affine_encode(x, 4, False, g, group_size=16))["rel_fro"]
          for g in ("tensor", "channel", "group")]
  assert errs[0] > errs[1] > errs[2]
  # int8 is more accurate than int4 (SQNR ~ 6 dB per bit)
  e8 = quantization_error(x, affine_encode(x, 8, True, "channel"))["sqnr_db"]
  e4 = quantization_error(x, affine_encode(x, 4, True, "channel"))["sqnr_db"]
  assert e8 - e4 > 20


def test_jit_and_errors():
  w = _w()
  q = jax.jit(lambda w: affine_encode(w, 4, False, "group", 16))(w)
  np.testing.assert_array_equal(np.asarray(q.decode()), np.asarray(affine_encode(w, 4, False, "group", 16).decode()))
  with pytest.raises(ValueError, match="group_size"):
    affine_encode(w, 4, group_size=24, name="dense/kernel")
  with pytest.raises(ValueError, match="bits"):
    affine_encode(w, 3)
  with pytest.raises(TypeError, match="dense/kernel"):
    affine_encode(jnp.ones((4, 4), jnp.int32), name="dense/kernel")
  with pytest.raises(ValueError, match="shape"):
    q.decode(shape=(48, 64))
