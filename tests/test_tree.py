"""Key paths, selection, partition/combine and counts across dicts, linen params and NNX state."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lj


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="query")(x)
    return nn.Dense(4, name="value")(x)


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.query = nnx.Linear(6, 8, rngs=rngs)
    self.value = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.value(self.query(x))


def test_paths_dict_linen_nnx_agree():
  linen = _LinenMLP().init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  _, state = nnx.split(_NNXMLP(nnx.Rngs(0)))
  expected = ["query/bias", "query/kernel", "value/bias", "value/kernel"]
  assert lj.leaf_paths(linen) == expected
  assert lj.leaf_paths(state) == expected
  assert lj.leaf_paths({"query": {"kernel": 1, "bias": 2}, "value": {"kernel": 3, "bias": 4}}) == expected
  assert lj.leaf_paths({"layers": [{"w": 1}, {"w": 2}]}) == ["layers/0/w", "layers/1/w"]


def test_select_forms():
  t = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "b": {"kernel": jnp.ones((2, 3))}}
  assert jax.tree.leaves(lj.select(t, r"kernel$")) == [False, True, True]
  assert jax.tree.leaves(lj.select(t, [r"^a/bias", r"^b/"])) == [True, False, True]
  assert jax.tree.leaves(lj.select(t, lambda p, x: x.ndim == 2 and x.shape[1] == 3)) == [False, False, True]
  mask = {"a": {"kernel": True, "bias": False}, "b": {"kernel": False}}
  assert jax.tree.leaves(lj.select(t, mask)) == [False, True, False]
  assert jax.tree.leaves(lj.select(t, lj.Siblings(r"a/kernel", "bias"))) == [True, False, False]
  with pytest.raises(ValueError, match=r"selects no leaf.*\n.*a/bias  \(2,\) float32"):
    lj.select(t, "nothing")
  with pytest.raises(ValueError, match="mask has 1 leaves but the tree has 3"):
    lj.select(t, {"x": True})


def test_partition_combine_roundtrip_and_grad():
  t = {"a": {"kernel": jnp.arange(4.0).reshape(2, 2), "bias": jnp.ones(2)}, "b": jnp.ones(3)}
  train, frozen = lj.partition(t, r"kernel")
  assert train["a"]["bias"] is None and frozen["a"]["kernel"] is None
  chex.assert_trees_all_equal(lj.combine(train, frozen), t)
  g = jax.grad(lambda tr: jnp.sum(lj.combine(tr, frozen)["a"]["kernel"] ** 2))(train)
  np.testing.assert_allclose(g["a"]["kernel"], 2 * t["a"]["kernel"])
  assert lj.count_params(train) == 4 and lj.count_params(frozen) == 5
  assert lj.count_bytes(t) == 9 * 4


def test_lora_on_nnx_state_roundtrips_through_merge():
  model = _NNXMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  reparam = lj.lora(r"(query|value)/kernel", rank=2, alpha=4)
  phi = reparam.init(jax.random.key(1), state)
  phi = jax.tree.map(lambda p: p + 0.1, phi)
  merged = lj.merge(reparam, state, phi)
  out = nnx.merge(graphdef, merged)(jnp.ones((3, 6)))
  q = state["query"]["kernel"][...] + 2 * phi["query"]["kernel"]["a"] @ phi["query"]["kernel"]["b"]
  v = state["value"]["kernel"][...] + 2 * phi["value"]["kernel"]["a"] @ phi["value"]["kernel"]["b"]
  ref = (jnp.ones((3, 6)) @ q + state["query"]["bias"][...]) @ v + state["value"]["bias"][...]
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_lazy_weight_through_linen_dense_materializes():
  """A user's own linen model gets the materialised weight (jnp.asarray -> __jax_array__)."""
  params = _LinenMLP().init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  reparam = lj.lora(r"query/kernel", rank=2)
  phi = jax.tree.map(lambda p: p + 0.3, reparam.init(jax.random.key(1), params))
  x = jnp.ones((2, 6))
  y_merged = _LinenMLP().apply({"params": lj.merge(reparam, params, phi)}, x)
  y_lazy = _LinenMLP().apply({"params": lj.materialize(reparam.apply(params, phi))}, x)
  np.testing.assert_allclose(y_lazy, y_merged, rtol=1e-6)


def test_find_nodes_in_nested_optax_state():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3),
                   optax.masked(optax.adam(1e-3), {"w": True, "b": False}))
  state = tx.init(params)
  found = lj.tree.find_nodes(state, optax.ScaleByAdamState)
  assert len(found) == 2 and all(isinstance(s, optax.ScaleByAdamState) for s in found)
  assert found[0] is state[1][0]
  assert lj.tree.find_nodes(state, optax.ScaleByScheduleState) == []
  assert lj.tree.key_name(jax.tree_util.DictKey("a")) == "a"
  assert lj.tree.key_name(jax.tree_util.SequenceKey(3)) == "3"
