"""LoHa against peft's golden data, the dense Hadamard product and the Khatri-Rao identity."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lowrank_jax as lj
from lowrank_jax.methods.loha import LoHaWeight, khatri_rao_factors, loha
from tests.methods import peft_harness as H

NAMES = ("w1_a", "w1_b", "w2_a", "w2_b")


def test_matches_peft():
  """``y``, gradients and merge against the golden file; its merge is ``W + s·(w1_a w1_b) ⊙ (w2_a w2_b)``."""
  g, meta, _ = H.golden_linear("peft_loha")
  cfg = meta["config"]
  p = {n: np.asarray(H.peft_param(g, f"hada_{n}.default"), np.float64) for n in NAMES}
  delta = cfg["alpha"] / cfg["r"] * (p["w1_a"] @ p["w1_b"]) * (p["w2_a"] @ p["w2_b"])
  H.assert_merge_is(g, delta)
  H.check_against_peft("peft_loha", loha("lin/kernel", rank=cfg["r"], alpha=cfg["alpha"]),
                       {f"lin/kernel/{n}": f"hada_{n}.default" for n in NAMES}, lazy_type=LoHaWeight)


@settings(max_examples=15, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r1=st.integers(1, 4), r2=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_khatri_rao_identity_and_rank(d_in, d_out, r1, r2, seed):
  rng = np.random.default_rng(seed)
  b1, a1 = rng.normal(size=(d_in, r1)), rng.normal(size=(r1, d_out))
  b2, a2 = rng.normal(size=(d_in, r2)), rng.normal(size=(r2, d_out))
  u, v = khatri_rao_factors(b1, a1, b2, a2)
  had = (b1 @ a1) * (b2 @ a2)
  np.testing.assert_allclose(u @ v, had, rtol=1e-10, atol=1e-10)
  assert np.linalg.matrix_rank(had) <= min(r1 * r2, d_in, d_out)


@pytest.mark.parametrize("rank,factored", [(2, True), (8, False)])
def test_lazy_equals_dense(rank, factored):
  rng = np.random.default_rng(rank)
  theta0 = {"w": jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)}
  reparam = loha("w", rank=rank, alpha=2 * rank)
  phi = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) / 4,
                     reparam.init(jax.random.key(0), theta0))
  w = reparam.apply(theta0, phi)["w"]
  assert w.factored_is_cheaper() == factored  # 4*64 < 960; 64*64 > 960
  x = jnp.asarray(rng.normal(size=(3, 40)), jnp.float32)
  p = phi["w"]
  dense = theta0["w"] + 2.0 * (p["w1_b"] @ p["w1_a"]) * (p["w2_b"] @ p["w2_a"])
  np.testing.assert_allclose(lj.dot(x, w), x @ dense, rtol=1e-4, atol=1e-4)

  def loss(phi, mat):
    theta = reparam.apply(theta0, phi)
    theta = lj.materialize(theta) if mat else theta
    return jnp.sum(jnp.tanh(lj.dot(x, theta["w"])))

  f = jax.jit(lambda p: (jax.grad(loss)(p, False), jax.grad(loss)(p, True)))
  g_lazy, g_dense = f(phi)
  chex.assert_trees_all_close(g_lazy, g_dense, rtol=1e-4, atol=1e-5)
  merged = lj.merge(reparam, theta0, phi)
  np.testing.assert_allclose(merged["w"], dense, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lj.unmerge(reparam, merged, phi), theta0, atol=1e-5)


def test_init_matches_peft():
  theta0 = {"w": jnp.ones((400, 300))}
  reparam = loha("w", rank=16)
  phi = reparam.init(jax.random.key(0), theta0)["w"]
  assert phi["w1_a"].shape == (16, 300) and phi["w1_b"].shape == (400, 16)
  assert float(jnp.max(jnp.abs(phi["w2_b"]))) == 0.0
  assert float(jnp.max(jnp.abs(phi["w1_b"]))) <= 1 / math.sqrt(400)  # torch [r, in]: fan_in = in
  assert float(jnp.max(jnp.abs(phi["w1_a"]))) <= 1 / math.sqrt(16)   # torch [out, r]: fan_in = r
  np.testing.assert_allclose(float(jnp.var(phi["w1_a"])), 1 / 16 / 3, rtol=0.05)
  chex.assert_trees_all_close(lj.merge(reparam, theta0, {"w": phi}), theta0)


def test_errors():
  with pytest.raises(ValueError, match="positive int"):
    loha("w", rank=0)
  with pytest.raises(ValueError, match=r"'t' has shape \(4, 3, 2\), not a matrix"):
    loha("t").init(jax.random.key(0), {"t": jnp.zeros((4, 3, 2))})
