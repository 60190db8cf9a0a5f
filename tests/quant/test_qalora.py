"""QA-LoRA: the merged weight keeps the int4 codes and gives the unmerged output."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.qalora import QALoRAWeight, group_pool, qalora, qalora_merge
from lowrank_jax.quant.affine import AffineQuant
from lowrank_jax.quant.qlora import QuantizedWeight


def _setup(seed=0):
  theta = {"proj": {"kernel": jax.random.normal(jax.random.PRNGKey(seed), (128, 96)) * 0.1}}
  reparam = qalora(r"kernel$", rank=4, alpha=8, group_size=32)
  base, phi = lj.initialize(reparam, jax.random.PRNGKey(1), theta)
  phi = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), phi)
  return theta, reparam, base, phi


def test_merge_keeps_int4_codes_and_output():
  theta, reparam, base, phi = _setup()
  w = reparam.apply(base, phi)["proj"]["kernel"]
  assert isinstance(w, QALoRAWeight)
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 128))
  y = lj.dot(x, w)
  merged = qalora_merge(reparam.apply(base, phi))["proj"]["kernel"]
  assert isinstance(merged, QuantizedWeight) and isinstance(merged.q, AffineQuant)
  assert merged.q.q.dtype == jnp.uint4
  np.testing.assert_array_equal(np.asarray(merged.q.q), np.asarray(base["proj"]["kernel"].q.q))
  chex.assert_trees_all_close(lj.dot(x, merged), y, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(merged.materialize(), w.materialize(), atol=1e-5)
  # independent reference: dense base + pooled adapter
  ref = x @ base["proj"]["kernel"].materialize() + 2.0 * (group_pool(x, 32) @ phi["proj"]["kernel"]["a"]) @ phi["proj"]["kernel"]["b"]
  chex.assert_trees_all_close(y, ref, atol=1e-5)


def test_grads_flow_to_adapter_only():
  theta, reparam, base, phi = _setup()
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 128))
  g = jax.grad(lambda p: jnp.sum(lj.dot(x, reparam.apply(base, p)["proj"]["kernel"]) ** 2))(phi)
  assert float(jnp.abs(g["proj"]["kernel"]["b"]).sum()) > 0


def test_bad_group_size_names_leaf():
  theta = {"proj": {"kernel": jnp.ones((100, 8))}}
  with pytest.raises(ValueError, match="proj/kernel"):
    lj.initialize(qalora(r"kernel$", rank=2, group_size=32), jax.random.PRNGKey(0), theta)
