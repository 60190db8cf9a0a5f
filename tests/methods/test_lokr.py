"""LoKr / KronA against peft's golden data, dense Kronecker products and rank identities."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lowrank_jax as lj
from lowrank_jax.methods.lokr import KronWeight, factorization, lokr, lokr_shapes
from tests.methods import peft_harness as H


def _peft(g, name):
  return np.asarray(H.peft_param(g, name + ".default"), np.float64)


def test_matches_peft():
  """``y``, gradients and merge against the golden file; its merge is ``W + s·kron(w1, w2)``."""
  g, meta, _ = H.golden_linear("peft_lokr")
  cfg = meta["config"]
  assert not cfg["decompose_both"] and cfg["decompose_factor"] == -1
  H.assert_merge_is(g, cfg["alpha"] / cfg["r"] * np.kron(_peft(g, "lokr_w1"), _peft(g, "lokr_w2")))
  H.check_against_peft("peft_lokr", lokr("lin/kernel", rank=cfg["r"], alpha=cfg["alpha"]),
                       {"lin/kernel/w1": "lokr_w1.default", "lin/kernel/w2": "lokr_w2.default"},
                       lazy_type=KronWeight)


def test_matches_peft_decompose_both():
  g, meta, _ = H.golden_linear("peft_lokr_decomposed")
  cfg = meta["config"]
  assert cfg["decompose_both"]
  spec = {f"lin/kernel/w{i}_{ab}": f"lokr_w{i}_{ab}.default" for i in (1, 2) for ab in "ab"}
  w1 = _peft(g, "lokr_w1_a") @ _peft(g, "lokr_w1_b")
  w2 = _peft(g, "lokr_w2_a") @ _peft(g, "lokr_w2_b")
  H.assert_merge_is(g, cfg["alpha"] / cfg["r"] * np.kron(w1, w2))
  H.check_against_peft("peft_lokr_decomposed",
                       lokr("lin/kernel", rank=cfg["r"], alpha=cfg["alpha"], decompose_both=True), spec,
                       lazy_type=KronWeight)


def test_factorization_examples():
  # the examples of peft's docstring, and the golden layer (48 -> (6, 8), 64 -> (8, 8))
  assert factorization(256) == (16, 16)
  assert factorization(128) == (8, 16)
  assert factorization(127) == (1, 127)
  assert factorization(128, 4) == (4, 32)
  assert factorization(48) == (6, 8) and factorization(64) == (8, 8)
  assert factorization(1) == (1, 1)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 5000), factor=st.sampled_from([-1, 2, 3, 4, 8, 16]))
def test_factorization_property(dim, factor):
  m, n = factorization(dim, factor)
  assert m * n == dim
  if factor > 0 and dim % factor == 0:
    assert m == factor  # peft returns (factor, dim // factor) unsorted, e.g. (2, 1) for dim 2
  else:
    assert m <= n
  if factor == -1:  # no divisor pair is closer to sqrt(dim)
    assert all(dim % d or d > m or d < m for d in range(m + 1, math.isqrt(dim) + 1))


def test_use_w_rule():
  sh = lokr_shapes(64, 48, rank=4)
  assert sh["in"] == (8, 8) and sh["out"] == (6, 8) and sh["full_w1"] and sh["full_w2"]
  sh = lokr_shapes(64, 48, rank=2, decompose_both=True)
  assert not sh["full_w1"] and not sh["full_w2"]
  sh = lokr_shapes(1024, 1024, rank=8)
  assert sh["full_w1"] and not sh["full_w2"]  # 8 < 32/2


@settings(max_examples=10, deadline=None)
@given(a_in=st.integers(1, 6), a_out=st.integers(1, 6), b_in=st.integers(1, 6), b_out=st.integers(1, 6),
       ra=st.integers(1, 6), rb=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_kron_rank_and_lazy_matmul(a_in, a_out, b_in, b_out, ra, rb, seed):
  rng = np.random.default_rng(seed)
  ra, rb = min(ra, a_in, a_out), min(rb, b_in, b_out)
  a = rng.normal(size=(a_in, ra)) @ rng.normal(size=(ra, a_out))  # rank ra (a.s.)
  b = rng.normal(size=(b_in, rb)) @ rng.normal(size=(rb, b_out))
  k = np.kron(a, b)
  rank = np.linalg.matrix_rank
  assert rank(k) == rank(a) * rank(b) == ra * rb
  x = rng.normal(size=(3, a_in * b_in)).astype(np.float32)
  w = KronWeight(base=jnp.zeros(k.shape, jnp.float32), w1=(jnp.asarray(a, jnp.float32),),
                 w2=(jnp.asarray(b, jnp.float32),), scale=0.5, shape_=k.shape)
  np.testing.assert_allclose(w.kron_matmul(jnp.asarray(x)), 0.5 * x @ k, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(w.materialize(), 0.5 * k, rtol=1e-5, atol=1e-5)


def test_lazy_equals_dense_with_low_rank_factors():
  theta0 = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 48)), jnp.float32)}
  reparam = lokr("w", rank=2, alpha=3, decompose_both=True, init="random")
  phi = reparam.init(jax.random.key(0), theta0)
  assert set(phi["w"]) == {"w1_a", "w1_b", "w2_a", "w2_b"}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 64)), jnp.float32)

  def loss(phi, dense):
    theta = reparam.apply(theta0, phi)
    theta = lj.materialize(theta) if dense else theta
    return jnp.sum(jnp.cos(lj.dot(x, theta["w"])))

  f = jax.jit(lambda p: (loss(p, False), loss(p, True), jax.grad(loss)(p, False), jax.grad(loss)(p, True)))
  l1, l2, g1, g2 = f(phi)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-5)
  merged = lj.merge(reparam, theta0, phi)
  chex.assert_trees_all_close(lj.unmerge(reparam, merged, phi), theta0, atol=1e-5)


@pytest.mark.parametrize("init,zero", [("peft", "w1"), ("lycoris", "w2")])
def test_init_is_identity(init, zero):
  theta0 = {"w": jnp.ones((64, 48))}
  reparam = lokr("w", rank=4, alpha=8, init=init)
  phi = reparam.init(jax.random.key(0), theta0)
  assert float(jnp.max(jnp.abs(phi["w"][zero]))) == 0.0
  other = "w2" if zero == "w1" else "w1"
  assert float(jnp.max(jnp.abs(phi["w"][other]))) <= 1 / math.sqrt(8)  # U(±1/√fan_in), fan_in = 8
  chex.assert_trees_all_close(lj.merge(reparam, theta0, phi), theta0)


def test_lazy_path_has_no_dense_update():
  theta0 = {"w": jnp.ones((256, 128))}
  reparam = lokr("w", rank=4, init="random")
  phi = reparam.init(jax.random.key(0), theta0)
  x = jnp.ones((2, 256))
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(lj.dot(x, reparam.apply(theta0, p)["w"]))))(phi)
  shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
  assert (256, 128) not in shapes


def test_errors():
  with pytest.raises(ValueError, match="positive int"):
    lokr("w", rank=0)
  with pytest.raises(ValueError, match="lokr: parameter 'init' must be one of 'peft', 'lycoris', 'random'"):
    lokr("w", init="xavier")
  with pytest.raises(ValueError, match=r"'t' has shape \(4, 3, 2\), not a matrix"):
    lokr("t").init(jax.random.key(0), {"t": jnp.zeros((4, 3, 2))})


def test_factorization_equals_peft():
  """Optional: peft's own function on every dim up to 600 and a few factors."""
  layer = pytest.importorskip("peft.tuners.lokr.layer")
  for dim in range(1, 601):
    for factor in (-1, 2, 3, 4, 8, 16, 32):
      assert factorization(dim, factor) == tuple(layer.factorization(dim, factor)), (dim, factor)
