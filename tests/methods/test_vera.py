"""VeRA against peft's golden data (with its saved projections) and the closed form."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.vera import shared_projections, vera, vera_projections
from tests.methods import peft_harness as H

SPEC = {"lin/kernel/lambda_b": "vera_lambda_b.default", "lin/kernel/lambda_d": "vera_lambda_d.default"}


def test_matches_peft_with_saved_projections():
  """``y``, gradients and merge against the golden file; its merge is ``W + Λ_b B Λ_d A``."""
  g, meta, _ = H.golden_linear("peft_vera")
  assert meta["config"]["save_projection"]
  p = lambda n: np.asarray(H.peft_param(g, n), np.float64)
  a, b, lb, ld = p("vera_A.default"), p("vera_B.default"), p("vera_lambda_b.default"), p("vera_lambda_d.default")
  H.assert_merge_is(g, (lb[:, None] * b) @ (ld[:, None] * a))
  H.check_against_peft("peft_vera", vera("lin/kernel", rank=meta["config"]["r"], projections=(a.T, b.T)),
                       SPEC, lazy_type=lj.LoRAWeight)


def _theta():
  rng = np.random.default_rng(0)
  return {"q": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
          "v": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)}}


def test_shared_projections_sliced_per_layer():
  theta0 = _theta()
  key = jax.random.key(7)
  reparam = vera("kernel", rank=4, key=key)
  phi = reparam.init(jax.random.key(0), theta0)
  assert phi["q"]["kernel"]["lambda_d"].shape == (4,) and phi["v"]["kernel"]["lambda_b"].shape == (10,)
  np.testing.assert_allclose(phi["q"]["kernel"]["lambda_d"], 0.1)
  chex.assert_trees_all_close(lj.merge(reparam, theta0, phi), theta0)  # λ_b = 0: identity
  a, b = shared_projections(key, theta0, "kernel", 4)
  assert a.shape == (16, 4) and b.shape == (4, 10)  # max in, max out over the selected layers
  rng = np.random.default_rng(1)
  phi = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), phi)
  merged = lj.merge(reparam, theta0, phi)
  for name, (d_in, d_out) in (("q", (16, 8)), ("v", (12, 10))):
    p = phi[name]["kernel"]
    delta = (a[:d_in] * p["lambda_d"]) @ (b[:, :d_out] * p["lambda_b"])
    np.testing.assert_allclose(merged[name]["kernel"], theta0[name]["kernel"] + delta, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lj.unmerge(reparam, merged, phi), theta0, atol=1e-5)
  # the same key gives the same projections: apply is reproducible from the key alone
  merged2 = lj.merge(vera("kernel", rank=4, key=jax.random.key(7)), theta0, phi)
  chex.assert_trees_all_close(merged, merged2)


def test_projection_init_bounds():
  a, b = vera_projections(jax.random.key(0), 600, 300, 64)
  assert float(jnp.max(jnp.abs(a))) <= math.sqrt(6 / 600) and float(jnp.max(jnp.abs(b))) <= math.sqrt(6 / 64)
  np.testing.assert_allclose(float(jnp.var(a)), 6 / 600 / 3, rtol=0.05)  # U(-c, c): c^2 / 3
  np.testing.assert_allclose(float(jnp.var(b)), 6 / 64 / 3, rtol=0.05)


def test_only_vectors_train_and_lazy_equals_dense():
  theta0 = _theta()
  reparam = vera("kernel", rank=4)
  phi = jax.tree.map(lambda p: p + 0.5, reparam.init(jax.random.key(0), theta0))
  assert lj.count_params(phi) == 2 * 4 + 8 + 10
  xs = {"q": jnp.ones((2, 16)), "v": jnp.ones((2, 12))}

  def loss(phi, dense):
    theta = reparam.apply(theta0, phi)
    theta = lj.materialize(theta) if dense else theta
    return sum(jnp.sum(jnp.tanh(lj.dot(xs[k], theta[k]["kernel"]))) for k in xs)

  f = jax.jit(lambda p: (jax.grad(loss)(p, False), jax.grad(loss)(p, True)))
  g_lazy, g_dense = f(phi)
  chex.assert_trees_all_close(g_lazy, g_dense, rtol=1e-5, atol=1e-6)


def test_errors():
  theta0 = _theta()
  with pytest.raises(ValueError, match=r"'q/kernel' of shape \(16, 8\).*exceeds"):
    vera("kernel", projections=(jnp.ones((12, 4)), jnp.ones((4, 10)))).init(jax.random.key(0), theta0)
  with pytest.raises(ValueError, match="positive int"):
    vera("kernel", rank=0)
