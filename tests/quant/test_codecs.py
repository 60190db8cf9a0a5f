"""The codec protocol and registry: every registered codec round-trips within its
documented per-element error bound, its bits per parameter equal the stored bytes counted
from the arrays themselves, names and aliases resolve, bad names and options fail clearly,
and ``quantize`` goes through the registry."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.quant import codebooks, codecs
from lowrank_jax.quant.affine import AffineQuant
from lowrank_jax.quant.blockwise import Blockwise8
from lowrank_jax.quant.nf4 import Quant4
from lowrank_jax.quant.qlora import QuantizedWeight, quantize

NAMES = sorted(codecs.CODECS)
# block / group size per codec: the affine codecs' groups must divide the rows
BLOCK = {"nf4": 64, "fp4": 64, "int8_blockwise_dynamic": 256, "int8_affine": 32, "int4_affine": 32}


def _inputs():
  rng = np.random.default_rng(0)
  normal = rng.standard_normal((64, 96)).astype(np.float32)
  outliers = normal.copy()
  outliers[3, 5], outliers[40, 7] = 40.0, -25.0
  shifted = (rng.standard_normal((96, 33)) * 0.1 + 3.0).astype(np.float32)   # partial last block
  return {"normal": normal, "outliers": outliers, "shifted": shifted,
          "zeros_and_tiny": np.concatenate([np.zeros((32, 40)), 1e-30 * rng.standard_normal((32, 40))]
                                           ).astype(np.float32),
          "bfloat16": rng.standard_normal((64, 80)).astype(ml_dtypes.bfloat16)}


INPUTS = _inputs()


def _half_max_gap(book: str) -> float:
  """Independent of codebooks.max_rounding_error: half the largest gap of the sorted table
  (nearest rounding), or the distance from ±1 to the table's ends if larger."""
  v = np.sort(np.asarray(codebooks.code_book(book), np.float64))
  return float(max(np.max(np.diff(v)) / 2, 1.0 - v[-1], v[0] + 1.0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_round_trip_within_documented_error(name, kind):
  x = INPUTS[kind]
  q = codecs.get_codec(name).encode(jnp.asarray(x), block_size=BLOCK[name])
  assert isinstance(q, codecs.Codec) and isinstance(q, codecs.get_codec(name).codec_type)
  assert q.shape == x.shape and jnp.dtype(q.dtype) == x.dtype
  y = np.asarray(q.decode(jnp.float32), np.float64)
  x64 = np.asarray(x, np.float64)
  bound = np.asarray(q.error_bound(), np.float64)
  assert bound.shape == x.shape
  slack = 4 * np.finfo(np.float32).eps * np.max(np.abs(x64))   # float32 decode rounding
  excess = np.abs(y - x64) - bound
  assert np.max(excess) <= slack, f"{name} on {kind}: error exceeds its bound by {np.max(excess)}"
  assert q.decode().dtype == x.dtype


@pytest.mark.parametrize("name", NAMES)
def test_error_bound_is_tight(name):
  """The bound is the codec's real accuracy, not a vacuous one: on normal data the worst
  element reaches a good part of it, and it is the code table's rounding times the scales."""
  x = INPUTS["normal"]
  q = codecs.get_codec(name).encode(jnp.asarray(x), block_size=BLOCK[name])
  err = np.abs(np.asarray(q.decode(jnp.float32), np.float64) - x)
  bound = np.asarray(q.error_bound(), np.float64)
  assert np.max(err) >= 0.5 * np.max(bound)
  amax = np.max(np.abs(x))
  if name in ("nf4", "fp4"):
    # 4-bit: half the largest gap of the table, a little more for the 8-bit absmax (DQ)
    h = _half_max_gap(name)
    assert abs(codebooks.max_rounding_error(name) - h) < 1e-6
    assert h * 0.9 * amax < np.max(bound) < (h + 0.02) * amax * 1.01
  elif name == "int8_blockwise_dynamic":
    assert np.max(bound) <= (_half_max_gap("dynamic8") + 1e-4) * amax
  else:
    bits = 8 if name.startswith("int8") else 4
    # symmetric groups: S / 2 = group absmax / (2 (2^(b-1) - 1))
    assert np.max(bound) == pytest.approx(amax / (2 * (2 ** (bits - 1) - 1)), rel=1e-6)


def _stored_bytes(q) -> int:
  """Bytes of the codec's arrays, from the arrays: ``nbytes`` for byte-sized elements;
  4-bit codes (which XLA:CPU holds one per byte) counted packed, two per byte."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(q):
    if jnp.dtype(leaf.dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
      total += (leaf.size + 1) // 2
    else:
      total += leaf.nbytes
  return total


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(64, 96), (128, 33)])
def test_bits_per_param_from_the_arrays(name, shape):
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  q = codecs.encode(x, name, block_size=BLOCK[name])
  n = math.prod(shape)
  assert q.size == n
  assert q.nbytes == _stored_bytes(q)
  assert q.bits_per_param == pytest.approx(8 * _stored_bytes(q) / n, rel=1e-12)
  w = QuantizedWeight(q=q)
  assert w.nbytes == q.nbytes and w.bits_per_param == q.bits_per_param


def test_bits_per_param_closed_forms():
  n, rows, cols = 64 * 256, 128, 128
  x = jnp.asarray(np.random.default_rng(2).standard_normal((rows, cols)), jnp.float32)
  # NF4 + DQ: 4 bits, 8-bit absmax per 64, float32 scale per 64*256, float32 mean
  q = codecs.encode(x, "nf4")
  assert q.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
  assert codecs.encode(x, "nf4", double_quant=False).bits_per_param == 4 + 32 / 64
  # 8-bit blockwise: 8 bits and a float32 absmax per 256
  assert codecs.encode(x, "int8", block_size=256).bits_per_param == 8 + 32 / 256
  # affine, groups of 32 rows: b bits + float32 scale and zero per group and column
  assert codecs.encode(x, "int4_affine", block_size=32).bits_per_param == 4 + 2 * 32 / 32
  assert codecs.encode(x, "int8_affine", block_size=32).bits_per_param == 8 + 2 * 32 / 32


def test_names_aliases_and_errors():
  assert set(codecs.CODECS) == {"nf4", "fp4", "int8_blockwise_dynamic", "int8_affine", "int4_affine"}
  for alias, name in {"int8": "int8_blockwise_dynamic", "blockwise8": "int8_blockwise_dynamic"}.items():
    assert codecs.get_codec(alias) is codecs.CODECS[name]
  assert lj.quant.get_codec is codecs.get_codec
  with pytest.raises(ValueError, match=r"unknown codec 'nf5'; did you mean 'nf4'"):
    codecs.get_codec("nf5")
  with pytest.raises(ValueError, match=r"did you mean 'int4_affine'.*Registered codecs: .*int8_affine"):
    codecs.get_codec("int4affine")
  with pytest.raises(ValueError, match=r"unknown codec 'zzz'\. Registered"):
    codecs.get_codec("zzz")
  with pytest.raises(TypeError, match=r"codec 'int8_affine': unknown option\(s\) \['icq'\]; valid: "
                                      r"\['symmetric', 'granularity'\]"):
    codecs.encode(jnp.ones((4, 4)), "int8_affine", icq=True)
  with pytest.raises(TypeError, match=r"int4_affine: cannot quantize an integer tensor for leaf 'a/b'"):
    codecs.encode(jnp.ones((4, 4), jnp.int32), "int4_affine", name="a/b")
  with pytest.raises(ValueError, match="did you mean 'fp4'"):
    quantize({"w": jnp.ones((8, 8))}, codec="fp5")
  with pytest.raises(ValueError, match="leaf 'w' is already quantized"):
    quantize(quantize({"w": jnp.ones((64, 64))}), r"w")


@pytest.mark.parametrize("name", NAMES + ["int8"])
def test_quantize_goes_through_the_registry(name):
  theta = {"l": {"kernel": jnp.asarray(INPUTS["normal"]), "bias": jnp.zeros((96,))}}
  spec = codecs.get_codec(name)
  tq = quantize(theta, r"kernel$", codec=name, block_size=BLOCK[spec.name])
  q = tq["l"]["kernel"].q
  ref = spec.encode(theta["l"]["kernel"], block_size=BLOCK[spec.name])
  assert type(q) is spec.codec_type
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert tq["l"]["bias"] is theta["l"]["bias"]


def test_codec_options_pass_through():
  x = jnp.asarray(INPUTS["shifted"])
  assert codecs.encode(x, "nf4", icq=True).shift is not None
  assert codecs.encode(x, "int8", rounding="nearest").rounding == "nearest"
  assert not codecs.encode(x[:64], "int4_affine", block_size=32, symmetric=False).symmetric
  assert codecs.CODECS["nf4"].uses_double_quant and not codecs.CODECS["int4_affine"].uses_double_quant
  assert set(codecs.CODECS["nf4"].options) >= {"icq", "shift_storage", "dq_block_size"}
  assert {n: codecs.CODECS[n].codec_type for n in NAMES} == {
    "nf4": Quant4, "fp4": Quant4, "int8_blockwise_dynamic": Blockwise8,
    "int8_affine": AffineQuant, "int4_affine": AffineQuant}
