"""IA3 against peft's golden data and the dense closed form."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.ia3 import IA3Weight, ia3
from tests.methods import peft_harness as H


def test_matches_peft():
  _, meta, _ = H.golden_linear("peft_ia3")
  assert meta["config"]["feedforward_modules"] == "set()"  # output scaling, bias scaled too
  H.check_against_peft("peft_ia3", ia3("lin/kernel"), {"lin/kernel/l_out": "ia3_l.default"},
                       lazy_type=IA3Weight)


def _theta(seed=0):
  rng = np.random.default_rng(seed)
  return {"ff": {"kernel": jnp.asarray(rng.normal(size=(12, 7)), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=7), jnp.float32)},
          "v": {"kernel": jnp.asarray(rng.normal(size=(12, 7)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=7), jnp.float32)}}


def test_feedforward_scales_input_and_keeps_bias():
  theta0 = _theta()
  reparam = ia3(r"kernel$", feedforward=r"^ff/")
  phi = reparam.init(jax.random.key(0), theta0)
  assert phi["ff"]["kernel"]["l_in"].shape == (12,) and phi["v"]["kernel"]["l_out"].shape == (7,)
  assert phi["ff"]["bias"] is None
  # identity at init
  chex.assert_trees_all_close(lj.merge(reparam, theta0, phi), theta0)
  rng = np.random.default_rng(1)
  phi = {"ff": {"kernel": {"l_in": jnp.asarray(rng.uniform(0.5, 2, 12), jnp.float32)}, "bias": None},
         "v": {"kernel": {"l_out": jnp.asarray(rng.uniform(0.5, 2, 7), jnp.float32)}, "bias": None}}
  x = jnp.asarray(rng.normal(size=(3, 12)), jnp.float32)
  theta = reparam.apply(theta0, phi)
  lin, lout = phi["ff"]["kernel"]["l_in"], phi["v"]["kernel"]["l_out"]
  want_ff = (x * lin) @ theta0["ff"]["kernel"] + theta0["ff"]["bias"]
  want_v = (x @ theta0["v"]["kernel"] + theta0["v"]["bias"]) * lout
  for name, want in (("ff", want_ff), ("v", want_v)):
    np.testing.assert_allclose(H.forward({"lin": theta[name]}, x), want, rtol=1e-5, atol=1e-5)
    dense = lj.materialize(theta)[name]
    np.testing.assert_allclose(x @ dense["kernel"] + dense["bias"], want, rtol=1e-5, atol=1e-5)
  merged = lj.merge(reparam, theta0, phi)
  chex.assert_trees_all_close(lj.unmerge(reparam, merged, phi), theta0, atol=1e-5)


def test_grad_lazy_equals_dense():
  theta0 = _theta(2)
  reparam = ia3(r"kernel$", feedforward=[r"ff"])
  phi = jax.tree.map(lambda p: p * 1.5, reparam.init(jax.random.key(0), theta0))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 12)), jnp.float32)

  def loss(phi, dense):
    theta = reparam.apply(theta0, phi)
    theta = lj.materialize(theta) if dense else theta
    return sum(jnp.sum(jnp.sin(H.forward({"lin": theta[k]}, x))) for k in ("ff", "v"))

  chex.assert_trees_all_close(jax.grad(loss)(phi, False), jax.grad(loss)(phi, True), rtol=1e-5, atol=1e-6)


def test_no_bias_leaf_is_fine_and_errors():
  theta0 = {"w": jnp.ones((4, 3))}
  phi = ia3("w").init(jax.random.key(0), theta0)
  assert phi["w"]["l_out"].shape == (3,)
  with pytest.raises(ValueError, match="selects no leaf"):
    ia3("nope").init(jax.random.key(0), theta0)
  with pytest.raises(TypeError, match="dtype int32"):
    ia3("i").init(jax.random.key(0), {"i": jnp.ones((4, 3), jnp.int32)})
