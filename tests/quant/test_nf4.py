"""NF4/FP4 codecs: bit-exact against bitsandbytes (golden), properties, transforms, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax.quant import codebooks
from lowrank_jax.quant.nf4 import Quant4, fp4_encode, mean_torch_order, nf4_encode
from tests.conftest import load_golden

GOLD, _ = load_golden("bnb_codecs")
CASES = ["w", "odd", "bf16", "heavy"]


def _input(case):
  x = GOLD[f"{case}/x"]
  return jnp.asarray(x, jnp.bfloat16 if case == "bf16" else jnp.float32)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [0, 1])
@pytest.mark.parametrize("bs", [64, 128])
def test_bit_exact_with_bitsandbytes(case, quant_type, dq, bs):
  p = f"{case}/{quant_type}/dq{dq}/bs{bs}/"
  np.testing.assert_array_equal(codebooks.code_book(quant_type), GOLD[p + "code"])
  x = _input(case)
  q = jax.jit(lambda x: Quant4.encode(x, bs, bool(dq), quant_type))(x)
  np.testing.assert_array_equal(np.asarray(q.packed), GOLD[p + "packed"])
  if dq:
    assert q.double_quant and q.absmax.block_size == int(GOLD[p + "blocksize2"])
    np.testing.assert_array_equal(np.asarray(q.absmax.codes), GOLD[p + "absmax"])
    np.testing.assert_array_equal(np.asarray(q.absmax.absmax), GOLD[p + "absmax2"])
    np.testing.assert_array_equal(np.asarray(q.offset), GOLD[p + "offset"])
    np.testing.assert_array_equal(codebooks.DYNAMIC8_CODE, GOLD[p + "code2"])
  else:
    np.testing.assert_array_equal(np.asarray(q.absmax), GOLD[p + "absmax"])
  deq = jax.jit(lambda q: q.decode())(q)
  assert deq.dtype == x.dtype and deq.shape == x.shape
  np.testing.assert_array_equal(np.asarray(deq.astype(jnp.float32)).reshape(-1),
                                GOLD[p + "dequant"].reshape(-1))


def test_eager_equals_jit():
  x = _input("odd")
  q = nf4_encode(x, 64, True)
  qj = jax.jit(nf4_encode, static_argnums=(1, 2))(x, 64, True)
  chex.assert_trees_all_equal(q, qj)
  np.testing.assert_array_equal(np.asarray(q.decode()), np.asarray(jax.jit(Quant4.decode)(qj)))


def test_tiny_vector_anchor():
  # anchors_torch.md 2.2: x = 2*linspace(-1,1,64) -> absmax 2 and these NF4 bytes
  x = 2 * jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)
  q = nf4_encode(x, 64, double_quant=False)
  assert float(q.absmax[0]) == 2.0
  b = np.asarray(q.packed)
  assert list(b[:8]) == [0x00, 0x00, 0x01, 0x11, 0x11, 0x11, 0x12, 0x22]
  assert list(b[-4:]) == [0xEE, 0xEF, 0xFF, 0xFF]


def test_bits_per_param_from_buffers():
  x = jnp.zeros((256, 512), jnp.float32) + 1.0
  q = nf4_encode(x, 64, True)
  n, nb = 256 * 512, 256 * 512 // 64
  assert q.nbytes == n // 2 + nb + 4 * (-(-nb // 256)) + 4
  assert q.bits_per_param == 8 * q.nbytes / n
  assert nf4_encode(x, 64, False).bits_per_param == 4.5
  # 4096 x 4096 without computing anything: 4 + 8/64 + 32/(64*256) (+ the 4-byte offset)
  big = jax.eval_shape(lambda w: nf4_encode(w, 64, True), jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
  assert abs(big.bits_per_param - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-5
  assert round(big.bits_per_param, 3) == 4.127


@settings(max_examples=6, deadline=None)
@given(n=st.sampled_from([1, 7, 64, 129, 333]), bs_pow=st.sampled_from([1, 5, 6, 8]), qt=st.sampled_from(["nf4", "fp4"]),
       dq=st.booleans(), dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       seed=st.integers(0, 2**16))
def test_roundtrip_error_bound_and_idempotence(n, bs_pow, qt, dq, dtype, seed):
  bs = 2 ** bs_pow
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(n) * 3, dtype)
  q = Quant4.encode(x, bs, dq, qt)
  y = q.decode(jnp.float32)
  assert q.decode().dtype == jnp.dtype(dtype)
  code = np.sort(codebooks.code_book(qt))
  half_gap = float(np.max(np.diff(code))) / 2
  xf = np.asarray(x, np.float32)
  pad = (-n) % bs
  am = np.abs(np.pad(xf, (0, pad))).reshape(-1, bs).max(1)
  scales = np.asarray(q.block_scales())
  # error <= half the widest code gap times the block scale (+ the scale's own DQ error)
  bound = np.repeat(half_gap * np.maximum(am, scales) + np.abs(scales - am), bs)[:n]
  assert np.all(np.abs(np.asarray(y) - xf) <= bound * (1 + 1e-6) + 1e-30)
  if not dq:  # decoding then re-encoding gives the same values (FP4's -0 may become +0)
    q2 = Quant4.encode(y, bs, False, qt)
    np.testing.assert_array_equal(np.asarray(q2.decode(jnp.float32)), np.asarray(y))


def test_mean_error_matches_bitsandbytes_figure():
  # anchors: NF4 bs64 mean abs error 0.0728 on N(0,1) (FP4 0.0965)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((512, 512)), jnp.float32)
  e_nf4 = float(jnp.mean(jnp.abs(nf4_encode(x, 64, False).decode() - x)))
  e_fp4 = float(jnp.mean(jnp.abs(fp4_encode(x, 64, False).decode() - x)))
  e_dq = float(jnp.mean(jnp.abs(nf4_encode(x, 64, True).decode() - x)))
  assert abs(e_nf4 - 0.0728) < 0.001 and abs(e_fp4 - 0.0965) < 0.0015
  assert e_nf4 <= e_dq < e_nf4 * 1.01


def test_mean_torch_order_close_to_mean():
  for n in [1, 7, 8, 33, 1000, 2048, 70001]:
    x = np.random.default_rng(n).uniform(0, 1, n).astype(np.float32)
    m = float(jax.jit(mean_torch_order)(jnp.asarray(x)))
    assert abs(m - x.astype(np.float64).mean()) <= 1e-6 * max(1.0, abs(m))


def test_mean_torch_order_equals_torch():
  torch = pytest.importorskip("torch")
  if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    pytest.skip("lane width assumption (8) is for x86 AVX2 kernels")
  if torch.backends.cpu.get_cpu_capability() == "AVX512":
    pytest.skip("torch uses 16-float lanes with AVX512 kernels")
  for n in [3, 8, 16, 100, 1024, 2048, 4097, 20000, 262144]:
    x = np.random.default_rng(n).uniform(0, 1, n).astype(np.float32)
    assert np.float32(jax.jit(mean_torch_order)(jnp.asarray(x))) == np.float32(torch.tensor(x).mean().item())


def test_against_bitsandbytes_random_shapes():
  pytest.importorskip("torch")
  bnb_f = pytest.importorskip("bitsandbytes.functional")
  import torch
  rng = np.random.default_rng(0)
  for shape, bs, qt, dq in [((37, 91), 64, "nf4", True), ((1000,), 32, "fp4", False)]:
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 4)
    packed, state = bnb_f.quantize_4bit(torch.tensor(x), blocksize=bs, compress_statistics=dq,
                                        quant_type=qt)
    q = Quant4.encode(jnp.asarray(x), bs, dq, qt)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    ref = bnb_f.dequantize_4bit(packed, state).numpy()  # bnb returns [1, n] for a vector
    np.testing.assert_array_equal(np.asarray(q.decode()).reshape(-1), ref.reshape(-1))


def test_vmap_matches_per_slice():
  xs = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 64)), jnp.float32)
  qs = jax.vmap(lambda x: nf4_encode(x, 64, True))(xs)
  dec = jax.vmap(lambda q: q.decode())(qs)
  for i in range(3):
    qi = nf4_encode(xs[i], 64, True)
    np.testing.assert_array_equal(np.asarray(qs.packed[i]), np.asarray(qi.packed))
    np.testing.assert_array_equal(np.asarray(dec[i]), np.asarray(qi.decode()))


def test_sharded_rows_decode_locally():
  devs = jax.devices()
  if len(devs) < 2:
    pytest.skip("needs >= 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.array(devs), ("x",))
  rows = 32 * len(devs)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((rows, 512)), jnp.float32)
  q = nf4_encode(w, 64, True)
  spec = q.partition_spec("x")
  shard = jax.tree.map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P))
  qs = jax.device_put(q, shard)
  assert len(qs.packed.sharding.device_set) == len(devs)
  dec = jax.jit(lambda q: q.decode(), out_shardings=NamedSharding(mesh, P("x", None)))
  out = dec(qs)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(q.decode()))
  hlo = dec.lower(qs).compile().as_text()
  for coll in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert coll not in hlo, f"sharded decode communicates ({coll})"


@pytest.mark.parametrize("bad", [48, 0, 3, 100])
def test_block_size_must_be_power_of_two(bad):
  with pytest.raises(ValueError, match="power of two"):
    nf4_encode(jnp.ones((4, 64)), bad)


def test_unsupported_dtype_raises():
  with pytest.raises(TypeError, match="integer"):
    nf4_encode(jnp.ones((4, 64), jnp.int32), name="layer/kernel")
  with pytest.raises(TypeError, match="layer/kernel"):
    Quant4.encode(jnp.ones((4, 64), jnp.int8), name="layer/kernel")
  with pytest.raises(TypeError, match="float64"):
    nf4_encode(np.ones((4, 64), np.float64))
  with pytest.raises(ValueError, match="quant_type"):
    Quant4.encode(jnp.ones((4, 64)), quant_type="int4")


def test_decode_shape_mismatch_raises():
  q = nf4_encode(jnp.ones((4, 64)), 64)
  with pytest.raises(ValueError, match="shape"):
    q.decode(shape=(8, 32))
  broken = Quant4(packed=q.packed[:-1], absmax=q.absmax, offset=q.offset, shift=None,
                  shape=q.shape, dtype=q.dtype, block_size=64, quant_type="nf4")
  with pytest.raises(ValueError, match="packed"):
    broken.decode()
  with pytest.raises(TypeError, match="non-float"):
    q.decode(jnp.int32)
