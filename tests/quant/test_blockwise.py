"""8-bit dynamic blockwise codec: bit-exact with bitsandbytes (golden), API, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.quant import codebooks
from lowrank_jax.quant.blockwise import Blockwise8, blockwise8_decode, blockwise8_encode
from tests.conftest import load_golden

GOLD, _ = load_golden("bnb_codecs")


@pytest.mark.parametrize("case", ["w", "odd", "bf16", "heavy"])
def test_bit_exact_with_bitsandbytes(case):
  x = jnp.asarray(GOLD[f"{case}/x"], jnp.bfloat16 if case == "bf16" else jnp.float32)
  q = jax.jit(blockwise8_encode)(x)
  np.testing.assert_array_equal(codebooks.DYNAMIC8_CODE, GOLD[f"{case}/blockwise8/code"])
  np.testing.assert_array_equal(np.asarray(q.codes), GOLD[f"{case}/blockwise8/q"])
  np.testing.assert_array_equal(np.asarray(q.absmax), GOLD[f"{case}/blockwise8/absmax"])
  y = blockwise8_decode(q, jnp.float32)
  np.testing.assert_array_equal(np.asarray(y).reshape(-1), GOLD[f"{case}/blockwise8/dequant"])
  assert blockwise8_decode(q).dtype == x.dtype and q.shape == x.shape


def test_dynamic_map_structure():
  c = codebooks.DYNAMIC8_CODE
  assert c.shape == (256,) and np.all(np.diff(c) > 0)
  assert c[-1] == 1.0 and c[0] == np.float32(-0.99296874) and (c == 0).sum() == 1
  t = codebooks.BNB_CPU_DYNAMIC8_THRESHOLDS
  assert t.shape == (255,) and np.all(np.diff(t) >= 0)


def test_nearest_rounding_error_bound_and_vmap():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1000)), jnp.float32)
  q = blockwise8_encode(x, 256, rounding="nearest")
  c = codebooks.DYNAMIC8_CODE
  half = max(float(np.max(np.diff(c))) / 2, 1.0 + float(c[0]))  # -1 is not in the map
  am = np.repeat(np.asarray(q.absmax), 256)[: x.size].reshape(x.shape)
  assert np.all(np.abs(np.asarray(q.decode()) - np.asarray(x)) <= half * am * (1 + 1e-5))
  qs = jax.vmap(lambda r: blockwise8_encode(r, 128))(x)
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(qs.codes[i]), np.asarray(blockwise8_encode(x[i], 128).codes))
  assert q.bits_per_param == 8 * (x.size + 4 * 16) / x.size


def test_errors():
  with pytest.raises(ValueError, match="power of two"):
    blockwise8_encode(jnp.ones(10), 100)
  with pytest.raises(TypeError, match="integer"):
    blockwise8_encode(jnp.ones(10, jnp.int32))
  q = blockwise8_encode(jnp.ones(300))
  bad = Blockwise8(codes=q.codes[:-1], absmax=q.absmax, shape=q.shape, dtype=q.dtype)
  with pytest.raises(ValueError, match="codes"):
    bad.decode()
  with pytest.raises(TypeError, match="Blockwise8"):
    blockwise8_decode(jnp.ones(3))
