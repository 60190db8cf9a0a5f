"""lj.nn layers keep lazy weights lazy inside users' Flax models (linen and NNX)."""

import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lowrank_jax as lj


class _Linen(linen.Module):
  dense: type = lj.nn.Dense

  @linen.compact
  def __call__(self, x):
    return self.dense(4, name="out")(jax.nn.relu(self.dense(48, name="hidden")(x)))


class _NNX(nnx.Module):
  def __init__(self, rngs):
    self.hidden = lj.nn.Linear(40, 48, rngs=rngs)
    self.out = lj.nn.Linear(48, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def _dense_shapes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}


def test_linen_dense_same_params_as_flax_and_lazy_grads():
  x = jax.random.normal(jax.random.key(0), (3, 40))
  params = _Linen().init(jax.random.key(1), x)["params"]
  ref_params = _Linen(dense=linen.Dense).init(jax.random.key(1), x)["params"]
  chex.assert_trees_all_equal_shapes(params, ref_params)
  reparam = lj.lora(r"kernel", rank=2)
  phi = jax.tree.map(lambda a: a + 0.1, reparam.init(jax.random.key(2), params))

  def loss(phi, lazy):
    theta = reparam.apply(params, phi)
    theta = theta if lazy else lj.materialize(theta)
    return jnp.sum(_Linen().apply({"params": theta}, x) ** 2)

  chex.assert_trees_all_close(jax.grad(loss)(phi, True), jax.grad(loss)(phi, False), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      _Linen().apply({"params": reparam.apply(params, phi)}, x),
      _Linen(dense=linen.Dense).apply({"params": lj.merge(reparam, params, phi)}, x), rtol=1e-5, atol=1e-5)
  assert (40, 48) not in _dense_shapes(jax.grad(lambda p: loss(p, True)), phi)
  assert (40, 48) in _dense_shapes(jax.grad(lambda p: loss(p, False)), phi)


def test_nnx_linear_lazy_state():
  model = _NNX(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  reparam = lj.lora(r"kernel", rank=3, alpha=6)
  phi = jax.tree.map(lambda a: a + 0.05, reparam.init(jax.random.key(1), state))
  x = jax.random.normal(jax.random.key(2), (5, 40))

  def loss(phi, lazy):
    theta = reparam.apply(state, phi)
    theta = theta if lazy else lj.materialize(theta)
    return jnp.sum(nnx.merge(graphdef, theta)(x) ** 2)

  chex.assert_trees_all_close(jax.grad(loss)(phi, True), jax.grad(loss)(phi, False), rtol=1e-5, atol=1e-5)
  merged = nnx.merge(graphdef, lj.merge(reparam, state, phi))
  np.testing.assert_allclose(nnx.merge(graphdef, reparam.apply(state, phi))(x), merged(x), rtol=1e-5, atol=1e-5)
  assert (40, 48) not in _dense_shapes(jax.grad(lambda p: loss(p, True)), phi)
